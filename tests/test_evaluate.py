"""Evaluation metrics (mean@n, maj@n, pass@k) on scripted completions, and the key set that
every rank must reduce in the same order (an empty slice or answerless responses included)."""
import math

import pytest
from trainer_fixtures import char_tokenizer

from treepo.engine.engine import Completion
from treepo.train.data import Problem
from treepo.train.evaluate import evaluate, pass_at_k
from treepo.train.rewards.problems import ProblemScorer


class ScriptedEngine:
    """Returns the given texts as completions (n per prompt, in prompt order)."""

    def __init__(self, texts_per_prompt):
        self.tokenizer = char_tokenizer()
        self.texts = texts_per_prompt

    def generate(self, prompts, params):
        assert len(prompts) == len(self.texts)
        return [[Completion([1] * len(t), [0.0] * len(t), "stop", text=t) for t in ts[:params.n]]
                for ts in self.texts]


def test_metrics_on_scripted_answers():
    probs = [Problem("1+1?", "2", "a"), Problem("2+2?", "4", "a"), Problem("x?", "7", "b")]
    texts = [[r"\boxed{2}", r"\boxed{3}", r"\boxed{2}", "no answer"],
             [r"\boxed{5}", r"\boxed{5}", r"\boxed{4}", r"\boxed{4}"],  # a tie: the first voted (5) wins
             ["nothing", "at", "all", "here"]]  # no answers: maj@n must still be there, as 0
    ev = evaluate(ScriptedEngine(texts), probs, ProblemScorer(None), n=4)
    a, b = ev["a"], ev["b"]
    assert a["mean@n"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert a["maj@n"] == pytest.approx((1 + 0) / 2)
    assert a["pass@1"] == pytest.approx(0.5) and a["pass@4"] == 1.0
    assert b == {"mean@n": 0.0, "maj@n": 0.0, "pass@1": 0.0, "pass@4": 0.0, "response_len": 4.0,
                 "problems": 1}
    assert ev["overall"]["problems"] == 3
    assert ev["overall"]["mean@n"] == pytest.approx((2 * a["mean@n"] + b["mean@n"]) / 3)
    assert math.isclose(pass_at_k(4, 2, 1), 0.5)


def test_an_empty_slice_has_the_same_keys_as_a_full_one():
    full = evaluate(ScriptedEngine([["nothing"] * 2]), [Problem("q", "1", "a")], ProblemScorer(None), n=2)
    empty = evaluate(ScriptedEngine([]), [], ProblemScorer(None), n=2)
    assert sorted(empty["overall"]) == sorted(full["overall"])
    assert empty["overall"]["problems"] == 0

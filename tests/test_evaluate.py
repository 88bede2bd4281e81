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

    def generate(self, prompts, params, stream_ids=None, progress=None):
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


def test_a_problems_samples_do_not_depend_on_the_slice_it_is_in():
    """Ranks evaluate problems[rank::world]; seeded by global problem ids, the samples (and so the
    metrics) are those of one process evaluating everything, for world sizes 1, 2 and 3."""
    from helpers import tiny_hf_model

    from treepo import Engine, SamplingParams

    eng = Engine.from_model(tiny_hf_model("llama3_rope_gqa3", vocab=160, layers=2), num_pages=64, page_size=4)
    prompts = [[5 + i, 7, 9 + 2 * i] for i in range(6)]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=3)
    whole = eng.generate(prompts, params, stream_ids=list(range(6)))
    for world in (2, 3):
        for rank in range(world):
            part = eng.generate(prompts[rank::world], params, stream_ids=list(range(rank, 6, world)))
            for j, comps in zip(range(rank, 6, world), part):
                assert [c.token_ids for c in comps] == [c.token_ids for c in whole[j]], (world, rank, j)
    local = eng.generate(prompts[1::2], params)  # without ids: keyed on the index within the call
    assert [c.token_ids for c in local[0]] != [c.token_ids for c in whole[1]]
    with pytest.raises(ValueError, match="stream_ids has 2 entries for 6 prompts"):
        eng.generate(prompts, params, stream_ids=[0, 1])

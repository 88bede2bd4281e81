"""The reward of a response to a training or evaluation Problem, with the user's function or ours.

`ProblemScorer` is the one place where rollouts and evaluation turn responses into rewards:
`--reward_fn module:function` (fn(response_text, sample) -> float) when given, else the built-in
`problem_reward` (the reasoning-gym task's own checker for gym problems, math verification of the
final answer otherwise). Every call runs under score_batch's deadline; a failure scores -1.
"""
from __future__ import annotations

import importlib

from ..data import Problem
from .reward_fns import gym_reward, math_reward
from .scoring import score_batch


def problem_sample(p: Problem, response_ids: list[int] | None = None) -> dict:
    """The `sample` dict a reward function receives (see rewards.RewardFn)."""
    return {"answer": p.answer, "gym_entry": p.gym_entry["entry"] if p.gym_entry else None, "source": p.source,
            "response_ids": list(response_ids) if response_ids is not None else None}


def problem_reward(text: str, sample: dict) -> float:
    """+1 / -1: the gym task's own checker when the problem has one, else math verification."""
    if sample.get("gym_entry"):
        return gym_reward(text, sample["gym_entry"])
    return math_reward(text, sample["answer"])


def load_reward_fn(spec: str):
    """The function named by "module:function" (module importable from sys.path)."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"reward_fn={spec!r}; expected 'module:function', e.g. 'my_rewards:score'")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"reward_fn={spec!r}: cannot import module {mod!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward_fn={spec!r}: module {mod!r} has no function {name!r}")
    return fn


class ProblemScorer:
    """Scores responses to problems; `reward_fn` is "module:function" or None for problem_reward."""

    def __init__(self, reward_fn: str | None = None, timeout_s: float | None = 10.0):
        self.fn = load_reward_fn(reward_fn) if reward_fn else problem_reward
        self.timeout_s = timeout_s

    def score(self, texts: list[str], problems: list[Problem],
              response_ids: list[list[int]]) -> tuple[list[float], list[float], int]:
        """(rewards, accuracies, failures) for texts[i] answering problems[i]."""
        samples = [problem_sample(p, ids) for p, ids in zip(problems, response_ids)]
        return score_batch(self.fn, texts, samples, timeout_s=self.timeout_s)

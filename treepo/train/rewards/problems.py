"""The reward of a response to a training or evaluation Problem, with the user's function or ours.

`ProblemScorer` is the one place where rollouts and evaluation turn responses into rewards:
`--reward_fn module:function` (fn(response_text, sample) -> float) when given, else the built-in
`problem_reward` (the reasoning-gym task's own checker for gym problems, math verification of the
final answer otherwise). A user's function runs in a worker process killed at score_batch's
deadline; the built-in runs in this process and bounds its own slow parts (math-verify and the gym
checkers run in worker processes with the same deadline). A failure scores -1.
"""
from __future__ import annotations

import functools

from ..data import Problem
from .reward_fns import gym_reward, math_reward
from .scoring import load_reward_fn, parse_spec, score_batch, start_workers

__all__ = ["problem_sample", "problem_reward", "load_reward_fn", "ProblemScorer"]


def problem_sample(p: Problem, response_ids: list[int] | None = None) -> dict:
    """The `sample` dict a reward function receives (see rewards.RewardFn)."""
    return {"answer": p.answer, "gym_entry": p.gym_entry["entry"] if p.gym_entry else None, "source": p.source,
            "response_ids": list(response_ids) if response_ids is not None else None}


def problem_reward(text: str, sample: dict, timeout_s: float | None = 5.0) -> float:
    """+1 / -1: the gym task's own checker when the problem has one, else math verification
    (each check under a deadline of timeout_s seconds, in its worker process)."""
    if sample.get("gym_entry"):
        return gym_reward(text, sample["gym_entry"], timeout_s)
    return math_reward(text, sample["answer"], timeout_s)


class ProblemScorer:
    """Scores responses to problems; `reward_fn` is "module:function" or None for problem_reward.

    reward_fn's calls run in `workers` worker processes, each under a deadline of timeout_s
    seconds; the workers start here and import it (only they do), so a bad spec is a ValueError
    before any model loads. timeout_s=None: reward_fn is imported and called in this thread,
    unbounded. The built-in's checks get the same deadline."""

    def __init__(self, reward_fn: str | None = None, timeout_s: float | None = 10.0, workers: int = 1):
        if reward_fn:
            parse_spec(reward_fn)
            if timeout_s is None:
                load_reward_fn(reward_fn)
            else:
                start_workers(reward_fn, workers)
        self.spec, self.timeout_s, self.workers = reward_fn or None, timeout_s, workers

    def score(self, texts: list[str], problems: list[Problem],
              response_ids: list[list[int]]) -> tuple[list[float], list[float], int]:
        """(rewards, accuracies, failures) for texts[i] answering problems[i]."""
        samples = [problem_sample(p, ids) for p, ids in zip(problems, response_ids)]
        if self.spec is None:
            fn = functools.partial(problem_reward, timeout_s=self.timeout_s)
            return score_batch(fn, texts, samples, timeout_s=None)
        return score_batch(self.spec, texts, samples, timeout_s=self.timeout_s, workers=self.workers)

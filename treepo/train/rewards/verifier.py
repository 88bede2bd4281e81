"""math-verify and reasoning-gym's checkers, called in worker processes killed at a deadline.

Why not a plain call to math_verify.verify:
- math-verify's timeouts use SIGALRM: with a timeout set it raises ValueError in any non-main
  thread, and its TimeoutException subclasses BaseException, so `except Exception` misses it
  (verl PR 5635: Ray workers silently scored 0 on MATH). checks.py calls it with its timeouts
  off, inside a worker process (worker.py, the same mechanism as user reward functions) that is
  killed at the deadline: sympy can loop for minutes on answers like 9^{9^{9^{9}}}, and a thread
  cannot be stopped. So math_reward works from any thread and never hangs a training step.
  Some reasoning-gym checkers parse answers with sympy too: they get the same treatment.
- math-verify's `verify` is asymmetric: the gold answer goes first.
One worker per checker per Python process, started on first use (its imports, ~1-2 s, are not
counted against a call's deadline) and replaced after a timeout. Callers take turns (a call is
milliseconds); the wait for the turn and the call are each bounded by the caller's timeout.
See docs/training.md section 5.
"""
from __future__ import annotations

import os
import sys

from .worker import RewardTimeout, WorkerError, WorkerPool, WorkerStartError

CHECKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checks.py")
_math_verify = WorkerPool(f"{CHECKS}:math_verify_equal", preload=("math_verify",), name="math-verify")
_gym = WorkerPool(f"{CHECKS}:gym_score", preload=("reasoning_gym",), name="reasoning-gym checker")


def _run(pool: WorkerPool, args: tuple, timeout_s: float | None, what: str) -> float:
    try:
        res = pool.run([args], timeout_s, wait_s=timeout_s)[0]
    except WorkerStartError as e:
        raise RuntimeError(f"{e}; is {pool.preload[0]} installed for {sys.executable}?") from None
    if isinstance(res, RewardTimeout):
        raise RewardTimeout(f"{pool.name} took over {timeout_s}s on {what}; worker killed (a new one is starting)")
    if isinstance(res, WorkerError):
        raise RuntimeError(f"{pool.name} failed on {what}: {res}")
    return res


def math_verify(gold: str, pred: str, timeout_s: float | None = 5.0) -> bool:
    """verify(parse(gold), parse(pred)) in the math-verify worker, under a deadline of timeout_s seconds.

    Raises RewardTimeout past the deadline (the worker is killed and replaced) and RuntimeError
    when math-verify fails or its worker cannot start."""
    return _run(_math_verify, (gold, pred), timeout_s, f"gold={gold[:80]!r}, pred={pred[:80]!r}") > 0


def gym_score(name: str, answer: str, entry: dict, timeout_s: float | None = 5.0) -> float:
    """reasoning-gym dataset `name`'s score_answer(answer, entry) in [0, 1], in its worker; raises as
    math_verify does."""
    return _run(_gym, (name, answer, entry), timeout_s, f"{name} answer={answer[:80]!r}")

"""Batch scoring: run any reward function under a per-call deadline, and never fail the step.

Why: a reward function can raise, return NaN, or hang (sympy can loop for minutes on answers
like 9^{9^{9^{9}}}). One bad response must not stop a training step, so score_batch runs each
call in a worker thread with a deadline; an exception or overrun scores -1 (accuracy 0), is
counted, and the batch goes on. A thread cannot be killed, so an overrunning call is abandoned
and a fresh thread serves the rest. Signal-based timeouts (SIGALRM) are no substitute: they work
only in the main thread. See docs/training.md section 5.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class RewardTimeout(TimeoutError):
    """A verification or reward call ran past its deadline."""


class RewardFn(Protocol):
    """A reward function: `fn(response_text, sample) -> float`.

    response_text: the decoded response (special tokens skipped). sample: a dict with at least
    "answer" (gold answer text) and possibly "gym_entry" (a reasoning-gym item, else None),
    "source", "response_ids". Return a finite float; reward > 0 counts as correct (accuracy 1).
    Under score_batch it runs in a worker thread with a deadline: do not use signal-based
    timeouts inside it (math_reward is safe); an exception or overrun scores -1.
    """

    def __call__(self, response_text: str, sample: dict) -> float: ...


class _Caller:
    """A daemon thread running calls one at a time; abandoned (never joined) when a call overruns."""

    def __init__(self):
        self.jobs: list = []
        self.cv = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="treepo-reward").start()

    def submit(self, fn, args) -> tuple[list, threading.Event]:
        box, done = [], threading.Event()
        with self.cv:
            self.jobs.append((fn, args, box, done))
            self.cv.notify()
        return box, done

    def stop(self):
        with self.cv:
            self.jobs.append(None)
            self.cv.notify()

    def _loop(self):
        while True:
            with self.cv:
                while not self.jobs:
                    self.cv.wait()
                job = self.jobs.pop(0)
            if job is None:
                return
            fn, args, box, done = job
            box.append(_call(fn, args))
            done.set()


def _call(fn, args) -> tuple[bool, object]:
    try:
        return True, fn(*args)
    except BaseException as e:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException
        return False, e


def score_batch(fn: RewardFn, texts: list[str], samples: list[dict],
                timeout_s: float | None = 10.0) -> tuple[list[float], list[float], int]:
    """Score every response; never raises because of the reward function.

    fn(texts[i], samples[i]) -> float per item, each call under a deadline of `timeout_s` seconds
    (None: no deadline, calls run in this thread). A call that raises (any exception, including
    BaseException subclasses such as math-verify's TimeoutException; KeyboardInterrupt and
    SystemExit propagate), overruns (it is abandoned: a thread cannot be killed), or returns a
    non-finite / non-numeric value scores -1.0 with accuracy 0 and counts in `failures`; a
    warning names the first failure. Accuracy is 1.0 where reward > 0 else 0.0. Calls run one
    after another: the worst case is len(texts) * timeout_s.

    Returns (rewards [N] floats, accuracies [N] floats, failures int).
    """
    if len(texts) != len(samples):
        raise ValueError(f"score_batch got {len(texts)} texts but {len(samples)} samples")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s}; must be > 0 or None")
    rewards, failures, first = [], 0, None
    caller = None
    try:
        for text, sample in zip(texts, samples):
            if timeout_s is None:
                ok, val = _call(fn, (text, sample))
            else:
                caller = caller or _Caller()
                box, done = caller.submit(fn, (text, sample))
                if done.wait(timeout_s):
                    ok, val = box[0]
                else:
                    caller.stop()  # it exits after the stuck call, if that ever returns
                    caller = None
                    ok, val = False, RewardTimeout(f"reward function ran past timeout_s={timeout_s}")
            err = None if ok else val
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise err
            if err is None:
                try:
                    val = float(val)
                    if not math.isfinite(val):
                        raise ValueError(f"reward {val} is not finite")
                except (TypeError, ValueError) as e:
                    err = e
            if err is not None:
                failures += 1
                first = first or f"{type(err).__name__}: {err}"
                val = -1.0
            rewards.append(val)
    finally:
        if caller is not None:
            caller.stop()
    if failures:
        log.warning("%d/%d reward calls failed (scored -1); first: %s", failures, len(texts), first)
    return rewards, [1.0 if r > 0 else 0.0 for r in rewards], failures

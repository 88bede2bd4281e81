"""Batch scoring: run a reward function under a per-call deadline, and never fail the step.

Why: a reward function can raise, call sys.exit, return NaN or 1e308, or hang in a CPU loop.
One bad response must not stop a training step, so score_batch runs each call in a worker
process (worker.py) that is killed and replaced when the call overruns; an exception, an exit,
an overrun or a reward that is not a finite number within +-MAX_ABS_REWARD scores -1
(accuracy 0), is counted, and its reason is logged. A thread would not do: it cannot be killed,
and a spinning one starves the trainer of the GIL. See docs/training.md section 5.
"""
from __future__ import annotations

import importlib
import logging
import math
import sys
import threading
from typing import Protocol

from .worker import RewardTimeout, WorkerError, WorkerExited, WorkerPool, WorkerStartError

log = logging.getLogger(__name__)

# A larger |reward| is a bug, not a signal: 1e308 makes the group's mean inf and every advantage NaN
# (float32 overflows at 3.4e38, its square at 1.8e19).
MAX_ABS_REWARD = 1e6

__all__ = ["RewardFn", "RewardTimeout", "MAX_ABS_REWARD", "score_batch", "parse_spec", "load_reward_fn",
           "start_workers", "close_workers"]


class RewardFn(Protocol):
    """A reward function: `fn(response_text, sample) -> float`.

    response_text: the decoded response (special tokens skipped). sample: a dict with at least
    "answer" (gold answer text) and possibly "gym_entry" (a reasoning-gym item, else None),
    "source", "response_ids". Return a finite number with |reward| <= MAX_ABS_REWARD; reward > 0
    counts as correct (accuracy 1). Under score_batch with a deadline it runs in a worker process
    that imports it by name: it must be a module-level function of an importable module.
    """

    def __call__(self, response_text: str, sample: dict) -> float: ...


def parse_spec(spec: str) -> tuple[str, str]:
    """("module", "function") from "module:function"; ValueError naming the expected form."""
    mod, sep, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not mod or not name:
        raise ValueError(f"reward_fn={spec!r}; expected 'module:function', e.g. 'my_rewards:score'")
    return mod, name


def load_reward_fn(spec: str):
    """The function named by "module:function" (module importable from sys.path), imported here."""
    mod, name = parse_spec(spec)
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"reward_fn={spec!r}: cannot import module {mod!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward_fn={spec!r}: module {mod!r} has no function {name!r}")
    return fn


def _spec_of(fn) -> str:
    """fn's "module:function" name, by which a worker process imports it."""
    if isinstance(fn, str):
        parse_spec(fn)
        return fn
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if mod and mod != "__main__" and getattr(sys.modules.get(mod), name, None) is fn:
        return f"{mod}:{name}"
    raise ValueError(f"score_batch(fn={fn!r}) with a deadline runs fn in a worker process, which imports it by "
                     "name: pass a module-level function of an importable module (or its 'module:function'), "
                     "or timeout_s=None to call it in this thread without a deadline")


_pools: dict[tuple[str, int], WorkerPool] = {}  # (spec, workers) -> its pool, kept between batches
_pools_lock = threading.Lock()


def _pool_for(fn, workers: int) -> WorkerPool:
    key = (_spec_of(fn), workers)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = WorkerPool(key[0], size=workers, name=f"reward_fn={key[0]!r}")
        return _pools[key]


def start_workers(fn: RewardFn | str, workers: int = 1):
    """Start score_batch's workers for fn now and wait until they have imported it (a few seconds if
    its module imports torch): a bad "module:function" fails here with a ValueError that names it,
    and the first batch does not wait for them. The module is imported only in the workers."""
    try:
        _pool_for(fn, workers).start()
    except WorkerStartError as e:
        raise ValueError(str(e)) from None


def close_workers():
    """Kill score_batch's worker processes (they are also killed at exit); new ones start on demand."""
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()


def _to_reward(val) -> float:
    if isinstance(val, (str, bytes, bytearray)):
        raise TypeError(f"returned a {type(val).__name__}, not a number: {val!r:.80}")
    val = float(val)
    if not math.isfinite(val) or abs(val) > MAX_ABS_REWARD:
        raise ValueError(f"reward {val!r} is not a finite number within +-{MAX_ABS_REWARD:g}")
    return val


def _call_here(fn, text: str, sample: dict):
    try:
        return fn(text, sample)
    except KeyboardInterrupt:  # a request to stop is not a failed reward
        raise
    except BaseException as e:  # noqa: BLE001 - math-verify's TimeoutException, and sys.exit
        return e


def _reason(err: BaseException) -> str:
    """"Type: message"; for a call that raised in a worker, the type is the one it raised there."""
    if isinstance(err, WorkerError) and not isinstance(err, WorkerExited):
        return str(err)
    return f"{type(err).__name__}: {err}"


def score_batch(fn: RewardFn | str, texts: list[str], samples: list[dict], timeout_s: float | None = 10.0,
                workers: int = 1) -> tuple[list[float], list[float], int]:
    """Score every response; never raises because of the reward function.

    fn(texts[i], samples[i]) -> float per item. fn: "module:function" or a module-level function.
    With a deadline (timeout_s seconds per call) the calls run in `workers` worker processes that
    import fn by name with this process's sys.path; they are kept between batches (one pool per
    fn and size), a call that overruns has its worker killed and replaced, and they are killed
    at exit (or by close_workers). With timeout_s=None the calls run in this thread and fn may
    be any callable (a lambda, a closure): nothing bounds them.

    A call that raises (any exception, SystemExit included; KeyboardInterrupt in this thread
    propagates), exits its worker, overruns, or returns a non-number or a number that is not
    finite or has |reward| > MAX_ABS_REWARD scores -1.0 with accuracy 0 and counts in
    `failures`; one warning gives their count and, per type of failure, its count and the
    first one's reason. Accuracy is 1.0
    where reward > 0 else 0.0. The worst case is ceil(len(texts) / workers) * timeout_s plus
    the start-up of replacement workers.

    Returns (rewards [N] floats, accuracies [N] floats, failures int). Raises ValueError for bad
    arguments and worker.WorkerStartError when a worker cannot import fn.
    """
    if len(texts) != len(samples):
        raise ValueError(f"score_batch got {len(texts)} texts but {len(samples)} samples")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s}; must be > 0 or None")
    if not texts:
        return [], [], 0
    if timeout_s is None:
        call = load_reward_fn(fn) if isinstance(fn, str) else fn
        results = [_call_here(call, t, s) for t, s in zip(texts, samples)]
    else:
        results = _pool_for(fn, workers).run(list(zip(texts, samples)), timeout_s)
    rewards, kinds = [], {}  # failure type -> [count, the first one's reason]
    for i, val in enumerate(results):
        err = val if isinstance(val, BaseException) else None
        if err is None:
            try:
                val = _to_reward(val)
            except (TypeError, ValueError, OverflowError) as e:
                err = e
        if err is not None:
            reason = _reason(err)
            kinds.setdefault(reason.partition(":")[0], [0, f"response {i}: {reason}"])[0] += 1
            val = -1.0
        rewards.append(val)
    failures = sum(n for n, _ in kinds.values())
    if failures:
        log.warning("%d/%d reward calls failed (scored -1): %s", failures, len(texts),
                    "; ".join(f"{n}x, first {first}" for n, first in kinds.values()))
    return rewards, [1.0 if r > 0 else 0.0 for r in rewards], failures

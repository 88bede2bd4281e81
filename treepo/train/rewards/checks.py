"""The checks of the built-in rewards that run inside worker processes (verifier.py, worker.py).

Loaded there by file path, so this file imports nothing of treepo (whose package imports torch):
only the checker's own library, which the worker preloads before it counts as started.
"""
import functools
import logging

logging.disable(logging.WARNING)  # only ever loaded in a worker: math-verify warns on every unparsable answer


def math_verify_equal(gold: str, pred: str) -> bool:
    """math-verify's verify(parse(gold), parse(pred)) - gold first - with its SIGALRM timeouts off:
    they raise in any non-main thread, and the worker's deadline bounds the call instead."""
    from math_verify import parse, verify

    return bool(verify(parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None), timeout_seconds=None))


@functools.lru_cache(maxsize=None)
def _gym_scorer(name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


def gym_score(name: str, answer: str, entry: dict) -> float:
    """The reasoning-gym dataset `name`'s own score_answer(answer, entry), in [0, 1]; None -> 0."""
    score = _gym_scorer(name)(answer, entry)
    return 0.0 if score is None else float(score)

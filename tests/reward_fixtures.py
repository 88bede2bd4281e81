"""Reward functions that misbehave on purpose, for tests/test_rewards.py: they run in worker
processes, which import this module by name (standard library only, so they start in ~50 ms)."""
import os
import sys
import time


def by_text(text, sample):
    """What the response text asks for: an exception, an exit, a bad value, a hang, or 0.5."""
    if text == "boom":
        raise KeyError("no such field")
    if text == "exit":
        sys.exit(3)
    if text == "die":
        os._exit(7)
    if text == "spin":
        while True:  # a CPU loop: it never gives up the GIL for long, and never returns
            pass
    if text == "sleep":
        time.sleep(600)
    bad = {"huge": 1e308, "nan": float("nan"), "inf": float("inf"), "str": "0.5", "none": None, "big": 10 ** 400}
    if text in bad:
        return bad[text]
    if text == "print":  # prints must not corrupt the worker's pipe
        print("hello from the reward function")
        sys.stdout.flush()
    return 0.5


def even_ids(text, sample):
    """In [-1, 1]: as trainer_fixtures.even_token_reward, without its torch import."""
    ids = sample["response_ids"]
    return 2.0 * sum(t % 2 == 0 for t in ids) / max(len(ids), 1) - 1.0

"""Rewards (docs/algorithm.md section 4): answer extraction, a table of tricky answers verified with
math-verify + the normalised compare, failure-proof batch scoring in this thread (exceptions,
exits, bad values; the worker processes are tested in test_reward_workers.py), a hung sympy,
use from non-main threads, and reasoning-gym's own checker."""
import json
import logging
import os
import sys
import threading
import time

import pytest

from treepo.train.rewards import (
    RewardTimeout,
    answers_match,
    extract_answer,
    gym_reward,
    math_reward,
    normalize_answer,
    score_batch,
    verifier,  # its worker pools: the sympy-bomb test checks the worker is replaced
)

# --------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} hmm, no: \\boxed{2}", "2"),  # the last box
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\fbox{7}", "7"),
    ("Put it in \\boxed{}. The answer is 5.", "5"),  # empty box (echoed instruction) skipped
    ("The answer is 3.5", "3.5"),
    ("the final answer is: $\\frac{3}{4}$. Because ...", "\\frac{3}{4}"),
    ("The answer is: **12 cm**.", "12 cm"),
    ("**Final Answer:** 42", "42"),
    ("Answer: -7\nthat is all", "-7"),
    ("work\n#### 1,000", "1,000"),
    ("<answer>8</answer>", "8"),
    ("The answer is 4.\nWait, recheck. Answer: 6", "6"),  # the last form wins
    ("Answer: 3 ... and \\boxed{9}", "9"),  # a box beats the fallbacks
    ("\\boxed{12", None),  # unclosed box, no fallback
    ("I think it is 42", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("raw, norm", [
    ("\\dfrac12", "1/2"), ("\\tfrac{3}{4}", "3/4"), ("-\\frac{1}{2}", "-1/2"), ("12 \\text{ cm}", "12"),
    ("5 apples", "5"), ("3 x", "3x"), ("10\\%", "10%"), ("1,000", "1000"), ("1,2", "1,2"),
    ("\\$1,000.50", "1000.50"), ("90^\\circ", "90"), ("$ 7 $", "7"), ("Yes", "yes"), ("\\text{B}", "B"),
    ("\\left( 1, 2 \\right)", "(1,2)"), ("\u22123", "-3"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


# --------------------------------------------------------------------------- the tricky table
# (response, gold, expected reward). Rows marked MV need math-verify (sympy); the others are
# settled by the normalised compare alone.
TABLE = [
    ("... \\boxed{0.5}", "1/2", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac12}", "0.5", 1.0),
    ("\\boxed{0.50}", "\\frac12", 1.0),
    ("\\boxed{0.49}", "1/2", -1.0),  # MV
    ("The length is \\boxed{12 \\text{ cm}}.", "12", 1.0),
    ("\\boxed{12\\text{cm}^2}", "12", 1.0),  # MV (units with an exponent)
    ("\\boxed{10\\%}", "0.1", 1.0),
    ("\\boxed{0.1}", "10\\%", 1.0),
    ("\\boxed{10%}", "10", 1.0),
    ("\\boxed{\\frac{1}{\\frac{1}{2}}}", "2", 1.0),  # MV, nested braces
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # MV
    ("\\boxed{x + 1}", "1+x", 1.0),  # MV
    ("\\boxed{3x}", "3", -1.0),  # MV
    ("so the answer is 42.", "42", 1.0),  # no box
    ("#### 1,000", "1000", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{\\$1,000}", "1000", 1.0),
    ("Answer: -3", "-3", 1.0),
    ("\\boxed{3}", "-3", -1.0),  # negative numbers keep their sign
    ("\\boxed{-3}", "3", -1.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("\\boxed{2.0}", "2", 1.0),
    ("\\boxed{1} wait, \\boxed{2}", "2", 1.0),
    ("\\boxed{1} wait, \\boxed{2}", "1", -1.0),
    ("The result is 42, I think.", "42", -1.0),  # no final-answer form at all
    ("", "42", -1.0),
    ("\\boxed{7}", 7, 1.0),  # a non-string gold
]


@pytest.mark.parametrize("response, gold, expected", TABLE,
                         ids=[f"{i}:{r[:24]}|{g}" for i, (r, g, _) in enumerate(TABLE)])
def test_math_reward_table(response, gold, expected):
    assert math_reward(response, gold) == expected


def test_answers_match_is_exact_for_numbers():
    assert answers_match("1/3", "0.3333333") is False  # exact compare; math-verify decides rounding
    assert answers_match("1/2", "0.50") is True
    assert answers_match("abc", "ABC") is True


def test_math_verify_default_timeouts_fail_in_threads():
    """The premise (docs/training.md section 5): math-verify with its default signal timeouts cannot run
    off the main thread; math_reward can."""
    from math_verify import parse, verify

    got = {}

    def default_call():
        try:
            got["default"] = verify(parse("$\\frac{1}{2}$"), parse("$0.5$"))
        except BaseException as e:  # noqa: BLE001
            got["default"] = e

    def ours():
        got["ours"] = math_reward("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}")  # needs sympy

    for f in (default_call, ours):
        t = threading.Thread(target=f)
        t.start()
        t.join(60)
    assert isinstance(got["default"], ValueError) or got["default"] is False  # installed version: ValueError
    assert got["ours"] == 1.0


# --------------------------------------------------------------------------- failures and timeouts

def _sample(answer):
    return {"answer": answer, "gym_entry": None}


def test_score_batch_in_this_thread_counts_failures_and_continues(caplog):
    """timeout_s=None: any callable, called here; a failure scores -1 and the batch goes on."""
    def fn(text, sample):
        if text == "boom":
            raise KeyError("no such field")
        if text == "base":
            from math_verify.errors import TimeoutException
            raise TimeoutException("a BaseException subclass")
        if text == "exit":
            sys.exit(3)
        bad = {"nan": float("nan"), "str": "0.5", "huge": 1e308, "none": None}
        if text in bad:
            return bad[text]
        return math_reward(text, sample["answer"])

    texts = ["\\boxed{4}", "boom", "\\boxed{5}", "base", "nan", "str", "exit", "huge", "none", "The answer is 4"]
    with caplog.at_level(logging.WARNING, logger="treepo.train.rewards.scoring"):
        r, acc, failures = score_batch(fn, texts, [_sample("4")] * len(texts), timeout_s=None)
    assert r == [1.0, -1.0, -1.0] + [-1.0] * 6 + [1.0]
    assert acc == [1.0, 0.0, 0.0] + [0.0] * 6 + [1.0]
    assert failures == 7
    msg = caplog.text
    # per type of failure: its count and the first one's reason (nan and 1e308 are both ValueErrors)
    assert "7/10 reward calls failed (scored -1): 1x, first response 1: KeyError: 'no such field'; " \
           "1x, first response 3: TimeoutException: a BaseException subclass; 2x, first response 4: " \
           "ValueError: reward nan is not a finite number within +-1e+06; 2x, first response 5: " \
           "TypeError: returned a str, not a number: '0.5'; 1x, first response 6: SystemExit: 3" in msg, msg


def test_score_batch_arguments_and_what_propagates():
    from math_verify.errors import TimeoutException

    def fn(t, s):
        if t == "x":
            return 1 / 0
        if t == "t":
            raise TimeoutException("a BaseException: `except Exception` would miss it")
        return -0.5

    r, acc, failures = score_batch(fn, ["x", "y", "t"], [{}, {}, {}], timeout_s=None)
    assert r == [-1.0, -0.5, -1.0] and acc == [0.0, 0.0, 0.0] and failures == 2
    with pytest.raises(KeyboardInterrupt):  # a request to stop is not a failed reward
        score_batch(lambda t, s: (_ for _ in ()).throw(KeyboardInterrupt()), ["a"], [{}], timeout_s=None)
    with pytest.raises(ValueError, match="2 texts but 1 samples"):
        score_batch(lambda t, s: 1.0, ["a", "b"], [{}])
    with pytest.raises(ValueError, match="timeout_s=0"):
        score_batch(lambda t, s: 1.0, ["a"], [{}], timeout_s=0)
    # a deadline needs a worker process, which imports fn by name: a lambda or a closure cannot go
    with pytest.raises(ValueError, match="imports it by name.*timeout_s=None"):
        score_batch(lambda t, s: 1.0, ["a"], [{}], timeout_s=5)
    with pytest.raises(ValueError, match="imports it by name"):
        score_batch(fn, ["a"], [{}], timeout_s=5)
    assert score_batch(lambda t, s: 1.0, [], []) == ([], [], 0)
    assert score_batch("reward_fixtures:by_text", ["ok", "nan"], [{}, {}], timeout_s=None) == \
        ([0.5, -1.0], [1.0, 0.0], 1)  # a spec, called here


def test_math_reward_on_a_sympy_bomb_returns_promptly():
    """9^{9^{9^{9}}} keeps sympy busy for minutes (math-verify 0.9.0). math_reward gives up at
    its deadline, its worker is killed (the process is gone) and replaced; under score_batch that
    is a counted failure scoring -1; the next call works."""
    assert math_reward("\\boxed{x + 1}", "1+x") == 1.0  # the worker is up
    pool = verifier._math_verify
    (old,), restarts = pool.pids(), pool.restarts
    t0 = time.perf_counter()
    r, _, failures = score_batch(lambda t, s: math_reward(t, s["answer"], timeout_s=1.0),
                                 ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{2}{4}}"], [_sample("1"), _sample("0.5")],
                                 timeout_s=None)
    assert time.perf_counter() - t0 < 15.0
    assert r == [-1.0, 1.0] and failures == 1
    assert pool.restarts == restarts + 1 and pool.pids() != [old]
    assert not os.path.exists(f"/proc/{old}")  # killed and reaped: not spinning on
    with pytest.raises(RewardTimeout, match=r"math-verify took over 0.5s on gold=.*boxed\{1\}"):
        verifier.math_verify("\\boxed{1}", "\\boxed{9^{9^{9^{9}}}}", timeout_s=0.5)
    assert math_reward("\\boxed{\\sqrt{4}}", "2") == 1.0


def test_math_reward_in_many_threads():
    results = {}

    def run(i):
        results[i] = math_reward(f"\\boxed{{\\frac{{{i}}}{{2}}}}", str(i / 2)) if i % 2 else \
            math_reward("\\boxed{x^2 - 1}", "(x-1)(x+1)")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: 1.0 for i in range(6)}


# --------------------------------------------------------------------------- reasoning-gym

@pytest.fixture(scope="module")
def gym_entries():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=5, seed=0, min_terms=2, max_terms=2, min_digits=1,
                                      max_digits=1, operators=["+"], allow_parentheses=False, allow_negation=False)
    return list(ds)


def test_gym_reward_uses_the_task_checker(gym_entries):
    for e in gym_entries:
        a, b = (int(x) for x in e["metadata"]["expression"].split(" + "))
        assert e["answer"] == str(a + b)
        assert gym_reward(f"{a} + {b} = {a + b}, so \\boxed{{{a + b}}}", e) == 1.0
        assert gym_reward(f"The answer is {a + b}.", e) == 1.0
        assert gym_reward(f"\\boxed{{{a + b + 1}}}", e) == -1.0
        assert gym_reward(f"it is {a + b}", e) == -1.0  # no final answer
    e = gym_entries[0]
    # partial credit from the checker (the gold is inside the answer) is not a success
    assert gym_reward(f"\\boxed{{{e['answer']} or 99}}", e) == -1.0
    # entries survive a JSON round trip (as when they are stored with the problems)
    assert gym_reward(f"\\boxed{{{e['answer']}}}", json.loads(json.dumps(e))) == 1.0
    with pytest.raises(ValueError, match="source_dataset"):
        gym_reward("\\boxed{1}", {"answer": "1"})
    # through score_batch with the trainer's sample layout
    samples = [{"answer": x["answer"], "gym_entry": x} for x in gym_entries[:2]]
    r, acc, failures = score_batch(lambda t, s: gym_reward(t, s["gym_entry"]),
                                   [f"\\boxed{{{gym_entries[0]['answer']}}}", "\\boxed{-5}"], samples, timeout_s=None)
    assert r == [1.0, -1.0] and acc == [1.0, 0.0] and failures == 0

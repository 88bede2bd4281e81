"""Rewards: +1 for a correct final answer, -1 otherwise (TREEPO_SPEC.md section 4).

Why this file is more than a call to math-verify:
- The answer is the last complete \\boxed{...} (nested braces; text_rules), else the last
  "answer is X" / "Answer: X" / "#### X" / "<answer>X</answer>" form. A response without one
  of these scores -1: the model is not credited for a number that merely appears in its text.
- math-verify's `verify` is asymmetric: the gold answer goes first.
- math-verify's timeouts use SIGALRM: with a timeout set it raises ValueError in any non-main
  thread, and its TimeoutException subclasses BaseException, so `except Exception` misses it
  (verl PR 5635: Ray workers silently scored 0 on MATH). We call it with its timeouts off
  (`parsing_timeout=None`, `timeout_seconds=None`) inside a small worker process of our own that
  is killed at a deadline: sympy can loop for minutes on answers like 9^{9^{9^{9}}}, and a thread
  cannot be stopped. So math_reward works from any thread and never hangs a training step.
- A normalised string / exact-number compare runs first (fast path, and a fallback for the few
  forms math-verify misses).
- Task datasets with their own checker (reasoning-gym) use that checker: gym_reward.
- score_batch runs any reward function under a per-call deadline; an exception or timeout scores
  -1 (accuracy 0), is counted, and the batch goes on.
"""
from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from typing import Protocol

from treepo.rollout.text_rules import boxed_spans

log = logging.getLogger(__name__)

__all__ = ["extract_answer", "normalize_answer", "answers_match", "math_reward", "gym_reward", "RewardFn",
           "score_batch", "RewardTimeout"]


class RewardTimeout(TimeoutError):
    """A verification or reward call ran past its deadline."""


# ---------------------------------------------------------------------------- answer extraction

# Fallback forms, case-insensitive; the capture runs to the end of the line and is cleaned below.
#   "The answer is 42." / "the final answer is: $\frac12$"   ("answer is", optional colon)
#   "Answer: 42" / "**Final Answer:** 42"                     ("answer:")
#   "#### 42"                                                 (GSM8K)
#   "<answer>42</answer>"                                     (reasoning-gym's convention)
_FALLBACK = re.compile(
    r"\banswer\s*(?:is\b\s*:?|:)(?P<a>[^\n]*)"
    r"|####(?P<b>[^\n]*)"
    r"|<answer>(?P<c>.*?)</answer>",
    re.IGNORECASE | re.DOTALL)
_WRAPPERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _clean_fallback(s: str) -> str:
    s = s.strip()
    m = re.search(r"\.\s", s)  # a sentence ends there ("42. Because ..."); "3.5" is untouched
    if m:
        s = s[:m.start()]
    prev = None
    while s != prev:
        prev = s
        s = s.strip().lstrip(":").rstrip(".,;!").strip("*` ")
        for lo, hi in _WRAPPERS:
            if len(s) >= len(lo) + len(hi) and s.startswith(lo) and s.endswith(hi):
                s = s[len(lo):len(s) - len(hi)]
    return s


def extract_answer(text: str) -> str | None:
    """The final answer of a response, or None when it gives none.

    1. The content of the last non-empty complete \\boxed{...} / \\fbox{...} (nested braces).
       Empty boxes are skipped (models echo the instruction "put your answer in \\boxed{}").
    2. Else the last (by position) of: "answer is X" (also "answer is: X"), "Answer: X",
       "#### X", "<answer>X</answer>"; X runs to the end of its line, is cut at a sentence end
       (". "), and loses surrounding $...$, \\(...\\), **...** and a trailing period or comma.
    3. Else None (the reward is then -1).
    """
    if not isinstance(text, str):
        raise TypeError(f"response text must be str, got {type(text).__name__}")
    for s, e in reversed(boxed_spans(text)):
        content = text[text.index("{", s) + 1:e - 1].strip()
        if content:
            return content
    for m in reversed(list(_FALLBACK.finditer(text))):
        ans = _clean_fallback(next(g for g in m.groups() if g is not None))
        if ans:
            return ans
    return None


# ---------------------------------------------------------------------------- string compare

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\s*(?:\{([^{}]*)\}|(\w))\s*(?:\{([^{}]*)\}|(\w))")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/(?:\d+(?:\.\d*)?|\.\d+))?")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
# trailing unit words stripped after a number ("12 cm", "5 apples"); never one letter ("3 x")
_UNIT_TAIL = re.compile(r"^([+-]?[\d.,/]+)\s*((?:[a-zA-Z]{2,}\.?\s*)+)$")
_NOT_UNITS = {"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "exp"}


def normalize_answer(s: str) -> str:
    """A canonical string for comparing short final answers.

    Drops $, \\left/\\right, spacing commands, ^\\circ, a leading \\$; \\dfrac/\\tfrac -> \\frac;
    \\text{..}/\\mathrm{..}/\\mbox{..} -> their content; unit words after a number ("12 cm",
    "12 \\text{ cm}") -> the number; thousands commas (1,000 -> 1000; "1,2" is left alone);
    \\frac{a}{b} / \\frac12 -> a/b; all spaces removed; "%" and "\\%" -> "%" at the end; plain
    words casefolded ("Yes" -> "yes"). Numbers are compared by value in answers_match.
    """
    s = s.strip().replace("\u2212", "-")
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                 ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\ ", " "), ("~", " "),
                 ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("{,}", ","),
                 ("\\$", ""), ("$", ""), ("\\%", "%"), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        s = s.replace(a, b)
    prev = None
    while prev != s:  # inside-out for nested \text / \frac
        prev = s
        s = _TEXT_CMD.sub(lambda m: m.group(1), s)
        s = _FRAC.sub(lambda m: f"{_paren(m.group(1) or m.group(2))}/{_paren(m.group(3) or m.group(4))}", s)
    s = s.strip()
    percent = s.endswith("%")
    s = s.rstrip("%").strip()
    m = _UNIT_TAIL.match(s)
    if m and not set(m.group(2).lower().split()) & _NOT_UNITS:
        s = m.group(1)
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"[A-Za-z]{2,}", s):
        s = s.casefold()
    return s + ("%" if percent else "")


def _paren(x: str) -> str:
    x = x.strip()
    return x if re.fullmatch(r"[+-]?[\w.]+", x) else f"({x})"


def _as_number(s: str) -> Fraction | None:
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(gold: str, pred: str) -> bool:
    """Normalised string compare, then exact value compare for plain numbers (1/2 == 0.5 == 0.50).

    A percentage matches its value either way: "10%" equals "10" and "0.1"."""
    g, p = normalize_answer(gold), normalize_answer(pred)
    if g == p:
        return True
    gv, pv = _as_number(g.rstrip("%")), _as_number(p.rstrip("%"))
    if gv is None or pv is None:
        return False
    cands_g = {gv, gv / 100} if g.endswith("%") else {gv}
    cands_p = {pv, pv / 100} if p.endswith("%") else {pv}
    return bool(cands_g & cands_p)


def _distinct_integers(gold: str, pred: str) -> bool:
    """Both are plain integers and differ: no verifier can call them equal (skips math-verify)."""
    g, p = normalize_answer(gold), normalize_answer(pred)
    return bool(re.fullmatch(r"[+-]?\d+", g) and re.fullmatch(r"[+-]?\d+", p)) and int(g) != int(p)


# ---------------------------------------------------------------------------- math-verify worker

_WORKER = r"""
import json, logging, sys
logging.disable(logging.WARNING)
from math_verify import parse, verify
from math_verify.errors import TimeoutException
out = sys.stdout
out.write("ready\n"); out.flush()
for line in sys.stdin:
    req = json.loads(line)
    try:  # gold first; timeouts off: the parent kills this process at its deadline
        ok = verify(parse(req["gold"], parsing_timeout=None), parse(req["pred"], parsing_timeout=None),
                    timeout_seconds=None)
        res = {"ok": bool(ok)}
    except (Exception, TimeoutException) as e:
        res = {"error": repr(e)[:500]}
    out.write(json.dumps(res) + "\n"); out.flush()
"""


class _Verifier:
    """One math-verify worker process per Python process, restarted after a timeout or a fork.

    Thread-safe: callers take turns (each call is milliseconds). The wait for the turn and the
    verification are each bounded by the caller's timeout; the worker's start-up (an import of
    sympy, ~0.5 s) is not counted. POSIX only (select on a pipe)."""

    START_TIMEOUT_S = 120.0

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.pid = None  # the process that owns self.proc
        self.buf = b""
        self.restarts = 0

    def _after_fork(self):
        """In a forked child: the parent's worker and lock state are not ours."""
        self.lock = threading.Lock()
        self.proc, self.pid, self.buf = None, None, b""

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        self.pid, self.buf = os.getpid(), b""
        line = self._readline(time.monotonic() + self.START_TIMEOUT_S)
        if line != "ready":
            self._kill()
            raise RuntimeError(f"math-verify worker did not start (got {line!r}); is math-verify installed "
                               f"for {sys.executable}?")

    def _readline(self, deadline: float) -> str | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died: reap it so its exit code is known
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def _kill(self):
        if self.proc is not None and self.pid == os.getpid():
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self):
        got = self.lock.acquire(timeout=1.0)  # an abandoned caller may hold it; kill regardless
        try:
            self._kill()
        finally:
            if got:
                self.lock.release()

    def verify(self, gold: str, pred: str, timeout_s: float) -> bool:
        if not self.lock.acquire(timeout=timeout_s):
            raise RewardTimeout(f"math-verify busy for {timeout_s}s (another thread's call)")
        try:
            if self.proc is None or self.pid != os.getpid() or self.proc.poll() is not None:
                self.proc = None  # after a fork the pipes belong to the parent: start our own
                self._start()
            deadline = time.monotonic() + timeout_s
            self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
            line = self._readline(deadline)
            if line is None:
                code = self.proc.poll()
                self._kill()
                self.restarts += 1
                if code is not None:
                    raise RuntimeError(f"math-verify worker exited with code {code} on gold={gold[:80]!r}, "
                                       f"pred={pred[:80]!r}")
                raise RewardTimeout(f"math-verify took over {timeout_s}s on gold={gold[:80]!r}, "
                                    f"pred={pred[:80]!r}; worker killed (a new one starts on the next call)")
            res = json.loads(line)
            if "error" in res:
                raise RuntimeError(f"math-verify failed on gold={gold[:80]!r}, pred={pred[:80]!r}: {res['error']}")
            return res["ok"]
        except RewardTimeout:
            raise
        except OSError as e:  # BrokenPipeError and friends: the worker is gone
            self._kill()
            raise RuntimeError(f"math-verify worker died: {e!r}") from e
        finally:
            self.lock.release()


_verifier = _Verifier()
atexit.register(_verifier.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_verifier._after_fork)


def _boxed(s: str) -> str:
    return s if ("\\boxed" in s or "$" in s) else "\\boxed{" + s + "}"


# ---------------------------------------------------------------------------- rewards

def math_reward(response_text: str, gold: str, timeout_s: float = 5.0) -> float:
    """+1.0 if the response's final answer equals `gold`, else -1.0 (TREEPO_SPEC.md 4).

    answer = extract_answer(response_text); None -> -1. Equal if answers_match (normalised
    string / exact number compare, no sympy) or math-verify's verify(parse(gold), parse(answer))
    - gold first - with both wrapped in \\boxed{} so math-verify reads them as LaTeX. Two plain
    integers that differ are -1 without math-verify. Safe from any thread (see module docstring).

    Raises RewardTimeout when math-verify runs past `timeout_s` seconds (its worker is killed and
    restarted) and RuntimeError when math-verify itself fails; score_batch turns both into -1
    and counts them as failures.
    """
    if not isinstance(gold, str):
        gold = str(gold)
    pred = extract_answer(response_text)
    if pred is None:
        return -1.0
    if answers_match(gold, pred):
        return 1.0
    if _distinct_integers(gold, pred):
        return -1.0
    return 1.0 if _verifier.verify(_boxed(gold.strip()), _boxed(pred), timeout_s) else -1.0


@functools.lru_cache(maxsize=None)
def _gym_scorer(name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


def gym_reward(response_text: str, entry: dict) -> float:
    """+1.0 / -1.0 from a reasoning-gym task's own checker.

    entry: one item of a reasoning-gym dataset ({"question", "answer", "metadata":
    {"source_dataset": name, ...}}). The extracted answer (extract_answer; None -> -1) is scored
    with the dataset's `score_answer(answer, entry)`, which returns a score in [0, 1] (partial
    credit for some tasks); only a full score (>= 1.0) counts as correct: +1, else -1.
    """
    try:
        name = entry["metadata"]["source_dataset"]
    except (KeyError, TypeError):
        raise ValueError("gym entry needs entry['metadata']['source_dataset'] (a reasoning-gym dataset item); "
                         f"got {str(entry)[:200]}") from None
    answer = extract_answer(response_text)
    if answer is None:
        return -1.0
    score = _gym_scorer(name)(answer, entry)
    return 1.0 if score is not None and float(score) >= 1.0 else -1.0


# ---------------------------------------------------------------------------- batches

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

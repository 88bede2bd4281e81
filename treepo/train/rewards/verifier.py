"""math-verify, called in a worker process of our own that is killed at a deadline.

Why not a plain call to math_verify.verify:
- math-verify's timeouts use SIGALRM: with a timeout set it raises ValueError in any non-main
  thread, and its TimeoutException subclasses BaseException, so `except Exception` misses it
  (verl PR 5635: Ray workers silently scored 0 on MATH). We call it with its timeouts off
  (`parsing_timeout=None`, `timeout_seconds=None`) inside a small worker process that is killed
  at a deadline: sympy can loop for minutes on answers like 9^{9^{9^{9}}}, and a thread cannot
  be stopped. So math_reward works from any thread and never hangs a training step.
- math-verify's `verify` is asymmetric: the gold answer goes first.
See docs/training.md section 5.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

from .scoring import RewardTimeout

# The worker: one JSON request {"gold", "pred"} per stdin line -> one {"ok": bool} or {"error": str} line.
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

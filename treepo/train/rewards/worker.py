"""Run a function in child processes that are killed at a deadline: the one mechanism behind user
reward functions (scoring.py) and the built-in math-verify / reasoning-gym checks (verifier.py).

Why processes: a thread cannot be stopped. A reward function stuck in a CPU loop, or sympy on
9^{9^{9^{9}}}, runs on in its thread after the deadline and starves the trainer of the GIL (issue
12: 55 spinning threads after two steps, a run that never ends). A child process is killed
(SIGKILL, its process group) and a fresh one started in its place at once, so its start-up
overlaps the remaining calls. Signal-based timeouts (SIGALRM) are no substitute: they work only
in the main thread and cannot interrupt a C loop.

The child (_worker_main.py) imports the function by name, "module:function" or
"/path/file.py:function", with the parent's sys.path: only arguments and float results cross the
pipes (pickled). It dies with its parent (Linux's parent-death signal, a thread polling the
parent's pid, EOF on its pipe). That signal fires when the *thread* that started the child exits,
so children are started from the main thread or from one long-lived spawner thread. Children
are killed at exit, and when their pool is garbage-collected. POSIX only (select() on pipes).
See docs/training.md section 5.
"""
from __future__ import annotations

import math
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker_main.py")
START_TIMEOUT_S = 120.0  # a child's start-up (its imports: torch alone takes seconds) is no call's deadline
_HEADER = struct.Struct(">Q")  # each message: its length, then a pickle (see _worker_main.py)


class RewardTimeout(TimeoutError):
    """A call ran past its deadline (its worker was killed), or waited that long for its turn."""


class WorkerError(RuntimeError):
    """A call failed in its worker: the function raised or returned a non-number (the message
    starts with the exception's type, e.g. "SystemExit: 3"), or the worker exited during the call."""


class WorkerExited(WorkerError):
    """A call's worker exited during the call: os._exit, a signal (a crash), or out of memory."""


class WorkerStartError(RuntimeError):
    """A worker could not start: the function did not import, or the child exited or hung."""


class _Spawner:
    """Starts children from the main thread, or else from one daemon thread that never exits:
    the parent-death signal follows the starting thread, not the process."""

    def __init__(self):
        self.lock, self.jobs, self.thread = threading.Lock(), queue.SimpleQueue(), None

    def popen(self, argv: list[str]) -> subprocess.Popen:
        if os.name != "posix":
            raise RuntimeError(f"reward and math-verify workers need a POSIX system (Linux, macOS); this is "
                               f"{sys.platform}")
        kw = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(argv, **kw)
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, daemon=True, name="treepo-worker-spawner")
                self.thread.start()
        box, done = [], threading.Event()
        self.jobs.put((argv, kw, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _loop(self):
        while True:
            argv, kw, box, done = self.jobs.get()
            try:
                box.append(subprocess.Popen(argv, **kw))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.append(e)
            done.set()


_spawner = _Spawner()


class _Proc:
    """One child: its pipes, the bytes it has sent that are not yet a whole message, its state."""

    def __init__(self, spec: str, preload: tuple[str, ...]):
        self.popen = _spawner.popen([sys.executable, CHILD, str(os.getpid())])
        self.pid, self.owner = self.popen.pid, os.getpid()
        self.ready, self.buf = False, b""
        self.start_deadline = time.monotonic() + START_TIMEOUT_S
        try:
            self.send({"path": list(sys.path), "spec": spec, "preload": list(preload)})
        except OSError:
            pass  # it died at once: the start-up read sees EOF and reports its exit code

    def fileno(self) -> int:
        return self.popen.stdout.fileno()

    def send(self, obj):
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        data = memoryview(_HEADER.pack(len(data)) + data)
        while data:
            data = data[os.write(self.popen.stdin.fileno(), data):]

    def read(self) -> list:
        """The whole messages that have arrived; EOFError when the child has gone."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            raise EOFError
        self.buf += chunk
        msgs = []
        while len(self.buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < _HEADER.size + n:
                break
            msgs.append(pickle.loads(self.buf[_HEADER.size:_HEADER.size + n]))
            self.buf = self.buf[_HEADER.size + n:]
        return msgs

    def exit_code(self) -> int | None:
        try:
            return self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.owner != os.getpid():
            return  # a forked copy: the child is our parent's
        if self.popen.returncode is None:
            try:  # its process group: anything it started dies too (the group outlives a reaped leader)
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                self.popen.kill()
        self.popen.wait()
        self.popen.stdin.close()
        self.popen.stdout.close()


def _kill_all(procs: list):
    for i, p in enumerate(procs):
        if p is not None:
            p.kill()
            procs[i] = None


_pools: weakref.WeakSet = weakref.WeakSet()


class WorkerPool:
    """`size` children that each call the function named by `spec`; run() spreads calls over them.

    spec: "module:function" (importable with this process's sys.path) or "/path/file.py:function".
    The function must return a number (bool, int, float, anything float() takes except a string).
    preload: modules the children import before they count as started (so a call's deadline does
    not pay for them). Children start on first use; run() is thread-safe (callers take turns)."""

    def __init__(self, spec: str, size: int = 1, preload: tuple[str, ...] = (), name: str | None = None):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r}; must be an int >= 1")
        self.spec, self.size, self.preload, self.name = spec, size, tuple(preload), name or repr(spec)
        self.procs: list[_Proc | None] = [None] * size
        self.lock = threading.Lock()
        self.restarts = 0  # children killed after a timeout or lost during a call
        weakref.finalize(self, _kill_all, self.procs)  # at garbage collection, or at exit
        _pools.add(self)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.owner == os.getpid()]

    def close(self):
        """Kill the children (new ones start if the pool is used again)."""
        got = self.lock.acquire(timeout=1.0)  # a caller stuck elsewhere may hold it: kill regardless
        try:
            _kill_all(self.procs)
        finally:
            if got:
                self.lock.release()

    def start(self):
        """Start every child and wait until each has imported the function (at most START_TIMEOUT_S);
        WorkerStartError if one cannot."""
        with self.lock:
            self._run([], None, start=True)

    def run(self, calls: list[tuple], timeout_s: float | None, wait_s: float | None = None) -> list:
        """fn(*calls[i]) for every i, each under a deadline of timeout_s seconds (None: none).

        Returns one entry per call: its float result, or the exception it failed with -
        RewardTimeout (it overran: its child was killed and a new one started) or WorkerError
        (it raised, returned a non-number, or its child exited). Raises WorkerStartError when a
        child cannot start, and RewardTimeout when another thread holds the pool for wait_s
        seconds (None: wait as long as it takes).
        """
        if not self.lock.acquire(timeout=-1 if wait_s is None else wait_s):
            raise RewardTimeout(f"{self.name} busy for {wait_s}s (another thread's call)")
        try:
            return self._run(calls, timeout_s)
        finally:
            self.lock.release()

    def _proc(self, s: int) -> _Proc:
        p = self.procs[s]
        if p is None or p.owner != os.getpid():
            p = self.procs[s] = _Proc(self.spec, self.preload)
        return p

    def _replace(self, s: int):
        self.procs[s].kill()
        self.procs[s] = None
        self.restarts += 1
        self._proc(s)  # its start-up overlaps what is left to do

    def _run(self, calls: list[tuple], timeout_s: float | None, start: bool = False) -> list:
        out: list = [None] * len(calls)
        todo = deque(range(len(calls)))
        busy: dict[int, tuple[int, float]] = {}  # slot -> (call index, deadline)
        slots = range(self.size if start else min(self.size, len(calls)))
        try:
            while todo or busy or (start and not all(self._proc(s).ready for s in slots)):
                for s in slots:
                    p = self._proc(s)
                    if p.ready and s not in busy and todo:
                        i = todo.popleft()
                        try:
                            p.send(calls[i])
                        except OSError:  # it died while idle: the call never ran; a fresh child takes it
                            todo.appendleft(i)
                            self._replace(s)
                            continue
                        busy[s] = (i, math.inf if timeout_s is None else time.monotonic() + timeout_s)
                waiting = {s: self.procs[s] for s in slots if s in busy or not self.procs[s].ready}
                first = min(busy[s][1] if s in busy else p.start_deadline for s, p in waiting.items())
                left = None if first == math.inf else max(0.0, first - time.monotonic())
                for p in select.select(list(waiting.values()), [], [], left)[0]:
                    s = next(s for s, q in waiting.items() if q is p)
                    self._receive(s, p, busy, out)
                now = time.monotonic()
                for s, p in waiting.items():
                    if self.procs[s] is not p:
                        continue  # replaced just now
                    if s in busy and now >= busy[s][1]:
                        i, _ = busy.pop(s)
                        out[i] = RewardTimeout(f"ran past timeout_s={timeout_s}; worker killed")
                        self._replace(s)
                    elif not p.ready and now >= p.start_deadline:
                        raise WorkerStartError(f"{self.name}: worker did not start within {START_TIMEOUT_S}s")
        except BaseException:
            for s in busy:  # a call in flight would answer out of turn: its child must go
                if self.procs[s] is not None:
                    self.procs[s].kill()
                    self.procs[s] = None
            raise
        return out

    def _receive(self, s: int, p: _Proc, busy: dict, out: list):
        try:
            msgs = p.read()
        except EOFError:
            code = p.exit_code()
            if s not in busy:
                p.kill()
                self.procs[s] = None
                raise WorkerStartError(f"{self.name}: worker exited with code {code} while starting") from None
            i, _ = busy.pop(s)
            out[i] = WorkerExited(f"worker exited with code {code} during the call (os._exit, a signal, or "
                                  "out of memory)")
            self._replace(s)
            return
        for kind, value in msgs:
            if not p.ready:
                if kind != "ready":
                    p.kill()
                    self.procs[s] = None
                    raise WorkerStartError(f"{self.name}: {value}")
                p.ready = True
            else:
                i, _ = busy.pop(s)
                out[i] = value if kind == "ok" else WorkerError(value)


def _after_fork_in_child():
    """A forked child owns none of its parent's workers or locks (they may be held mid-call)."""
    global _spawner
    _spawner = _Spawner()
    for pool in list(_pools):
        pool.lock = threading.Lock()
        pool.procs[:] = [None] * pool.size


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

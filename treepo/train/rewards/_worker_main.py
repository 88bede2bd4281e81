"""The child side of worker.py: import one function by name, then call it once per request.

Run as a script, `python _worker_main.py PARENT_PID`, never imported: it imports only the standard
library until it is told what to load (importing treepo would import torch). The protocol runs
over the pipes the child was started with; they are moved off fds 0 and 1 first, so that the
function's prints (sent to stderr) and reads (from /dev/null) cannot corrupt it. Every message is
an 8-byte big-endian length and a pickle:

    parent -> child   {"path": sys.path, "spec": "module:function", "preload": [module, ...]}
    child -> parent   ("ready", None) | ("error", reason)          (then it exits)
    parent -> child   args (a tuple)                                 one per call
    child -> parent   ("ok", float(fn(*args))) | ("error", "Type: message")

A function that raises (SystemExit and KeyboardInterrupt included) or returns a non-number is an
"error" reply, and the child serves the next call. It dies with its parent three ways: Linux's
parent-death signal (SIGKILL, even mid-way through a C loop that holds the GIL), a thread that
polls the parent's pid, and EOF on its request pipe.
"""
import importlib
import importlib.util
import os
import pickle
import signal
import struct
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
POLL_PARENT_S = 0.5
_HEADER = struct.Struct(">Q")


def die_with_parent(parent: int):
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)

    def poll():  # also where there is no prctl; runs only while the function gives up the GIL
        while os.getppid() == parent:
            time.sleep(POLL_PARENT_S)
        os._exit(1)

    threading.Thread(target=poll, daemon=True, name="treepo-worker-parent-poll").start()


def recv(f) -> bytes | None:
    """One message, still pickled; None at EOF (the parent closed the pipe or died)."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    return f.read(n)


def send(f, msg):
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_HEADER.pack(len(data)) + data)
    f.flush()


def load(spec: str):
    """The function named by "module:function" or "/path/to/file.py:function"."""
    mod, _, name = spec.rpartition(":")
    if mod.endswith(".py"):  # by path: our own checks, without importing the treepo package
        s = importlib.util.spec_from_file_location("_treepo_worker_target", mod)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            raise ImportError(f"cannot import module {mod!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"module {mod!r} has no function {name!r}")
    return fn


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def call(fn, data: bytes):
    try:
        ret = fn(*pickle.loads(data))
        if isinstance(ret, (str, bytes, bytearray)):  # float("1") would pass: a string is not a reward
            return "error", f"TypeError: returned a {type(ret).__name__}, not a number: {ret!r:.80}"
        return "ok", float(ret)
    except BaseException as e:  # noqa: BLE001 - sys.exit in the function is a failed call, not our exit
        return "error", describe(e)


def main():
    parent = int(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    die_with_parent(parent)
    rd, wr = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    data = recv(rd)
    if data is None:
        return
    init = pickle.loads(data)
    sys.path[:] = init["path"]
    try:
        for m in init["preload"]:
            importlib.import_module(m)
        fn = load(init["spec"])
    except BaseException as e:  # noqa: BLE001
        send(wr, ("error", f"cannot load it in a worker process: {describe(e)}"))
        return
    send(wr, ("ready", None))
    while (data := recv(rd)) is not None:
        send(wr, call(fn, data))


if __name__ == "__main__":
    main()

"""Where the C++ CPU kernels (csrc/, torch.ops.treepo) come from: a prebuilt `treepo_kernels._C`, or
a just-in-time build against the installed torch, cached on disk.

setup.py builds `_C` only when torch is importable while the package is built, i.e. with
`pip install --no-build-isolation` (the README's set-up). `pip install .` and `pip install -e .`
build in an isolated environment without torch, so they install no `_C`; a wheel built elsewhere
may hold a `_C` built for another torch. In both cases the first `load()` compiles csrc/ with
`torch.utils.cpp_extension.load` (the flags below, shared with setup.py) into
`$TREEPO_CACHE_DIR/ext/<key>` (default `~/.cache/treepo/ext/<key>`), key = a hash of the sources,
the flags, the torch build, the Python ABI and, with -march=native, the CPU's feature flags. Later
processes load the cached library in milliseconds. A file lock makes concurrent processes
(torchrun ranks) build once: the others wait and load the result. A failed build is a one-line
notice and the plain-PyTorch fallback, never an exception; it is remembered in the process and in
`<key>/failed.txt` (so ranks and later runs do not retry a multi-minute compile; delete the file
to retry). TREEPO_NO_EXT=1 disables the extension (neither loaded nor built).

`load()` runs lazily, at the first `cpu.status()` (the cpu backend's `available`, `packed_status`,
`treepo info`) or op, not at import: importing treepo never compiles, and the engine's automatic
backend choice waits for a build that can succeed rather than fall back silently.

Stdlib only at import: setup.py reads SOURCES and `flags()` from this file without importing torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# module.cpp registers every op (declared in ops.h) as torch.ops.treepo.*; one .cpp per op family
SOURCES = ("paged_kv.cpp", "tree_decode.cpp", "extend.cpp", "linear.cpp", "layer_ops.cpp", "module.cpp")
HEADERS = ("attention.h", "bf16.h", "ops.h")
NAME = "treepo_kernels_C"  # the JIT library's file name (setup.py's build is treepo_kernels._C)
_SERIAL_MIN = 4.0  # minutes of one core for all SOURCES at -O3 (2.3 measured on a 2-core VM, 2026-12), rounded up


def flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) of both builds. TREEPO_NATIVE=0 drops -march=native (a binary
    for other CPUs; the packed GEMMs then take the portable loop)."""
    cflags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("TREEPO_NATIVE", "1") == "1":
        cflags.append("-march=native")
    return cflags, ["-fopenmp"]


@dataclass(frozen=True)
class ExtState:
    """How this process got (or did not get) the extension."""

    kind: str  # "prebuilt" | "jit" | "failed" | "disabled"
    path: str = ""  # the loaded library (prebuilt, jit) or the cache entry (failed)
    why: str = ""  # failed: the reason, one line
    built_now: bool = False  # jit: compiled by this process (else loaded from the cache)

    @property
    def ok(self) -> bool:
        return self.kind in ("prebuilt", "jit")

    def describe(self) -> str:
        """One line for `treepo info`."""
        if self.kind == "prebuilt":
            return f"prebuilt: {self.path}"
        if self.kind == "jit":
            return f"built just in time{' by this process' if self.built_now else ''}: {self.path}"
        if self.kind == "disabled":
            return "disabled (TREEPO_NO_EXT=1)"
        return f"building failed: {self.why}"


def source_dir() -> Path | None:
    """csrc/ as shipped in a wheel (treepo_kernels/csrc, copied by setup.py's build_py) or beside the
    package (a source checkout, an editable install); None when neither holds every source."""
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parent / "csrc"):
        if all((d / f).is_file() for f in SOURCES + HEADERS):
            return d
    return None


def cache_root() -> Path:
    root = os.environ.get("TREEPO_CACHE_DIR") or os.path.join("~", ".cache", "treepo")
    return Path(os.path.expanduser(root)) / "ext"


def _cpu_features() -> str:
    """The CPU's feature flags (what -march=native compiles for), '' where /proc/cpuinfo is absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cache_key(src: Path, cflags: list[str], ldflags: list[str]) -> tuple[str, dict]:
    """(key, what it hashes): a library is reused only for the same sources, flags, torch build,
    Python ABI, compiler name and (with -march=native) CPU features."""
    import torch

    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update(f.encode() + b"\0" + (src / f).read_bytes() + b"\0")
    inputs = {"sources_sha256": h.hexdigest(), "cflags": cflags, "ldflags": ldflags, "torch": torch.__version__,
              "torch_git": getattr(torch.version, "git_version", ""),
              "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "python": sys.implementation.cache_tag,
              "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "machine": platform.machine(),
              "cxx": os.environ.get("CXX", "c++")}
    if "-march=native" in cflags:
        inputs["cpu_features_sha256"] = hashlib.sha256(_cpu_features().encode()).hexdigest()
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return key, inputs


def _notice(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _one_line(text: str, limit: int = 300) -> str:
    """The first compiler error line of a build log (else its first line), cut to `limit` chars."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "error" in ln.lower() and not ln.startswith("Error building")), None)
    line = pick or (lines[0] if lines else "no output")
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive flock on `path` (released by the kernel if the process dies); says once that it
    waits when another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _notice(f"treepo: waiting for another process to build the C++ CPU kernels (lock {path})...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path():
    """torch's JIT build runs `ninja` from PATH: add the pip package's binary and this Python's bin/
    (an unactivated venv) when PATH has none."""
    old = os.environ.get("PATH", "")
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package (a dependency of treepo)

        extra.insert(0, ninja.BIN_DIR)
    except Exception:
        pass
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join(extra + [old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _prebuilt() -> str:
    """Import the prebuilt treepo_kernels._C (registers torch.ops.treepo); its file. Raises when there
    is none or it does not load (e.g. built for another torch)."""
    import importlib

    return importlib.import_module("treepo_kernels._C").__file__


def _jit(prebuilt_error: str) -> ExtState:
    src = source_dir()
    if src is None:
        here = Path(__file__).resolve().parent
        return ExtState("failed", why=f"no prebuilt _C ({prebuilt_error}) and the C++ sources are not installed "
                                      f"(looked in {here / 'csrc'} and {here.parent / 'csrc'})")
    cflags, ldflags = flags()
    key, inputs = cache_key(src, cflags, ldflags)
    out = cache_root() / key
    lib, done, failed = out / f"{NAME}.so", out / "done.json", out / "failed.txt"
    if done.is_file():  # built before: no lock needed (a read-only shared cache works too)
        return _load_cached(lib, out)
    out.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_root() / f"{key}.lock"):
        if not done.is_file() and not failed.is_file():  # nobody built it yet: we do
            jobs = max(1, min(len(SOURCES), int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)))
            minutes = max(1.0, _SERIAL_MIN / jobs)
            _notice(f"treepo: building the C++ CPU kernels for this torch (once, ~{minutes:.0f} min) into {out}...")
            (out / "lock").unlink(missing_ok=True)  # torch's own baton, stale if a build was killed
            t0 = time.time()
            try:
                from torch.utils import cpp_extension

                with _ninja_on_path():
                    cpp_extension.load(NAME, [str(src / f) for f in SOURCES], extra_cflags=list(cflags),
                                       extra_ldflags=list(ldflags), build_directory=str(out), with_cuda=False,
                                       is_python_module=False, verbose=False)
            except Exception as e:
                failed.write_text(f"{type(e).__name__}: {e}\n")
                why = f"{type(e).__name__}: {_one_line(str(e))}; full log {failed} (delete it to retry)"
                _notice(f"treepo: the C++ CPU kernels did not build ({why}); the engine will use the "
                        "plain-PyTorch attention")
                return ExtState("failed", str(out), why)
            done.write_text(json.dumps({**inputs, "build_seconds": round(time.time() - t0, 1)}, indent=1))
            return ExtState("jit", str(lib), built_now=True)
    if failed.is_file():  # an earlier (or a concurrent) build failed: not retried
        text = failed.read_text()
        return ExtState("failed", str(out), f"an earlier build failed ({_one_line(text)}); full log {failed} "
                                            "(delete it to retry)")
    return _load_cached(lib, out)  # another process built it while we waited


def _load_cached(lib: Path, out: Path) -> ExtState:
    import torch

    try:
        torch.ops.load_library(str(lib))
    except Exception as e:  # the cache entry was damaged: say so, do not rebuild behind the user's back
        return ExtState("failed", str(out), f"the cached {lib} does not load ({type(e).__name__}: "
                                            f"{_one_line(str(e))}); delete {out} to rebuild")
    return ExtState("jit", str(lib))


_state: ExtState | None = None
_lock = threading.Lock()


def load() -> ExtState:
    """The extension for this process: resolved once (loading or building it), then memoised."""
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is None:
            _state = _resolve()
    return _state


def _resolve() -> ExtState:
    if os.environ.get("TREEPO_NO_EXT") == "1":
        return ExtState("disabled")
    try:
        return ExtState("prebuilt", _prebuilt())
    except Exception as e:
        prebuilt_error = f"{type(e).__name__}: {e}"
        if getattr(e, "name", None) != "treepo_kernels._C":  # a _C that is there but does not load
            _notice(f"treepo: the prebuilt treepo_kernels._C does not load ({_one_line(prebuilt_error)}); "
                    "using a just-in-time build")
    try:
        return _jit(prebuilt_error)
    except Exception as e:  # e.g. an unwritable cache dir: still never a crash
        why = f"{type(e).__name__}: {_one_line(str(e))}"
        _notice(f"treepo: the C++ CPU kernels are unavailable ({why}); the engine will use the plain-PyTorch "
                "attention")
        return ExtState("failed", why=why)

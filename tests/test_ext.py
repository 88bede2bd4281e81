"""Where the C++ extension comes from (treepo_kernels/ext.py): a prebuilt _C, else a just-in-time
build of the package's csrc/ with setup.py's flags, cached by key under a file lock; a failed build
is one notice and the torch fallback; TREEPO_NO_EXT=1 disables it. The fast tests replace
torch.utils.cpp_extension.load (no compiler runs); the slow one really builds in a subprocess."""
import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from treepo_kernels import cpu, ext

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
LOG = ("Error building extension 'treepo_kernels_C': [1/7] c++ -MMD -c linear.cpp -o linear.o\n"
       "FAILED: linear.o\nlinear.cpp:10:5: error: 'vdpbf16' was not declared in this scope\n"
       "ninja: build stopped: subcommand failed.\n")


class FakeBuild:
    """Stands in for torch.utils.cpp_extension.load: records each call, checks the cache lock is held,
    writes an empty 'library' (or raises `error`)."""

    def __init__(self, error: Exception | None = None):
        self.calls, self.error = [], error

    def __call__(self, name, sources, extra_cflags, extra_ldflags, build_directory, **kw):
        out = Path(build_directory)
        with open(out.parent / f"{out.name}.lock") as f:  # another open file: its flock must be refused
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.calls.append(dict(name=name, sources=sources, cflags=extra_cflags, ldflags=extra_ldflags,
                               build_directory=build_directory, **kw))
        if self.error is not None:
            raise self.error
        (out / f"{name}.so").write_bytes(b"")
        return str(out / f"{name}.so")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not resolved the extension yet, with no prebuilt _C, an empty cache, and
    torch.ops.load_library recorded instead of run (restored afterwards with the real state)."""
    monkeypatch.setattr(ext, "_state", None)
    monkeypatch.setenv("TREEPO_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("TREEPO_NO_EXT", "TREEPO_NATIVE"):
        monkeypatch.delenv(var, raising=False)

    def no_prebuilt():
        raise ModuleNotFoundError("No module named 'treepo_kernels._C'", name="treepo_kernels._C")

    monkeypatch.setattr(ext, "_prebuilt", no_prebuilt)
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    return loaded


def restart(monkeypatch):
    """What a new process sees: nothing resolved yet (the disk cache stays)."""
    monkeypatch.setattr(ext, "_state", None)


def test_jit_builds_the_package_sources_with_setup_flags_into_a_keyed_cache_once(fresh, monkeypatch, tmp_path,
                                                                                 capsys):
    build = FakeBuild()
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    st = ext.load()
    assert st.kind == "jit" and st.built_now and cpu.status() == (True, "")
    (call,) = build.calls
    src = ext.source_dir()
    assert src in (REPO / "csrc", REPO / "treepo_kernels" / "csrc")
    assert sorted(p.name for p in (REPO / "csrc").glob("*.cpp")) == sorted(ext.SOURCES)  # none forgotten
    assert sorted(p.name for p in (REPO / "csrc").glob("*.h")) == sorted(ext.HEADERS)
    assert call["sources"] == [str(src / f) for f in ext.SOURCES]
    assert call["cflags"] == FLAGS + ["-march=native"] and call["ldflags"] == ["-fopenmp"]
    assert call["with_cuda"] is False and call["is_python_module"] is False
    key, inputs = ext.cache_key(src, FLAGS + ["-march=native"], ["-fopenmp"])
    out = tmp_path / "cache" / "ext" / key
    assert call["build_directory"] == str(out) and st.path == str(out / "treepo_kernels_C.so")
    assert inputs["torch"] == torch.__version__ and (out / "done.json").is_file()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("treepo: building the C++ CPU kernels for this torch (once, ~")
    assert "built just in time by this process" in st.describe()

    assert ext.load() is st and len(build.calls) == 1  # the same process: resolved once
    restart(monkeypatch)  # a later process loads the cached library: no build, no notice
    st2 = ext.load()
    assert st2.kind == "jit" and not st2.built_now and len(build.calls) == 1
    assert fresh == [str(out / "treepo_kernels_C.so")] and capsys.readouterr().err == ""

    def damaged(path):
        raise OSError(f"{path}: invalid ELF header")

    restart(monkeypatch)  # a damaged cache entry is reported, not rebuilt behind the user's back
    monkeypatch.setattr(torch.ops, "load_library", damaged)
    st3 = ext.load()
    assert st3.kind == "failed" and "invalid ELF header" in st3.why and f"delete {out} to rebuild" in st3.why
    assert len(build.calls) == 1


def test_cache_key_changes_with_sources_flags_and_torch(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", src)
    key, _ = ext.cache_key(src, FLAGS, ["-fopenmp"])
    assert ext.cache_key(src, FLAGS, ["-fopenmp"])[0] == key
    assert ext.cache_key(src, FLAGS + ["-march=native"], ["-fopenmp"])[0] != key
    monkeypatch.setenv("TREEPO_NATIVE", "0")
    assert ext.flags() == (FLAGS, ["-fopenmp"])
    with open(src / "attention.h", "a") as f:  # a header counts too
        f.write("\n")
    assert ext.cache_key(src, FLAGS, ["-fopenmp"])[0] != key
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert ext.cache_key(REPO / "csrc", FLAGS, ["-fopenmp"])[0] != key


def test_a_failed_build_is_one_notice_and_the_torch_fallback_not_retried(fresh, monkeypatch, capsys):
    from treepo.engine import attention

    build = FakeBuild(RuntimeError(LOG))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    monkeypatch.setattr(attention, "_noticed", set())
    ok, why = cpu.status()
    assert not ok and "error: 'vdpbf16' was not declared" in why and "delete it to retry" in why
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "building the C++ CPU kernels" in err[0]
    assert "did not build" in err[1] and "plain-PyTorch attention" in err[1]
    st = ext.load()
    failed = Path(st.path) / "failed.txt"
    assert st.kind == "failed" and failed.read_text().strip() == f"RuntimeError: {LOG}".strip()
    assert st.describe().startswith("building failed: RuntimeError: linear.cpp:10:5: error:")
    assert attention.make_backend("auto", "cpu").name == "torch"
    assert "'cpu' unavailable" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="not available"):
        cpu.pack_linear(torch.zeros(16, 2))

    restart(monkeypatch)  # a later process (another rank) does not retry the compile
    st = ext.load()
    assert st.kind == "failed" and "an earlier build failed" in st.why and len(build.calls) == 1
    failed.unlink()  # as the notice says: deleting the log retries
    restart(monkeypatch)
    assert ext.load().kind == "failed" and len(build.calls) == 2


def test_no_ext_disables_the_extension_entirely(fresh, monkeypatch):
    monkeypatch.setenv("TREEPO_NO_EXT", "1")
    build = FakeBuild()
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    monkeypatch.setattr(ext, "_prebuilt", lambda: pytest.fail("TREEPO_NO_EXT=1 must not load the prebuilt _C"))
    assert cpu.status() == (False, "the C++ extension is disabled by TREEPO_NO_EXT=1")
    assert ext.load().describe() == "disabled (TREEPO_NO_EXT=1)" and build.calls == []
    assert cpu.gemm_impl() == ""


def test_a_prebuilt_extension_is_used_and_a_broken_one_is_rebuilt(fresh, monkeypatch, capsys):
    build = FakeBuild()
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    monkeypatch.setattr(ext, "_prebuilt", lambda: "/site/treepo_kernels/_C.so")
    assert ext.load() == ext.ExtState("prebuilt", "/site/treepo_kernels/_C.so") and build.calls == []
    assert ext.load().describe() == "prebuilt: /site/treepo_kernels/_C.so"

    def broken():  # e.g. a wheel's _C built for another torch
        raise ImportError("_C.so: undefined symbol: _ZN3c104impl3cow")

    restart(monkeypatch)
    monkeypatch.setattr(ext, "_prebuilt", broken)
    assert ext.load().kind == "jit" and len(build.calls) == 1
    err = capsys.readouterr().err.splitlines()
    assert "prebuilt treepo_kernels._C does not load" in err[0] and "undefined symbol" in err[0]


def test_a_second_process_waits_for_the_builder_and_loads_its_result(fresh, monkeypatch, tmp_path, capsys):
    build = FakeBuild()
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    cflags, ldflags = ext.flags()
    key, _ = ext.cache_key(ext.source_dir(), cflags, ldflags)
    out = tmp_path / "cache" / "ext" / key
    out.mkdir(parents=True)
    result = []
    with open(out.parent / f"{key}.lock", "a") as held:  # "rank 0" is building
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: result.append(ext.load()))
        t.start()
        deadline = time.time() + 10
        while "waiting for another process" not in capsys.readouterr().err and time.time() < deadline:
            time.sleep(0.02)
        assert t.is_alive() and not result
        (out / "treepo_kernels_C.so").write_bytes(b"")  # rank 0 finishes
        (out / "done.json").write_text("{}")
        fcntl.flock(held, fcntl.LOCK_UN)
    t.join(10)
    assert result[0] == ext.ExtState("jit", str(out / "treepo_kernels_C.so")) and build.calls == []


def test_sources_come_from_the_wheel_copy_else_beside_the_package(fresh, monkeypatch, tmp_path):
    pkg = tmp_path / "site" / "treepo_kernels"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(ext, "__file__", str(pkg / "ext.py"))
    assert ext.source_dir() is None
    st = ext.load()
    assert st.kind == "failed" and "C++ sources are not installed" in st.why
    shutil.copytree(REPO / "csrc", tmp_path / "site" / "csrc")  # a source checkout / editable install
    assert ext.source_dir() == tmp_path / "site" / "csrc"
    shutil.copytree(REPO / "csrc", pkg / "csrc")  # a wheel
    assert ext.source_dir() == pkg / "csrc"


def test_setup_ships_the_sources_in_the_wheel(tmp_path):
    """setup.py's build_py copies csrc/ into the built package (what a wheel holds)."""
    egg, lib = tmp_path / "egg", tmp_path / "lib"  # (nothing written into the checkout)
    egg.mkdir()
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg), "build_py",
                        "--build-lib", str(lib)], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "TREEPO_NO_EXT": "1"})
    assert r.returncode == 0, r.stderr
    shipped = lib / "treepo_kernels" / "csrc"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(ext.SOURCES + ext.HEADERS)
    assert (shipped / "linear.cpp").read_bytes() == (REPO / "csrc" / "linear.cpp").read_bytes()


JIT_CHECK = """
import sys
sys.modules["treepo_kernels._C"] = None  # as if installed with build isolation: no prebuilt _C
import torch
from treepo_kernels import cpu, ext
ok, why = cpu.status()
assert ok, why
st = ext.load()
print("STATE", st.kind, st.built_now, st.path)
g = torch.Generator().manual_seed(0)
w = torch.randn(200, 64, generator=g).bfloat16()
x = torch.randn(13, 64, generator=g).bfloat16()
y = cpu.linear_packed(x, cpu.pack_linear(w, gated=True), 100, gated=True, fp32_out=True)
ref = x.float() @ w.float().T
ref = torch.nn.functional.silu(ref[:, :100]) * ref[:, 100:]
err = (y - ref).abs().max().item() / ref.abs().max().item()
print("ERR", err, cpu.gemm_impl())
assert err < 1e-5, err
"""


@pytest.mark.slow
def test_jit_build_for_real_then_loaded_from_the_cache(tmp_path):
    """Really compiles csrc/ into a temporary cache (minutes), runs the packed GEMM against fp32
    matmuls, then a second process loads it from the cache without building."""
    env = {**os.environ, "TREEPO_CACHE_DIR": str(tmp_path)}
    env.pop("TREEPO_NO_EXT", None)
    runs = []
    for _ in range(2):
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", JIT_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=3600)
        assert r.returncode == 0, r.stdout + r.stderr
        runs.append((r, time.time() - t0))
    (first, t_build), (second, t_load) = runs
    print(f"build {t_build:.0f}s, cached load {t_load:.1f}s;", first.stdout, first.stderr)
    assert "STATE jit True" in first.stdout and "building the C++ CPU kernels" in first.stderr
    assert "STATE jit False" in second.stdout and second.stderr == ""
    assert str(tmp_path) in first.stdout

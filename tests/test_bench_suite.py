"""The kernel benchmark suite (bench/test_bench_*.py) still runs: every file once on its tiny shapes,
each benchmark function called once (--benchmark-disable) after its check against the reference,
the Triton providers through the interpreter; and the suite stays out of the default test run."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["test_bench_append.py", "test_bench_tree_decode.py", "test_bench_extend.py",
         "test_bench_train_attention.py", "test_bench_gemm.py"]


def test_default_run_does_not_collect_the_suite():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()  # (tomllib is Python 3.11+)
    ini = text[text.index("[tool.pytest.ini_options]"):]
    assert re.search(r'^testpaths = \["tests"\]$', ini, re.M), "pytest's testpaths must stay [\"tests\"]"


def test_every_benchmark_file_runs_on_tiny_shapes():
    pytest.importorskip("pytest_benchmark", reason="the suite needs pytest-benchmark (the [test] extra)")
    from treepo_kernels import cpu

    env = dict(os.environ, TRITON_INTERPRET="1", TREEPO_BENCH_THREADS="2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "bench/", "--benchmark-disable", "--bench-shapes", "tiny",
           "--bench-device", "cpu", "-x", "-v", "-rs", "-p", "no:cacheprovider"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the tiny benchmark run took over 300 s")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    passed = re.findall(r"^bench/(\w+\.py)::(\S+) PASSED", out, re.M)
    for name in FILES:
        assert any(f == name for f, _ in passed), f"{name}: no benchmark passed\n{out[-4000:]}"
    ids = {case for _, case in passed}
    for case in ("test_append[decode_37-triton]", "test_train_attention_fwd_bwd[tiny-triton]",
                 "test_train_attention_fwd_bwd[tiny-gathered]", "test_extend[tiny-triton_tree]"):
        assert case in ids, f"{case} did not pass\n{out[-4000:]}"
    if cpu.status()[0]:
        for case in ("test_tree_decode[smoke_4_x_32_shared_16_own-treepo_cpp_tree]", "test_extend[tiny-treepo_cpp]",
                     "test_gemm[tiny_m3-treepo_cpp]"):
            assert case in ids, f"{case} did not pass\n{out[-4000:]}"

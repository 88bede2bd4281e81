"""The kernel microbenchmarks as a pytest-benchmark suite: what the files of bench/test_bench_*.py share.

One file per op (append, tree decode, extend, training tree attention, packed GEMM). Each file
defines `PROVIDERS` (the implementations compared: ours in C++ or Triton, the torch reference,
SDPA, FlexAttention, flash-attn / FlashInfer where installed) and `SHAPES` {"tiny" | "cpu" |
"gpu": [(id, spec), ...]}; `pytest_generate_tests` below parametrizes provider x shape, the shape
module-scoped so a shape's inputs and reference are built once for all its providers. Every case
sets `benchmark.group = "<op>:<shape id>"` (providers side by side in one table), checks its
provider's output against the reference once outside the timed part (a wrong kernel cannot post
a fast time; that call also compiles / warms up), and records tokens and derived figures (GB/s,
TFLOP/s) in `benchmark.extra_info`. On CUDA the timed function ends with a synchronize.

    pytest bench/ --benchmark-only --benchmark-save=NAME       # runs saved under .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare=0001    # against saved run 0001
    pytest bench/test_bench_tree_decode.py --benchmark-only -k treepo_cpp --benchmark-group-by=group

Options: --bench-shapes tiny|cpu|gpu (default gpu on CUDA, else cpu), --bench-device auto|cpu|cuda,
--bench-threads N (torch CPU threads; default $TREEPO_BENCH_THREADS, else 2). The root
pyproject's `testpaths = ["tests"]` keeps this suite out of the default test run;
tests/test_bench_suite.py runs it once per file on the tiny shapes (--benchmark-disable).
"""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the scripts' builders: bench_kernels, bench_cpu_kernels, bench_tree_attention
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's treepo / treepo_kernels, not an installed copy

SHAPE_SETS = ("tiny", "cpu", "gpu")


def pytest_addoption(parser):
    g = parser.getgroup("treepo kernel benchmarks")
    g.addoption("--bench-shapes", choices=SHAPE_SETS, default=None,
                help="shape set: tiny (checks the files), cpu (seconds a case), gpu (bench_kernels.py's); "
                     "default gpu on CUDA, else cpu")
    g.addoption("--bench-device", choices=("auto", "cpu", "cuda"), default="auto",
                help="device of the inputs (auto: cuda when available)")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch CPU threads (default $TREEPO_BENCH_THREADS, else 2)")


def _device(config) -> torch.device:
    want = config.getoption("bench_device")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda, but torch sees no CUDA device")
    return torch.device(want)


def _shape_set(config) -> str:
    return config.getoption("bench_shapes") or ("gpu" if _device(config).type == "cuda" else "cpu")


def _threads(config) -> int:
    n = config.getoption("bench_threads") or os.environ.get("TREEPO_BENCH_THREADS") or 2
    return int(n)


def pytest_configure(config):
    torch.set_num_threads(_threads(config))


def pytest_generate_tests(metafunc):
    """provider x shape from the module's PROVIDERS and SHAPES[<shape set>]; shape module-scoped."""
    mod = metafunc.module
    if "shape" in metafunc.fixturenames:
        shapes = mod.SHAPES[_shape_set(metafunc.config)]
        metafunc.parametrize("shape", shapes, ids=[s[0] for s in shapes], scope="module")
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", mod.PROVIDERS)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return _device(request.config)


@pytest.fixture(scope="session")
def shape_set(request) -> str:
    return _shape_set(request.config)


@pytest.fixture(scope="session")
def kernel_dtype(device, shape_set) -> torch.dtype:
    """The KV pool's and our kernels' dtype: bf16, but fp16 under the Triton interpreter (a CPU with
    TRITON_INTERPRET=1, tiny shapes: the interpreter has no bf16 dot)."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and shape_set == "tiny"
    return torch.float16 if interpreted else torch.bfloat16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def timed(benchmark, device):
    """run(fn, group, **extra_info) -> median seconds (None under --benchmark-disable): times fn with
    pytest-benchmark (a CUDA synchronize at its end), after the caller has checked fn's output."""

    def run(fn, group: str, **extra):
        benchmark.group = group
        benchmark.extra_info.update(extra)
        if device.type == "cuda":
            def step():
                fn()
                torch.cuda.synchronize()
        else:
            step = fn
        benchmark(step)
        return benchmark.stats.stats.median if benchmark.stats is not None else None

    run.extra_info = benchmark.extra_info
    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """What the saved runs are compared across (--benchmark-compare warns when it differs)."""
    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "bench_device": str(_device(config)), "bench_shapes": _shape_set(config)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    from treepo_kernels import cpu

    ok, why = cpu.status()
    info["cpp_ext"] = cpu.gemm_impl() if ok else why
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                info["avx512_bf16"] = "avx512_bf16" in line.split()
                break
    except OSError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=HERE).stdout.strip()
    except OSError:
        pass
    machine_info["treepo"] = info

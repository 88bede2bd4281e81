#!/usr/bin/env bash
# The GPU check, run once per GPU session: (1) the GPU tests (bf16, large shapes, CUDA graph
# capture) and the Triton kernel tests compiled for the device, (2) the kernel benchmark, (3) the
# engine-level tree vs sequential sampling benchmark on the GPU, (4) the pytest-benchmark kernel
# suite (bench/test_bench_*.py) on the gpu shapes with short rounds. Budget: about 10 minutes on one
# H200; each part has its own timeout so one hang does not cost the others.
# Usage: bash bench/gpu_check.sh OUT_DIR (everything is written there)
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
# no C++ CPU kernels on the device machine: neither built at install nor just in time (device minutes)
export TREEPO_NO_EXT=1
if ! $PY -c "import treepo" 2>/dev/null; then
  $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.txt" 2>&1
fi
unset TRITON_INTERPRET
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$OUT/machine.txt" 2>&1
# 1. tests on the device: the gpu-marked ones and the kernel tests compiled (not interpreted)
timeout 240 $PY -m pytest -q -m "gpu or not slow" tests/test_triton_kernels.py -p no:cacheprovider \
  >"$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >>"$OUT/summary.txt"
# 2. kernel benchmark
timeout 180 $PY bench/bench_kernels.py --out "$OUT" >"$OUT/bench_kernels.txt" 2>&1
echo "bench_kernels rc=$?" >>"$OUT/summary.txt"
# 3. tree vs sequential sampling with the bundled model (triton backend, bf16)
# TODO: bench/bench_engine.py has no --device flag (CPU only); add one, then run it here too.
timeout 90 $PY bench/bench_sampling.py --splits 4x64 --threads 8 >"$OUT/bench_sampling.txt" 2>&1
echo "bench_sampling rc=$?" >>"$OUT/summary.txt"
# 4. the kernel microbenchmark suite, every provider checked against its reference before timing
timeout 150 $PY -m pytest bench/ --benchmark-only --bench-shapes gpu --benchmark-min-rounds=3 \
  --benchmark-max-time=0.1 --benchmark-columns=median,iqr,min,rounds --benchmark-json="$OUT/pytest_benchmark.json" \
  -rs -p no:cacheprovider >"$OUT/pytest_benchmark.txt" 2>&1
echo "pytest_benchmark rc=$?" >>"$OUT/summary.txt"
tail -n 3 "$OUT"/*.txt

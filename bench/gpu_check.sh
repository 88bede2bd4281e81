#!/usr/bin/env bash
# The GPU check, run once per GPU session: (1) the GPU tests (bf16, large shapes, CUDA graph
# capture) and the Triton kernel tests compiled for the device, (2) the kernel benchmark, (3) the
# attention-for-training benchmark (tree attention vs FlexAttention vs varlen), (4) the engine-level
# tree vs sequential sampling benchmark on the GPU, (5) if time is left (the run tool stops a
# command at 600 s), the pytest-benchmark kernel suite (bench/test_bench_*.py) on the gpu shapes with
# short rounds. Writes everything to OUT_DIR. Budget: parts 1-4 at most 9 minutes on one H200 (the
# timeouts: 200 + 120 + 150 + 60 s); each part has its own timeout so one hang does not cost the
# others.  Usage: bash bench/gpu_check.sh OUT_DIR
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
# (test_packed_training: the packed update on CUDA through the Triton kernel equals the padded one)
TESTS="tests/test_triton_kernels.py tests/test_tree_attention_kernel.py tests/test_packed_training.py"
timeout 200 $PY -m pytest -q -m "gpu or not slow" $TESTS -p no:cacheprovider \
  >"$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >>"$OUT/summary.txt"
# 2. kernel benchmark
timeout 120 $PY bench/bench_kernels.py --out "$OUT" >"$OUT/bench_kernels.txt" 2>&1
echo "bench_kernels rc=$?" >>"$OUT/summary.txt"
# 3. attention for training over packed trees; it stops measuring after --budget-s (a compile in
# flight can overrun it) and writes its rows to $OUT after every shape, so a timeout keeps them
timeout 150 $PY bench/bench_train_attention.py --out "$OUT" --budget-s 110 >"$OUT/bench_train_attention.txt" 2>&1
echo "bench_train_attention rc=$?" >>"$OUT/summary.txt"
# 4. tree vs sequential sampling with the bundled model (triton backend, bf16)
# TODO: bench/bench_engine.py has no --device flag (CPU only); add one, then run it here too.
timeout 60 $PY bench/bench_sampling.py --splits 4x64 --threads 8 >"$OUT/bench_sampling.txt" 2>&1
echo "bench_sampling rc=$?" >>"$OUT/summary.txt"
# 5. the kernel microbenchmark suite, every provider checked against its reference before timing;
# only with time left before 570 s (SECONDS counts from the script's start)
LEFT=$((570 - SECONDS))
if [ "$LEFT" -gt 60 ]; then
timeout "$LEFT" $PY -m pytest bench/ --benchmark-only --bench-shapes gpu --benchmark-min-rounds=3 \
  --benchmark-max-time=0.1 --benchmark-columns=median,iqr,min,rounds --benchmark-json="$OUT/pytest_benchmark.json" \
  -rs -p no:cacheprovider >"$OUT/pytest_benchmark.txt" 2>&1
echo "pytest_benchmark rc=$?" >>"$OUT/summary.txt"
else
echo "pytest_benchmark skipped (${LEFT}s left)" >>"$OUT/summary.txt"
fi
tail -n 3 "$OUT"/*.txt

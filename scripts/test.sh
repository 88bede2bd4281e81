#!/usr/bin/env bash
# The test suite (set-up included). Extra args go to pytest, e.g. `-m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"

#!/usr/bin/env bash
# The test suite (set-up included): the lint (ruff, config in pyproject.toml), then pytest.
# Extra args go to pytest, e.g. `-m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check --no-cache .
exec python -m pytest -q "$@"

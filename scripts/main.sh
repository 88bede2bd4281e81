#!/usr/bin/env bash
# The main job on the bundled SmolLM2-135M-Instruct (set-up included). Extra args go to treepo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ $# -eq 0 ]; then set -- sample -n 4; fi
exec treepo "$@"

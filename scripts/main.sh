#!/usr/bin/env bash
# The main job: TreePO training of the bundled SmolLM2-135M-Instruct on easy reasoning-gym sums
# (set-up included). Extra args go to the treepo CLI, e.g. `train --preset quick` or `sample -n 4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ $# -eq 0 ]; then set -- train; fi
exec treepo "$@"

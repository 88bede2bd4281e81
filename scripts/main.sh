#!/usr/bin/env bash
# The main job: TreePO training of the bundled SmolLM2-135M-Instruct on easy reasoning-gym sums
# (set-up included). Extra args go to the treepo CLI, e.g. `train --preset quick` or `sample -n 4`.
# It runs in the caller's directory (no cd): relative paths (--output_dir, --html, --config, ...)
# and the default outputs (runs/treepo, treepo_tree.html) are the caller's.
set -euo pipefail
root="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
. "$root/.venv/bin/activate"
if [ $# -eq 0 ]; then set -- train; fi
exec treepo "$@"

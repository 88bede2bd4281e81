"""How much work the training tree-attention kernel's plan leaves, counted on a CPU at the real sizes.

The GPU time of treepo_kernels/tree_attention.py is bounded below by the score tiles it computes.
This script builds its plan (plan_tree_attention) for the shapes of bench/bench_train_attention.py
at full size and counts, per head: the visible (query, key) pairs (the useful work), the score
entries of the visited tiles (what the kernels compute: tiles x block_q x block_n), and the same
for a causal varlen kernel over the unpacked root-to-leaf paths (FlashAttention's tiling: per path,
each query block visits the key blocks up to its last query). Their ratio is the speed-up over
varlen the tiling allows at equal speed per computed entry; `tile_eff` is useful / computed. Also
the plan's build time on this CPU (the GPU builds it with the same torch ops on the device).

    python bench/bench_tree_attention_plan.py [--heads 32,8,128] [--rows 64] [--block-n 64]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_train_attention import SHAPES, build_batch, leaf_paths, pair_counts  # noqa: E402
from common import machine, print_table, result_line  # noqa: E402

from treepo_kernels.tree_attention import plan_tree_attention, tile_for  # noqa: E402


def varlen_entries(lengths, bq: int, bn: int) -> int:
    """Score entries a causal FlashAttention-style kernel computes over sequences of these lengths."""
    total = 0
    for L in lengths:
        for a in range(0, L, bq):
            total += bq * (-(-min(a + bq, L) // bn) * bn)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="32,8,128", help="H_q,H_kv,d (sets the query heads packed per program)")
    ap.add_argument("--rows", type=int, default=None, help="query rows per program (default: the kernel's)")
    ap.add_argument("--block-n", type=int, default=None, help="keys per tile (default: the kernel's)")
    ap.add_argument("--varlen-tile", default="128,64", help="query,key tile of the varlen baseline's count")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from treepo_kernels import tree_attention as ta

    Hq, Hkv, _ = (int(x) for x in args.heads.split(","))
    rows, bn = args.rows or ta.ROWS, args.block_n or ta.BLOCK_N
    _, bq = tile_for(Hq, Hkv, rows)
    vq, vk = (int(x) for x in args.varlen_tile.split(","))
    out = []
    for key, shape in SHAPES.items():
        batch = build_batch(shape, 1)
        paths = leaf_paths(batch)
        ve = batch.visible_end
        plan_tree_attention(ve, bq, bn)  # warm-up
        t0 = time.perf_counter()
        plan = plan_tree_attention(ve, bq, bn)
        plan_ms = (time.perf_counter() - t0) * 1e3
        useful, unpacked = pair_counts(ve, paths)
        computed = plan.tiles * bq * bn
        v_computed = varlen_entries([len(p) for p in paths], vq, vk)
        out.append({"shape": shape[0], "T": batch.tokens, "path_tokens": batch.leaf_tokens, "tiles": plan.tiles,
                    "full_tiles": int(plan.q_kv_full.sum()), "plan_ms": plan_ms, "tile_eff": useful / computed,
                    "varlen_eff": unpacked / v_computed, "ideal": unpacked / useful,
                    "tiling_bound": v_computed / computed, "dkdv_items": int(plan.item_kb.shape[0]),
                    "split_blocks": int(plan.split_kb.shape[0])})
    print(f"tree attention plan, heads {Hq}/{Hkv}: block_q {bq} tokens x block_n {bn} keys; varlen tiles "
          f"{vq} x {vk}")
    print_table(out, ["shape", "T", "path_tokens", "tiles", "full_tiles", "plan_ms", "tile_eff", "varlen_eff",
                      "ideal", "tiling_bound", "dkdv_items", "split_blocks"])
    result_line("tree_attention_plan", {"machine": machine(), "args": vars(args), "block_q": bq, "block_n": bn,
                                        "rows": out})


if __name__ == "__main__":
    main()

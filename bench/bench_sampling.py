"""Tree vs sequential sampling throughput on the same engine (TreePO paper section 4.1), CPU.

8 chat-templated arithmetic prompts x W=16 leaves with the bundled SmolLM2-135M-Instruct; one
token budget (default 256) split as depth x segment (2x128, 4x64, 8x32, 16x16); sequential
sampling is the same API with one segment of the whole budget. Reports TrajPS (finished
trajectories / s), TokenPS (tokens the model processed / s), response tokens / s, compute saved
(1 - processed_tree / processed_sequential), the token ratio (processed_sequential /
processed_tree: the ceiling of the TrajPS ratio at equal cost per token), peak KV pages and
forward passes. Usage:

    python bench/bench_sampling.py [--budget 256] [--splits 2x128,4x64,8x32,16x16] [--backend auto] [--device cpu|cuda]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import chat_prompts, print_table, result_line  # noqa: E402


def run(sampler, prompts, params):
    t0 = time.perf_counter()
    trees = sampler.sample(prompts, params)
    wall = time.perf_counter() - t0
    leaves = sum(len(t.leaves) for t in trees)
    processed = sum(t.stats.processed_tokens for t in trees)
    response = sum(len(leaf.token_ids) for t in trees for leaf in t.leaves)
    reasons = {}
    for t in trees:
        for leaf in t.leaves:
            reasons[leaf.finish_reason] = reasons.get(leaf.finish_reason, 0) + 1
    return {"wall_s": wall, "leaves": leaves, "traj_per_s": leaves / wall, "token_per_s": processed / wall,
            "resp_tok_per_s": response / wall, "processed": processed, "response_tokens": response,
            "forward_passes": trees[0].stats.forward_passes, "peak_kv_pages": trees[0].stats.peak_kv_pages,
            "fallbacks": sum(t.stats.fallbacks for t in trees), "finish": reasons}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--splits", default="2x128,4x64,8x32,16x16")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--branch", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from treepo import Engine, SamplingParams, TreeConfig, TreeSampler
    from treepo.assets import bundled_model_path

    eng = Engine.from_pretrained(bundled_model_path(), dtype=args.dtype, attention_backend=args.backend,
                                 device=args.device)
    prompts = (chat_prompts(eng.tokenizer) * 4)[: args.prompts]
    params = SamplingParams(temperature=1.0, seed=args.seed)
    TreeSampler(eng, TreeConfig.small()).sample(prompts[:1], params)  # warm-up
    rows = []
    seq = run(TreeSampler(eng, TreeConfig.sequential(args.width, args.budget, seed=args.seed)), prompts, params)
    rows.append({"mode": "sequential", "split": f"1x{args.budget}", **seq})
    for split in args.splits.split(","):
        d, l = map(int, split.split("x"))
        cfg = TreeConfig(segment_len=l, max_depth=d, max_width=args.width, branch_factor=args.branch,
                         max_response_len=args.budget, seed=args.seed)
        r = run(TreeSampler(eng, cfg), prompts, params)
        r["traj_ratio"] = r["traj_per_s"] / seq["traj_per_s"]
        r["compute_saved"] = 1 - r["processed"] / seq["processed"]
        # sequential / tree processed tokens: the TrajPS ratio's ceiling when a token costs the same
        # in both runs (same leaf count); a step's fixed cost (weights read once per step) lowers it
        r["token_ratio"] = seq["processed"] / r["processed"]
        rows.append({"mode": "tree", "split": split, **r})
    print(f"{args.prompts} prompts x W={args.width} leaves, budget {args.budget} tokens, b={args.branch}, "
          f"{args.dtype}, backend {eng.backend.name}, {args.threads} threads")
    print_table(rows, ["mode", "split", "wall_s", "leaves", "traj_per_s", "traj_ratio", "token_ratio", "token_per_s",
                       "resp_tok_per_s", "compute_saved", "peak_kv_pages", "fallbacks", "forward_passes"])
    best = max((r for r in rows if r["mode"] == "tree"), key=lambda r: r["traj_ratio"])
    print(f"best split {best['split']}: {best['traj_ratio']:.2f}x sequential TrajPS, "
          f"{best['compute_saved']:.0%} compute saved")
    result_line("sampling", {"args": vars(args), "backend": eng.backend.name, "rows": rows,
                             "best_split": best["split"], "best_traj_ratio": best["traj_ratio"]})


if __name__ == "__main__":
    main()

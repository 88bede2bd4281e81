"""Time per RL step and its split, tree vs sequential sampling at equal leaves per prompt (CPU,
bundled SmolLM2). Each mode is a real `treepo.train` run in its own process; figures are the
means over its steps (the first step excluded as warm-up when there are several). Usage:

    python bench/bench_train.py [--steps 4] [--prompts 8] [--leaves 8] [--split 4x32]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, result_line  # noqa: E402

PHASES = ["timing/gen", "timing/old_log_prob", "timing/adv", "timing/update", "timing/weight_sync", "timing/step"]


def run_mode(mode, args, out):
    d, l = map(int, args.split.split("x"))
    cmd = [sys.executable, "-m", "treepo.train", "--mode", mode, "--steps", str(args.steps),
           "--prompts_per_step", str(args.prompts), "--leaves", str(args.leaves), "--segment_len", str(l),
           "--max_depth", str(d), "--max_response_len", str(d * l), "--eval_every", "0", "--heldout_size", "8",
           "--eval_n", "1", "--eval_max_tokens", "8", "--eval_gsm8k", "false", "--save_every", "0",
           "--export_hf", "false", "--dynamic_sampling", "false", "--output_dir", out, "--seed", str(args.seed)]
    subprocess.run(cmd, check=True, capture_output=True)
    recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if "timing/step" in x]
    recs = recs[1:] if len(recs) > 1 else recs
    row = {"mode": mode}
    for k in PHASES + ["sampling/tokens_processed", "response/len_mean"]:
        row[k.split("/")[1]] = sum(r.get(k, 0.0) for r in recs) / len(recs)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--leaves", type=int, default=8)
    ap.add_argument("--split", default="4x32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_mode(m, args, os.path.join(tmp, m)) for m in ("sequential", "tree")]
    print(f"{args.prompts} prompts x {args.leaves} leaves, split {args.split}, {args.steps} steps")
    print_table(rows, ["mode", "gen", "old_log_prob", "adv", "update", "weight_sync", "step",
                       "tokens_processed", "len_mean"])
    saved = 1 - rows[1]["step"] / rows[0]["step"]
    print(f"tree step time saved vs sequential: {saved:.0%} (paper: 12-43% of GPU hours)")
    result_line("train", {"args": vars(args), "rows": rows, "step_time_saved": saved})


if __name__ == "__main__":
    main()

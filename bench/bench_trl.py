"""TRL's GRPOTrainer with its own generation vs with treepo's rollouts (issue 17), side by side.

    python bench/bench_trl.py [--out runs/bench_trl] [--arms trl,engine,tree] [--steps 3] [--prompts 8]
        [--generations 8] [--max_tokens 128]

Each arm is one run of examples/trl_treepo.py (same model, task, reward, prompts, seed, optimizer;
the bundled SmolLM2-135M in fp32 on the CPU), in its own process, one after another:
    trl     GRPOTrainer with TRL's own generation (transformers generate)
    engine  GRPOTrainer, rollout_func = i.i.d. samples from treepo's engine (TreeConfig.sequential)
    tree    TreePOGRPOTrainer: TreePO trees on treepo's engine, TreePO tree advantages
Per arm, the mean over steps after the first (the first carries one-time costs: the engine's KV
cache and warm-up) of: step seconds, generation seconds (inside GRPOTrainer._generate), the rest
(rewards, log-probs, forward/backward, optimizer), the tokens generation processed (treepo: the
engine's prefill + decode counter; TRL: rows x (prompt + completion), a lower bound for a padded
batch), and the accuracy of the step's completions. Prints a table and a final JSON line.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import names_flag, print_table, result_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("trl", "engine", "tree")


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(arm: str, steps: list[dict]) -> dict:
    later = steps[1:] or steps
    row = {"arm": arm, "steps": len(steps)}
    for k in ("step_s", "gen_s", "update_s", "accuracy"):
        row[k] = mean([s[k] for s in later])
    row["gen_tokens"] = mean([s.get("tokens_processed", s["sequential_tokens"]) for s in later])
    row["first_step_s"] = steps[0]["step_s"] if steps else float("nan")
    row["accuracy_all"] = mean([s["accuracy"] for s in steps])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description="TRL generation vs treepo rollouts inside TRL")
    ap.add_argument("--out", default="runs/bench_trl")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    arms = names_flag(a.arms, ARMS, "arms")
    for arm in arms:
        if os.path.exists(os.path.join(a.out, arm, "steps.jsonl")):
            raise SystemExit(f"--out {a.out}: {arm}/steps.jsonl exists; give another --out or delete it")
    rows = []
    for arm in arms:
        out = os.path.join(a.out, arm)
        cmd = [sys.executable, os.path.join(ROOT, "examples", "trl_treepo.py"), "--rollout", arm, "--out", out,
               "--steps", str(a.steps), "--prompts", str(a.prompts), "--generations", str(a.generations),
               "--max_tokens", str(a.max_tokens), "--seed", str(a.seed)]
        print(f"[{arm}] {' '.join(cmd[1:])}", flush=True)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "log.txt"), "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT}).returncode
        if rc:
            raise SystemExit(f"[{arm}] failed (exit {rc}); see {out}/log.txt")
        with open(os.path.join(out, "steps.jsonl")) as f:
            steps = [json.loads(line) for line in f if line.strip()]
        rows.append(summarize(arm, steps))
    base = next((r for r in rows if r["arm"] == "trl"), None)
    for r in rows:
        r["gen_speedup_vs_trl"] = base["gen_s"] / r["gen_s"] if base else float("nan")
        r["step_speedup_vs_trl"] = base["step_s"] / r["step_s"] if base else float("nan")
    print(f"\n{a.prompts} prompts x {a.generations} completions, <= {a.max_tokens} tokens, fp32 CPU; "
          f"means over steps 2..{a.steps}")
    print_table(rows, ["arm", "steps", "step_s", "gen_s", "update_s", "gen_tokens", "accuracy", "first_step_s",
                       "gen_speedup_vs_trl", "step_speedup_vs_trl"])
    result_line("trl", {"settings": vars(a), "arms": rows})


if __name__ == "__main__":
    main()

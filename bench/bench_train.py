"""Time and memory per RL step: sampling mode {tree, sequential} x training layout {none, prompt,
tree} (CPU, bundled SmolLM2). Each run is a real `python -m treepo.train` in its own process, all
with the same prompts and seeds; the parent reaps each child with os.wait4, so the peak RSS is
that child's own. Figures are means over steps (the first excluded as warm-up when there are
several). Usage:

    python bench/bench_train.py [--steps 4] [--prompts 8] [--leaves 8] [--split 4x32]
        [--modes tree,sequential] [--packings none,prompt,tree] [--micro_batch_tokens N]
        [--autocast auto|bf16|off] [--engine_dtype auto|bfloat16|float32]

Packing "none" trains the padded [leaves, prompt + response] layout, "prompt" computes each
prompt once, "tree" every unique token of a tree once (the TreePO trainer's --packing). The
packing name "default" passes no --packing flag (the trainer's own default; also what runs on a
trainer that predates the flag). Derived columns:
  train_s     old_log_prob + update seconds (the phases packing speeds up);
  speedup     train_s of the same mode with packing none / this run's train_s;
  ideal       leaf tokens / the tokens this packing computes (packing/leaf_tokens / packing/forward_tokens:
              for "tree" packing/ideal_ratio, leaf / unique tokens); 1 for packing none;
  tok_ratio   padded tokens / computed tokens: the token saving against the "none" run itself, padding
              included (>= ideal);
  of_ideal    speedup / ideal: the share of the token saving that became time saved;
  step_less   1 - step / step of the DAPO baseline (sequential + none);
  rss_rel, mem_rel   peak RSS and perf/update_peak_mem_gb relative to the baseline's.
A metric a run does not log (e.g. packing/* from an older trainer) shows as n/a.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import names_flag, print_table, result_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("tree", "sequential")
PACKINGS = ("none", "prompt", "tree")
PHASES = ["timing/gen", "timing/old_log_prob", "timing/adv", "timing/update", "timing/weight_sync", "timing/step"]
METRICS = PHASES + ["sampling/tokens_processed", "response/len_mean", "packing/unique_tokens",
                    "packing/leaf_tokens", "packing/ideal_ratio", "packing/padding_avoided",
                    "packing/forward_tokens", "packing/padded_tokens", "perf/update_peak_mem_gb",
                    "perf/update_mem_growth_gb"]
BASELINE = ("sequential", "none")
TARGETS = {"of_ideal": 0.8, "step_less": 0.4, "mem_rel": 0.5}
COLS = ["mode", "packing", "gen", "old_log_prob", "update", "step", "train_s", "unique_tokens", "leaf_tokens",
        "forward_tokens", "ideal", "tok_ratio", "speedup", "of_ideal", "step_less", "peak_rss_gb", "rss_rel",
        "update_peak_mem_gb", "update_mem_growth_gb", "mem_rel"]


def train_cmd(mode: str, packing: str, args, out: str) -> list[str]:
    """The treepo.train command line of one run (flags left at None are not passed)."""
    d, l = map(int, args.split.split("x"))
    cmd = [sys.executable, "-m", "treepo.train", "--mode", mode, "--steps", str(args.steps),
           "--prompts_per_step", str(args.prompts), "--leaves", str(args.leaves), "--segment_len", str(l),
           "--max_depth", str(d), "--max_response_len", str(d * l), "--eval_every", "0", "--heldout_size", "8",
           "--eval_n", "1", "--eval_max_tokens", "8", "--eval_gsm8k", "false", "--save_every", "0",
           "--export_hf", "false", "--dynamic_sampling", "false", "--output_dir", out, "--seed", str(args.seed)]
    if packing != "default":
        cmd += ["--packing", packing]
    for flag in ("micro_batch_tokens", "autocast", "engine_dtype"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    return cmd


def run_child(cmd: list[str], log: str) -> tuple[int, float]:
    """Run cmd to the end; (exit status, its peak RSS in GiB from os.wait4's rusage)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return p.returncode, usage.ru_maxrss / (1 << 20)  # ru_maxrss: kB on Linux


def mean_metrics(records: list[dict]) -> dict:
    """Per metric of METRICS: its mean over the step records that have it (None if none does);
    the first step is dropped as warm-up when there are several."""
    recs = [r for r in records if "timing/step" in r]
    recs = recs[1:] if len(recs) > 1 else recs
    out = {}
    for k in METRICS:
        vals = [r[k] for r in recs if isinstance(r.get(k), (int, float))]
        out[k.split("/")[1]] = sum(vals) / len(vals) if vals else None
    return out


def run(mode: str, packing: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, f"{mode}_{packing}")
    cmd = train_cmd(mode, packing, args, out)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "stdout.txt")
    code, rss = run_child(cmd, log)
    row = {"mode": mode, "packing": packing, "peak_rss_gb": rss, "exit": code}
    metrics = os.path.join(out, "metrics.jsonl")
    if code != 0 or not os.path.exists(metrics):
        tail = [ln.strip() for ln in open(log) if ln.strip()][-1:] or ["(no output)"]
        row["error"] = f"exit {code}: {tail[0][:300]}"
        return row
    return row | mean_metrics([json.loads(x) for x in open(metrics)])


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def summarize(rows: list[dict]) -> list[dict]:
    """rows (one per run: mode, packing, the mean_metrics fields, peak_rss_gb; "error" if it
    failed) with the derived columns of the module docstring added. A mode's reference is its
    packing "none" run ("default" when there is none); the baseline is sequential's reference."""
    out = [dict(r) for r in rows]
    for r in out:
        ol, up = r.get("old_log_prob"), r.get("update")
        r["train_s"] = (ol or 0.0) + up if isinstance(up, (int, float)) else None
    ok = [r for r in out if "error" not in r]

    def ref_of(mode):
        return next((r for p in ("none", "default") for r in ok if (r["mode"], r["packing"]) == (mode, p)), None)

    base = ref_of(BASELINE[0])
    for r in ok:
        ref = ref_of(r["mode"])
        r["ideal"] = 1.0 if r is ref or r["packing"] == "none" else _ratio(r.get("leaf_tokens"),
                                                                            r.get("forward_tokens"))
        r["tok_ratio"] = _ratio(r.get("padded_tokens"), r.get("forward_tokens"))
        r["speedup"] = _ratio(ref["train_s"], r["train_s"]) if ref else None
        r["of_ideal"] = _ratio(r["speedup"], r["ideal"])
        if base is not None:
            rel = _ratio(r.get("step"), base.get("step"))
            r["step_less"] = 1 - rel if rel is not None else None
            r["rss_rel"] = _ratio(r.get("peak_rss_gb"), base.get("peak_rss_gb"))
            r["mem_rel"] = _ratio(r.get("update_peak_mem_gb"), base.get("update_peak_mem_gb"))
    return out


def _check(value, target, higher: bool, fmt="{:.0%}") -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher else value <= target
    return f"{fmt.format(value)} {'PASS' if ok else 'FAIL'}"


def targets(rows: list[dict]) -> list[str]:
    """The target lines: packed training phases reach >= 80% of the ideal ratio; TreePO (tree +
    tree) steps >= 40% faster than the DAPO baseline; its update peak memory <= half the baseline's."""
    lines = []
    for r in rows:
        if r["packing"] in ("prompt", "tree"):
            lines.append(f"target {r['mode']}+{r['packing']}: training phases reach >= 80% of the ideal ratio: "
                         + _check(r.get("of_ideal"), TARGETS["of_ideal"], True))
    tt = next((r for r in rows if (r["mode"], r["packing"]) == ("tree", "tree")), {})
    lines.append("target tree+tree: step time >= 40% less than the baseline (sequential+none): "
                 + _check(tt.get("step_less"), TARGETS["step_less"], True))
    rss = f"; peak RSS {tt['rss_rel']:.2f}x" if tt.get("rss_rel") is not None else ""
    lines.append("target tree+tree: update peak memory <= half of the baseline's: "
                 + _check(tt.get("mem_rel"), TARGETS["mem_rel"], False, "{:.2f}x") + rss)
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--leaves", type=int, default=8)
    ap.add_argument("--split", default="4x32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--packings", default=",".join(PACKINGS), help="subset of none,prompt,tree; 'default' passes "
                    "no --packing flag")
    ap.add_argument("--micro_batch_tokens", type=int, default=None)
    ap.add_argument("--autocast", default=None)
    ap.add_argument("--engine_dtype", default=None)
    args = ap.parse_args()
    modes = names_flag(args.modes, MODES, "modes")
    packings = names_flag(args.packings, PACKINGS + ("default",), "packings")
    with tempfile.TemporaryDirectory() as tmp:
        rows = summarize([run(m, p, args, tmp) for m in modes for p in packings])
    print(f"{args.prompts} prompts x {args.leaves} leaves, split {args.split}, {args.steps} steps, seed {args.seed}; "
          f"micro_batch_tokens {args.micro_batch_tokens}, autocast {args.autocast}, engine_dtype {args.engine_dtype} "
          "(None: the trainer's default)")
    print_table([{c: "n/a" if r.get(c) is None else r[c] for c in COLS} for r in rows], COLS)
    for r in rows:
        if "error" in r:
            print(f"run {r['mode']}+{r['packing']} failed: {r['error']}")
    lines = targets(rows)
    print("\n".join(lines))
    result_line("train", {"args": vars(args), "rows": rows, "targets": lines})


if __name__ == "__main__":
    main()

"""Test-time tree search (paper section 4.5): best-of-N against TreePO trees of a few shapes, on
the held-out task and on GSM8K, as accuracy (mean@n, maj@n, pass@k) against the compute spent
(tokens through the engine, wall seconds). Usage:

    python bench/bench_test_time.py [--model DIR | --run RUN_DIR] [--datasets heldout,gsm8k]
        [--shapes seq:4,seq:8,tree:w8:d4:b2,tree:w16:d4:b2] [--problems 24] [--gsm8k_problems 10]
        [--seeds 0] [--max_tokens 128] [--gsm8k_max_tokens 256] [--temperature 0.6] [--out runs/test_time]

Samplers are spelled as in treepo/train/test_time.py: `seq:N` (N i.i.d. samples) or
`tree:wW:DxL:bB[:rLO-HI]` (W leaves, depth D x segment L, branch factor B, random initial
divergence LO..HI), with `dD` for a segment of ceil(max_tokens / D) so one shape fits both
datasets' budgets. Every shape and seed samples the same problems with the same temperature and
token budget; `--seeds` repeats the whole sweep with other sampling seeds (mean, min, max shown).
`--run` takes a trainer run's directory (e.g. one of bench/bench_learning.py's): its `hf/` export
is the model and its config's data settings give the very held-out set it was evaluated on;
otherwise the held-out set is the trainer's default task's (`--heldout_size`, `--data_seed`,
`--train_jsonl` as for `treepo train`), of which the first `--problems` are used.

Target (issue 16): some tree shape reaches a best-of-N row's maj@n with fewer tokens.
Writes DIR/test_time.json, DIR/test_time.md, DIR/test_time_vs_tokens.png and
DIR/test_time_vs_wall.png (replacing earlier ones) and ends with one JSON line.

Default size, estimated (the full sweep was not run) for 2 CPU cores, the bundled SmolLM2-135M in
fp32. Measured with the two cores shared with another job: seq:4 on 16 held-out problems, 366
tokens per problem (prompt ~60 + 4 x ~79) in 59 s, ~100 tokens/s; ~150 tokens/s on quiet cores
(bench_train's generation). Held-out, per problem: seq:4 ~370 + seq:8 ~690 + trees of 8 and 16
leaves at ~60% and ~50% of their leaves' tokens ~420 + ~670 = ~2150 tokens, x 24 problems = 52k.
GSM8K at 256 tokens (prompt ~150, ~200 per sample): ~5500 tokens per problem x 10 = 55k. ~107k
tokens: ~12 min at 150 tokens/s (trees run somewhat fewer tokens/s than best-of-N: paths finish
unevenly, so their decode batches are smaller). All 100 GSM8K problems (`--gsm8k_problems 100`)
take ~1 hour more; a trained model's shorter answers take less.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import names_flag, print_table, result_line  # noqa: E402

DATASETS = ("heldout", "gsm8k")
DEFAULT_SHAPES = "seq:4,seq:8,tree:w8:d4:b2,tree:w16:d4:b2"
METRICS = ("mean@n", "maj@n", "pass@1", "pass@n", "response_len")
COMPUTE = ("tokens", "prefill_tokens", "decode_tokens", "forward_passes", "wall_s", "sample_s", "samples",
           "response_tokens")
COLS = ["shape", "n", "seeds", "mean@n", "maj@n", "maj_min", "maj_max", "pass@1", "pass@n", "tokens",
        "tok_per_problem", "wall_s", "response_len"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="test-time tree search vs best-of-N")
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--run", default=None, help="a trainer run dir: model = RUN/hf, held-out set = the run's")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--problems", type=int, default=24, help="first problems of the held-out set")
    ap.add_argument("--gsm8k_problems", type=int, default=10, help="first problems of the 100 GSM8K test problems")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--max_tokens", type=int, default=128, help="response budget on the held-out task")
    ap.add_argument("--gsm8k_max_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--heldout_size", type=int, default=64, help="as treepo train's (without --run)")
    ap.add_argument("--data_seed", type=int, default=0, help="treepo train's --seed that drew the held-out set")
    ap.add_argument("--train_jsonl", default=None, help="as treepo train's: a JSONL task instead of the default")
    ap.add_argument("--reward_fn", default=None, help="as treepo train's: module:function")
    ap.add_argument("--engine_dtype", default="auto", help="auto | bfloat16 | float32")
    ap.add_argument("--out", default="runs/test_time")
    args = ap.parse_args(argv)
    args.dataset_list = names_flag(args.datasets, DATASETS, "datasets")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1") from None
    if not args.seed_list:
        raise SystemExit("--seeds is empty: give comma-separated integers, e.g. 0,1")
    if args.model and args.run:
        raise SystemExit("give --model or --run (whose hf/ export is the model), not both")
    return args


def searches(args) -> dict[str, list]:
    """dataset -> its parsed samplers (a bad spelling stops here, before any model loads)."""
    from treepo.train.test_time import parse_search

    specs = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not specs:
        raise SystemExit(f"--shapes {args.shapes!r} is empty")
    out = {}
    for ds in args.dataset_list:
        budget = args.max_tokens if ds == "heldout" else args.gsm8k_max_tokens
        try:
            out[ds] = [parse_search(s, budget) for s in specs]
        except ValueError as e:
            raise SystemExit(f"--shapes: {e}") from None
    return out


def problems(args, ds: str) -> list:
    """The first --problems of the held-out set (the run's with --run), or the first
    --gsm8k_problems GSM8K test problems (treepo/train/test_time.py eval_problems)."""
    from treepo.train.test_time import eval_problems

    try:
        probs = eval_problems(ds, args.run, args.heldout_size, args.data_seed, args.train_jsonl)
    except ValueError as e:
        raise SystemExit(f"--datasets {ds}: {e}") from None
    return probs[:args.gsm8k_problems if ds == "gsm8k" else args.problems]


def load_engine(args):
    import torch

    from treepo.assets import bundled_model_path
    from treepo.engine.engine import Engine
    from treepo.engine.loader import load_model
    from treepo.engine.tokenizer import load_tokenizer
    from treepo.train.precision import resolve_engine_dtype

    path = os.path.join(args.run, "hf") if args.run else (args.model or bundled_model_path())
    if not os.path.isdir(path):
        raise SystemExit(f"model {path} is not a directory" + (" (was the run exported? --export_hf true)"
                                                               if args.run else ""))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(path, dtype=resolve_engine_dtype(args.engine_dtype, device), device=device)
    return Engine(model, load_tokenizer(path), device=device), path


def measure(engine, probs: list, scorer, search, args, ds: str, seed: int) -> dict:
    """One (dataset, shape, seed) point: the overall metrics and the compute."""
    from treepo.train.test_time import evaluate_search, search_summary

    budget = args.max_tokens if ds == "heldout" else args.gsm8k_max_tokens
    res = evaluate_search(engine, probs, scorer, search, temperature=args.temperature, max_tokens=budget, seed=seed,
                          progress=f"{ds} {search.spec} seed {seed}")
    return {"dataset": ds, "shape": search.spec, "seed": seed} | search_summary(res, search) | res["compute"]


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (dataset, shape): the mean over seeds of every metric and compute figure,
    maj@n's min and max, and tokens per problem."""
    out = []
    keys = list(dict.fromkeys((r["dataset"], r["shape"]) for r in rows))
    for ds, shape in keys:
        mine = [r for r in rows if (r["dataset"], r["shape"]) == (ds, shape)]
        a = {"dataset": ds, "shape": shape, "n": mine[0]["n"], "seeds": len(mine), "problems": mine[0]["problems"]}
        for k in METRICS + COMPUTE:
            a[k] = sum(r[k] for r in mine) / len(mine)
        a["maj_min"], a["maj_max"] = min(r["maj@n"] for r in mine), max(r["maj@n"] for r in mine)
        a["tok_per_problem"] = a["tokens"] / max(a["problems"], 1)
        a["tree"] = shape.startswith("tree:")
        out.append(a)
    return out


def targets(agg: list[dict]) -> list[str]:
    """Per dataset and best-of-N row: the cheapest tree (fewest tokens) reaching its maj@n with fewer tokens."""
    lines = []
    for ds in dict.fromkeys(a["dataset"] for a in agg):
        mine = [a for a in agg if a["dataset"] == ds]
        trees = [a for a in mine if a["tree"]]
        for s in [a for a in mine if not a["tree"]]:
            head = f"target {ds}: a tree reaches {s['shape']}'s maj@n {s['maj@n']:.3f} with fewer tokens: "
            if not trees:
                lines.append(head + "n/a (no tree shape)")
                continue
            ok = sorted((t for t in trees if t["maj@n"] >= s["maj@n"] and t["tokens"] < s["tokens"]),
                        key=lambda t: t["tokens"])
            if ok:
                t = ok[0]
                lines.append(head + f"{t['shape']} maj@n {t['maj@n']:.3f} with {t['tokens'] / s['tokens']:.2f}x the "
                             f"tokens and {t['wall_s'] / max(s['wall_s'], 1e-9):.2f}x the wall time PASS")
            else:
                lines.append(head + "no tree shape does FAIL")
    return lines


def markdown(agg: list[dict], lines: list[str], header: str) -> str:
    cols = [c for c in COLS if c not in ("maj_min", "maj_max")]
    out = [f"# Test-time search: {header}", ""]
    for ds in dict.fromkeys(a["dataset"] for a in agg):
        out += [f"## {ds}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for a in (a for a in agg if a["dataset"] == ds):
            cells = []
            for c in cols:
                v = a[c]
                if c == "maj@n" and a["seeds"] > 1:
                    cells.append(f"{v:.3f} ({a['maj_min']:.3f}-{a['maj_max']:.3f})")
                else:
                    cells.append(f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else
                                 f"{v:.0f}" if isinstance(v, float) else str(v))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out + [f"- {line}" for line in lines]) + "\n"


def plot(agg: list[dict], x: str, png: str, xlabel: str) -> str | None:
    """Accuracy (mean@n, maj@n, pass@n; rows: datasets) against compute x: best-of-N as a line
    over N, each tree shape a labelled point; bars are the seeds' min-max of maj@n."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no {png}")
        return None
    datasets = list(dict.fromkeys(a["dataset"] for a in agg))
    metrics = ("mean@n", "maj@n", "pass@n")
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(4.2 * len(metrics), 3.4 * len(datasets)),
                             squeeze=False)
    for i, ds in enumerate(datasets):
        mine = [a for a in agg if a["dataset"] == ds]
        seq = sorted((a for a in mine if not a["tree"]), key=lambda a: a[x])
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            if seq:
                ax.plot([a[x] for a in seq], [a[m] for a in seq], "o-", color="gray", label="best-of-N")
                for a in seq:
                    ax.annotate(f"N={a['n']}", (a[x], a[m]), fontsize=7, xytext=(3, -9), textcoords="offset points")
            for a in (a for a in mine if a["tree"]):
                kw = {}
                if m == "maj@n" and a["seeds"] > 1:
                    kw = dict(yerr=[[a[m] - a["maj_min"]], [a["maj_max"] - a[m]]])
                ax.errorbar([a[x]], [a[m]], fmt="s", capsize=3, label=a["shape"], **kw)
            ax.set_title(f"{ds}: {m}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = searches(args)
    from treepo.train.rewards.problems import ProblemScorer

    scorer = ProblemScorer(args.reward_fn)
    sets = {ds: problems(args, ds) for ds in args.dataset_list}
    engine, model_path = load_engine(args)
    rows, t0 = [], time.perf_counter()
    for ds in args.dataset_list:
        for seed in args.seed_list:  # seeds outermost: a sweep cut short still has every shape of seed 0
            for s in plan[ds]:
                rows.append(measure(engine, sets[ds], scorer, s, args, ds, seed))
                r = rows[-1]
                print(f"{ds} {s.spec} seed {seed}: maj@n {r['maj@n']:.3f} mean@n {r['mean@n']:.3f} "
                      f"{r['tokens']} tokens {r['wall_s']:.1f}s", flush=True)
    agg = aggregate(rows)
    os.makedirs(args.out, exist_ok=True)
    header = (f"model {model_path}; temperature {args.temperature}; budget {args.max_tokens} tokens (held-out), "
              f"{args.gsm8k_max_tokens} (GSM8K); seeds {args.seed_list}")
    print(header)
    for ds in args.dataset_list:
        print(f"{ds}: {len(sets[ds])} problems")
        print_table([a for a in agg if a["dataset"] == ds], COLS)
    lines = targets(agg)
    print("\n".join(lines))
    pngs = [plot(agg, "tok_per_problem", os.path.join(args.out, "test_time_vs_tokens.png"),
                 "tokens processed per problem"),
            plot(agg, "wall_s", os.path.join(args.out, "test_time_vs_wall.png"), "wall seconds (whole set)")]
    payload = {"args": {k: v for k, v in vars(args).items() if k not in ("dataset_list", "seed_list")},
               "model": model_path, "rows": rows, "aggregate": agg, "targets": lines,
               "pngs": [p for p in pngs if p], "total_s": time.perf_counter() - t0}
    with open(os.path.join(args.out, "test_time.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(args.out, "test_time.md"), "w") as f:
        f.write(markdown(agg, lines, header))
    result_line("test_time", payload)
    return payload


if __name__ == "__main__":
    main()

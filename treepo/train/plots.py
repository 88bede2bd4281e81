"""A PNG of the training curves from metrics.jsonl (matplotlib, headless)."""
from __future__ import annotations

import json


def plot_metrics(jsonl: str, png: str, keys=("reward/mean", "reward/accuracy", "eval/heldout/mean@n",
                                              "response/len_mean", "actor/pg_loss", "actor/entropy")) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no curves.png")
        return None
    recs = [json.loads(line) for line in open(jsonl) if line.strip()]
    keys = [k for k in keys if any(k in r for r in recs)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True)
    axes = [axes] if len(keys) == 1 else axes
    for ax, k in zip(axes, keys):
        pts = [(r["step"], r[k]) for r in recs if k in r and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_ylabel(k, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png

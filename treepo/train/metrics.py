"""Step metrics (verl / TRL names), reduced over ranks, and where they go: metrics.jsonl,
TensorBoard when it is installed, and one progress line per step on rank 0.

Every reduction here is a collective: all ranks call these functions in the same order.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.distributed as dist

from treepo.rollout.tree import FINISH_REASONS

from .distributed import all_max, all_reduce_scalar
from .rollout import RolloutStats


def _mean(values: list[float]) -> float:
    return all_reduce_scalar(sum(values)) / max(all_reduce_scalar(len(values)), 1)


class TokenWeighted:
    """Token-weighted means of per-micro-batch metrics (each a mean over its valid tokens)."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, metrics: dict, tokens: float):
        for k, v in metrics.items():
            s = self.sums.setdefault(k, [0.0, 0.0])
            s[0] += float(v) * tokens
            s[1] += tokens

    def reduce(self, prefix: str) -> dict:
        return {f"{prefix}{k}": all_reduce_scalar(s) / max(all_reduce_scalar(w), 1.0)
                for k, (s, w) in sorted(self.sums.items())}


def rollout_metrics(st: RolloutStats, kept_prompts: int, kept_leaves: int, max_response_len: int) -> dict:
    """reward/*, batch/*, response/*, finish/*, sampling/* over all ranks."""
    m = {"reward/mean": _mean(st.rewards), "reward/accuracy": _mean(st.accuracies),
         "reward/failures": all_reduce_scalar(st.reward_failures),
         "batch/prompts_kept": all_reduce_scalar(kept_prompts),
         "batch/prompts_dropped": all_reduce_scalar(st.prompts_dropped),
         "batch/gen_rounds": all_max(st.gen_rounds), "batch/short": all_max(int(st.short_batch)),
         "batch/leaves": all_reduce_scalar(kept_leaves)}
    lens = st.leaf_lengths
    m["response/len_mean"] = _mean(lens)
    m["response/len_max"] = all_max(max(lens, default=0))
    m["response/clip_ratio"] = _mean([float(n >= max_response_len) for n in lens])
    for reason in FINISH_REASONS:
        m[f"finish/{reason}"] = all_reduce_scalar(st.finish.get(reason, 0))
    proc, seq = all_reduce_scalar(st.processed_tokens), all_reduce_scalar(st.sequential_tokens)
    m["sampling/tokens_processed"] = proc
    m["sampling/engine_tokens"] = all_reduce_scalar(st.engine_tokens)
    m["sampling/compute_saved_vs_sequential"] = 1 - proc / max(seq, 1)
    return m


def timing_metrics(timing: dict[str, float]) -> dict:
    """timing/<phase>: the slowest rank's seconds."""
    return {f"timing/{k}": all_reduce_scalar(v, dist.ReduceOp.MAX) for k, v in timing.items()}


class MetricsLog:
    """Appends records to output_dir/metrics.jsonl (and TensorBoard events) on rank 0."""

    def __init__(self, out_dir: str, rank: int):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.rank = rank
        self.tb = None
        if rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def truncate(self, step: int) -> int:
        """Keep only the records of steps <= step (a resumed run redoes the later ones), rewriting
        metrics.jsonl atomically; an unparsable line (a write cut short by a crash) goes too.
        Returns how many records were dropped. TensorBoard events are not rewritten."""
        if self.rank != 0 or not os.path.exists(self.path):
            return 0
        kept, dropped = [], 0
        with open(self.path) as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    rec = None
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                    kept.append(line.rstrip("\n") + "\n")
                else:
                    dropped += 1
        with open(self.path + ".tmp", "w") as fh:
            fh.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        return dropped

    def write(self, rec: dict):
        if self.rank != 0:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None and "step" in rec:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])


def progress_line(step: int, steps: int, m: dict) -> str:
    """One line per step with what says a run is healthy (the pg loss is not among them: the
    token mean of whitened advantages is ~0 by construction on a step's first epoch):
    reward and accuracy (are the leaves getting better), response length, the PPO clip fraction
    and approximate KL (is the update the size it should be), entropy (is the policy collapsing),
    gradient norm, prompts kept by dynamic sampling, what tree sampling saved over sequential
    sampling, and the step's seconds with its two big phases."""
    done = step / steps
    bar = "#" * int(20 * done) + "-" * (20 - int(20 * done))
    g = m.get
    return (f"[{bar}] step {step}/{steps} | reward {g('reward/mean', 0):+.3f} acc {g('reward/accuracy', 0):.3f} "
            f"len {g('response/len_mean', 0):.0f} | clip {g('actor/pg_clipfrac', 0):.3f} "
            f"kl {g('actor/ppo_kl', 0):.1e} ent {g('actor/entropy', 0):.3f} gn {g('actor/grad_norm', 0):.3f} | "
            f"kept {g('batch/prompts_kept', 0):.0f} saved {g('sampling/compute_saved_vs_sequential', 0):.0%} | "
            f"{g('timing/step', 0):.1f}s (gen {g('timing/gen', 0):.1f} update {g('timing/update', 0):.1f})")


def eval_line(step: int, ev: dict) -> str:
    return "eval step " + str(step) + " " + " ".join(
        f"{k.split('eval/')[1]}={v:.3f}" for k, v in ev.items() if not k.endswith("problems"))


def packing_metrics(batch) -> dict:
    """Tokens of one training pass, over all ranks: unique (every shared prefix once), per leaf,
    padded, and what this run's packing computes (docs/training.md section 10)."""
    st = batch.packing_stats() if batch is not None else {"unique": 0, "leaf": 0, "padded": 0, "forward": 0}
    st = {k: all_reduce_scalar(v) for k, v in st.items()}
    return {"packing/unique_tokens": st["unique"], "packing/leaf_tokens": st["leaf"],
            "packing/padded_tokens": st["padded"], "packing/forward_tokens": st["forward"],
            "packing/ideal_ratio": st["leaf"] / max(st["unique"], 1),
            "packing/padding_avoided": st["padded"] - st["forward"]}

def batch_metrics(batch, old_lp: torch.Tensor | None) -> dict:
    """adv/mean, adv/std (per leaf, before whitening) and the sampler-vs-trainer log-prob gap
    (mean |difference| per response token), over all ranks (collectives)."""
    adv = batch.advantages.double() if batch is not None else torch.zeros(0, dtype=torch.float64)
    n, s, sq = (all_reduce_scalar(x) for x in (adv.numel(), float(adv.sum()), float((adv * adv).sum())))
    m = {}
    if n:
        mean = s / n
        m["adv/mean"] = mean
        m["adv/std"] = math.sqrt(max(sq - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 0.0
    gap, tokens = 0.0, 0.0
    if batch is not None:
        valid = batch.mask.bool()
        gap, tokens = float((batch.sampler_logprobs[valid] - old_lp[valid]).abs().sum()), float(valid.sum())
    gap, tokens = all_reduce_scalar(gap), all_reduce_scalar(tokens)
    if tokens:
        m["mismatch/sampler_vs_trainer_logp"] = gap / tokens
    return m

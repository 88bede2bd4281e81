"""The output directory of a run, checked before any model is loaded: it must be writable, it may
not hold another run unless the user continues it (--resume) or replaces it (--overwrite), and a
resumed run starts from a checkpoint whose checksums hold. docs/training.md, sections 1 and 7.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from . import checkpoint as ckpt
from .distributed import all_max

# what a run writes into its output_dir: the entries that mark an earlier run, and what
# --overwrite deletes (any other file there is the user's and is kept)
RUN_ENTRIES = ("config.json", "metrics.jsonl", "checkpoints", "hf", "hf.tmp", "curves.png", "tb")


@dataclass
class RunPlan:
    """What plan_run decided for the output directory."""

    resume_from: str | None = None  # the verified checkpoint directory to continue from; None = fresh run
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints passed over (--resume_fallback)
    previous: list[str] = field(default_factory=list)  # an earlier run's entries (--overwrite deletes them)


def previous_run(out: str) -> list[str]:
    """The RUN_ENTRIES present in out."""
    return [e for e in RUN_ENTRIES if os.path.lexists(os.path.join(out, e))]


def check_writable(out: str):
    """Create out if needed and write a probe file into it; ValueError naming out otherwise."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output_dir {out} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".treepo_probe_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output_dir {out} is not writable ({e.strerror}: {e.filename or out})") from None


def plan_run(cfg) -> RunPlan:
    """Check cfg.output_dir for cfg (a TrainConfig) and choose the checkpoint to resume from.
    Changes nothing but creating the directory; ValueError that names the directory or file."""
    out = cfg.output_dir
    previous = previous_run(out) if os.path.isdir(out) else []
    plan = RunPlan(previous=previous)
    if cfg.resume:
        plan.resume_from, plan.skipped = ckpt.resume_checkpoint(os.path.join(out, "checkpoints"),
                                                                fallback=cfg.resume_fallback)
    elif previous and not cfg.overwrite:
        raise ValueError(f"--output_dir {out} holds another run ({', '.join(previous)}); pass --resume true "
                         "to continue it, --overwrite true to delete it and start afresh, or choose another "
                         "--output_dir")
    check_writable(out)
    return plan


def plan_run_on_rank0(cfg, rank: int) -> RunPlan:
    """Collective: plan_run on rank 0 only (one reader of the checksummed files); every rank
    raises if it refused, and learns the checkpoint it chose."""
    plan, err = RunPlan(), None
    if rank == 0:
        try:
            plan = plan_run(cfg)
        except (ValueError, OSError) as e:
            err = e
    failed = all_max(err is not None)
    if err is not None:
        raise err
    if failed:
        raise ValueError(f"rank 0 refused output_dir {cfg.output_dir} (see its error)")
    step = int(all_max(ckpt.checkpoint_step(plan.resume_from) if plan.resume_from else -1))
    if rank != 0 and step >= 0:
        plan.resume_from = os.path.join(cfg.output_dir, "checkpoints", f"step_{step:06d}")
    return plan


def clear_previous_run(out: str) -> list[str]:
    """--overwrite: delete the RUN_ENTRIES in out; returns their names."""
    gone = previous_run(out)
    for e in gone:
        p = os.path.join(out, e)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    return gone


def write_config(out: str, cfg):
    """out/config.json: the run's full config (replaced atomically)."""
    path = os.path.join(out, "config.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(dataclasses.asdict(cfg), fh, indent=1)
    os.replace(path + ".tmp", path)

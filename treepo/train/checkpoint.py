"""Resumable checkpoints (torch distributed checkpointing) and Hugging Face export.

Layout under <output_dir>/checkpoints/:
    step_000012/            DCP shards of model + optimizer state (any world size can load them)
        treepo_meta.json    step, scheduler, data position, config; written LAST = the "complete" mark
        rng_rank{r}.pt      each rank's RNG states
    latest                  name of the newest complete checkpoint (replaced atomically)
A checkpoint is written into step_XXXX.tmp and renamed when complete, so a crash mid-write never
destroys the previous one; a directory without treepo_meta.json is reported as incomplete.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

META = "treepo_meta.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(st: dict):
    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])


def save_checkpoint(root: str, step: int, model, optimizer, extra: dict) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    name = f"step_{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"step": step, **extra}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    _barrier()
    return final


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under root, or None."""
    ptr = os.path.join(root, "latest")
    if os.path.exists(ptr):
        with open(ptr) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.exists(os.path.join(path, META)):
            return path
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
                  and os.path.exists(os.path.join(root, d, META))) if os.path.isdir(root) else []
    return os.path.join(root, done[-1]) if done else None


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Collective. Restores model, optimizer and this rank's RNG; returns the saved meta dict."""
    meta_file = os.path.join(path, META)
    if not os.path.exists(meta_file):
        raise ValueError(f"checkpoint {path} is incomplete or corrupted (no {META}); "
                         "delete it or resume from an earlier one")
    with open(meta_file) as f:
        meta = json.load(f)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP raises several types for missing/corrupted shards
        raise ValueError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    return meta


def full_state_dict(model, all_ranks: bool = False) -> dict:
    """Full (unsharded) state dict; collective under FSDP. By default only rank 0 receives it
    (on CPU); all_ranks=True gives every rank the whole thing (engine weight sync)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))


def export_hf(model, out_dir: str, hf_config: dict, tokenizer=None, dtype=torch.float32) -> str | None:
    """Collective. Rank 0 writes a transformers-loadable checkpoint (safetensors + config +
    tokenizer) into out_dir (atomically)."""
    from safetensors.torch import save_file

    sd = full_state_dict(model)
    if _rank() != 0:
        return None
    if hf_config.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(hf_config)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir

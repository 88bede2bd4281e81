"""Resumable checkpoints (torch distributed checkpointing) and Hugging Face export.

Layout under <output_dir>/checkpoints/:
    step_000012/            DCP shards of model + optimizer state (any world size can load them)
        treepo_meta.json    step, scheduler, data position, config, and the sha256 and size of every
                            other file; written LAST = the "complete" mark
        rng_rank{r}.pt      each rank's RNG states
    latest                  name of the newest complete checkpoint (replaced atomically)
A checkpoint is written into step_XXXX.tmp and renamed when complete, so a crash or a full disk
mid-write never destroys the previous one; a directory without treepo_meta.json is incomplete.
Weights with a NaN or inf are never written (`check_finite`), and a file that changed after it was
written is found on resume (`verify_checkpoint`). docs/training.md, section 7.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

META = "treepo_meta.json"
STEP_DIR = re.compile(r"step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a collective when distributed)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _fault(point: str, step: int):
    """Test hook: TREEPO_FAULT=<point>[@<step>] SIGKILLs this process at `point` of a save (every
    save, or only step's). The one point is "checkpoint_after_shards": every shard and RNG file is
    written, the completion mark is not (tests/test_trainer.py kills a run there and resumes it)."""
    name, _, at = os.environ.get("TREEPO_FAULT", "").partition("@")
    if name == point and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(st: dict):
    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])


# ---------------------------------------------------------------------- finiteness
def _tensors(tree, prefix: str = ""):
    """(dotted name, local tensor) for every tensor in a nested dict/list state (DTensor: this
    rank's shard), in a fixed order (the same on every rank)."""
    if isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from _tensors(tree[k], f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}{i}.")
    elif isinstance(tree, torch.Tensor):
        yield prefix[:-1], tree.to_local() if hasattr(tree, "to_local") else tree


def nonfinite(state) -> dict[str, int]:
    """{tensor name: count of NaN/inf values} over all ranks (a collective when distributed:
    every rank passes a state with the same names)."""
    named = [(n, t) for n, t in _tensors(state) if t.is_floating_point()]
    if not named:
        return {}
    counts = torch.zeros(len(named), dtype=torch.float64)
    by_device: dict[torch.device, list[int]] = {}  # AdamW's "step" stays on the CPU beside CUDA weights
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():  # one device-to-host copy per device
        counts[idx] = torch.stack([(~torch.isfinite(named[i][1])).sum() for i in idx]).to("cpu", torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return {n: int(c) for (n, _), c in zip(named, counts.tolist()) if c}


def check_finite(state, what: str):
    """ValueError naming the tensors of `state` that hold NaN or inf (collective)."""
    bad = nonfinite(state)
    if bad:
        names = ", ".join(f"{n} ({c} values)" for n, c in list(bad.items())[:4])
        more = f" and {len(bad) - 4} more tensors" if len(bad) > 4 else ""
        raise ValueError(f"refusing to {what}: non-finite (NaN/inf) values in {names}{more}; the training "
                         "diverged (try a lower --lr or --grad_clip); earlier files are unchanged")


# ---------------------------------------------------------------------- checksums
def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(d: str) -> dict:
    """{relative path: {"sha256", "bytes"}} of every file under d but the completion mark."""
    out = {}
    for base, _, names in os.walk(d):
        for n in sorted(names):
            p = os.path.join(base, n)
            rel = os.path.relpath(p, d)
            if rel != META:
                out[rel] = {"sha256": sha256(p), "bytes": os.path.getsize(p)}
    return out


def read_meta(path: str) -> dict:
    """The completion mark of checkpoint dir `path`: ValueError naming the file if absent or not JSON."""
    f = os.path.join(path, META)
    if not os.path.exists(f):
        raise ValueError(f"checkpoint {path} is incomplete or corrupted (no {META}); "
                         "delete it or resume from an earlier one")
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint meta {f} is corrupted: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"checkpoint meta {f} is corrupted: not an object with an integer 'step'")
    return meta


def verify_checkpoint(path: str) -> dict:
    """Check every file against the sha256 and size in the completion mark; ValueError naming
    the first missing or changed file. Returns the meta. (A checkpoint written before checksums
    were recorded has no "files" entry and is only checked for its mark.)"""
    meta = read_meta(path)
    for rel, want in (meta.get("files") or {}).items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            raise ValueError(f"corrupted checkpoint: {p} is missing")
        size = os.path.getsize(p)
        if size != want["bytes"]:
            raise ValueError(f"corrupted checkpoint file {p}: {size} bytes, {want['bytes']} were written")
        if sha256(p) != want["sha256"]:
            raise ValueError(f"corrupted checkpoint file {p}: its sha256 differs from the one recorded "
                             "when it was written")
    return meta


# ---------------------------------------------------------------------- save
def _write_error(e: BaseException, path: str) -> str:
    """One line for a failed write: the OS error and its path when one is in the chain (DCP wraps
    errors in CheckpointException; torch.save's miniz reports a full disk as "file write failed")."""
    seen, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is s for s in seen):
            continue
        seen.append(x)
        if isinstance(x, OSError) and x.errno is not None:
            return f"{os.strerror(x.errno).lower()}: {x.filename or path}"
        if isinstance(x, CheckpointException):
            todo += [exc for exc, _ in x.failures.values()]
        todo += [x.__cause__, x.__context__]
    root = os.path.dirname(path.rstrip("/")) or "."
    if os.path.isdir(root) and shutil.disk_usage(root).free < (1 << 20):
        return f"{os.strerror(errno.ENOSPC).lower()}: {path}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__} writing {path}: {first}"


def save_checkpoint(root: str, step: int, model, optimizer, extra: dict, keep: int = 0) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory. Non-finite weights or
    optimizer state raise ValueError before anything is written; a failed write (disk full,
    permissions) raises OSError naming the path, removes the partial directory and leaves the
    previous checkpoints and `latest` as they were. After a save, keep > 0 prunes to the newest
    `keep` complete checkpoints (prune_checkpoints)."""
    name = f"step_{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    msd, osd = get_state_dict(model, optimizer)
    check_finite({"model": msd, "optim": osd}, f"save checkpoint {final}")
    err, where = None, tmp
    try:
        if _rank() == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    except OSError as e:
        err = e
    if not _any_rank(err is not None):
        try:
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
            buf = io.BytesIO()
            torch.save(rng_state(), buf)
            where = os.path.join(tmp, f"rng_rank{_rank()}.pt")
            with open(where, "wb") as f:
                f.write(buf.getbuffer())
        except (Exception, CheckpointException) as e:
            err = e
    if not _any_rank(err is not None):
        _fault("checkpoint_after_shards", step)
        try:
            if _rank() == 0:
                where = os.path.join(tmp, META)
                meta = {"step": step, **extra, "files": file_digests(tmp)}
                with open(where, "w") as f:
                    json.dump(meta, f)
                where = final
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                where = os.path.join(root, "latest")
                with open(where + ".tmp", "w") as f:
                    f.write(name)
                os.replace(where + ".tmp", where)
        except OSError as e:
            err = e
    if _any_rank(err is not None):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.exists(os.path.join(root, "latest.tmp")):
                os.remove(os.path.join(root, "latest.tmp"))
        why = _write_error(err, where) if err is not None else "another rank failed to write its part"
        prev = latest_checkpoint(root)
        kept = f"{os.path.basename(prev)} and `latest` are unchanged" if prev else "nothing was kept"
        raise OSError(f"checkpoint {final} not saved: {why} ({kept})") from err
    if _rank() == 0 and keep > 0:
        prune_checkpoints(root, keep)
    _barrier()
    return final


def _complete(root: str) -> list[str]:
    """Names of the complete checkpoints under root (those with a mark), oldest first."""
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if STEP_DIR.match(d) and os.path.exists(os.path.join(root, d, META))]
    return sorted(names, key=lambda d: int(STEP_DIR.match(d).group(1)))


def checkpoint_step(path: str) -> int:
    """The step of checkpoint directory path (.../step_000012 -> 12)."""
    return int(STEP_DIR.match(os.path.basename(path.rstrip("/"))).group(1))


def _latest_name(root: str) -> str | None:
    try:
        with open(os.path.join(root, "latest")) as f:
            return f.read().strip()
    except OSError:
        return None


def prune_checkpoints(root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, never the newest one nor the one
    `latest` names, and every `*.tmp` (a crashed save's leftovers; call it when no save is in
    progress). Returns the names removed."""
    done = _complete(root)
    protect = set(done[-max(keep, 1):]) | {_latest_name(root)}
    gone = [d for d in done if d not in protect]
    gone += [d for d in os.listdir(root) if d.endswith(".tmp")] if os.path.isdir(root) else []
    for d in gone:
        p = os.path.join(root, d)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return gone


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under root (the one `latest` names when it is complete), or None."""
    name = _latest_name(root)
    if name and os.path.exists(os.path.join(root, name, META)):
        return os.path.join(root, name)
    done = _complete(root)
    return os.path.join(root, done[-1]) if done else None


def resume_checkpoint(root: str, fallback: bool = False) -> tuple[str, list[str]]:
    """The checkpoint to resume from and notes on the ones skipped: latest_checkpoint, verified
    (verify_checkpoint). A damaged one is an error, or with fallback=True the newest intact older
    one is used. ValueError when there is none."""
    first = latest_checkpoint(root)
    if first is None:
        left = sorted(os.listdir(root)) if os.path.isdir(root) else []
        found = f" (only incomplete: {', '.join(left)})" if left else ""
        raise ValueError(f"--resume true: no complete checkpoint in {root}{found}; "
                         "start a fresh run without --resume (--overwrite true to replace this one)")
    order = [first] + [os.path.join(root, d) for d in reversed(_complete(root)) if os.path.join(root, d) != first]
    notes = []
    for path in order:
        try:
            verify_checkpoint(path)
            return path, notes
        except ValueError as e:
            if not fallback:
                older = f" ({len(order) - 1} older ones exist)" if len(order) > 1 else ""
                raise ValueError(f"{e}; pass --resume_fallback true to resume from the newest intact "
                                 f"checkpoint instead{older}") from None
            notes.append(f"skipped {path}: {e}")
    raise ValueError(f"--resume true: no intact checkpoint in {root}: " + "; ".join(notes))


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Collective. Restores model, optimizer and this rank's RNG; returns the saved meta dict."""
    meta = read_meta(path)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        exc = e
        if isinstance(e, CheckpointException) and e.failures:  # the first rank's own error
            exc = next(iter(e.failures.values()))[0]
        line = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {line})") from None
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
    tokenizer) into out_dir (atomically). Non-finite weights raise ValueError (nothing written)."""
    from safetensors.torch import save_file

    check_finite(get_model_state_dict(model), f"export HF weights to {out_dir}")
    sd = full_state_dict(model)
    if _rank() != 0:
        return None
    if hf_config.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    check_finite(sd, f"export HF weights to {out_dir} as {dtype} (out of its range)")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(hf_config)
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"HF export {out_dir} not written: {_write_error(e, tmp)}") from e
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir

"""Attention over the paged KV cache, behind one small backend interface.

The runner builds one AttentionMetadata per step (block tables, lengths, slots of the new tokens);
the backend turns it into a plan once (`plan`), and every layer then calls `forward` with that
plan. The model only ever sees `PagedAttention(layer_idx, q, k, v) -> out`.

Backend protocol (a class; `make_backend` instantiates it with no arguments):
- `name`: the `attention_backend` string that selects it;
- `available(device) -> (ok, reason)` (optional staticmethod; absent means always available):
  whether it runs on `device`, and if not why not - `backend_status` reports this, never raising;
- `auto_ok` (optional, default True): whether "auto" may pick it when available;
- `plan(meta, kv, num_q_heads) -> plan`: once per step, on the host, everything the layers share
  (its own small dataclass: `TorchPlan`, `CpuPlan`, `TritonPlan`, fields documented there);
- `forward(layer, q, k, v, meta, kv, plan) -> out`: per layer; appends the step's k / v [T, H_kv, D]
  into layer `layer`'s pages, then returns the attention of q [T, H_q, D] (the step's flat tokens,
  sequence b owning meta.cu_q[b]:cu_q[b+1]) over each sequence's cached and new tokens, [T, H_q, D].

Backends: "torch" (batched plain PyTorch, torch_backend.py), "triton" (treepo_kernels' Triton
kernels, CUDA; triton_backend.py) and "cpu" (the csrc extension; cpu_backend.py) when available;
"auto" picks the fastest available for the device. The kernels: docs/kernels.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from treepo_kernels.common import cdiv

from ..kv_cache import PagedKVCache
from .torch_backend import TorchBackend


@dataclass
class AttentionMetadata:
    """One engine step: B sequences, each with q_lens[b] new tokens on top of its cache."""

    q_lens: list[int]  # new tokens per sequence
    kv_lens: list[int]  # tokens per sequence after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_pages] int32, rows padded with their first page
    slot_pages: torch.Tensor  # [T] int64: page of each new token
    slot_offsets: torch.Tensor  # [T] int64: offset in that page
    cu_q: torch.Tensor  # [B + 1] int64: sequence b owns flat tokens cu_q[b]:cu_q[b+1]
    tables: list[list[int]]  # the same block tables as Python lists (host-side planners read these)
    page_size: int

    @classmethod
    def build(cls, kv: PagedKVCache, tables: list[list[int]], q_lens: list[int], kv_lens: list[int],
              device) -> "AttentionMetadata":
        P = kv.page_size
        max_pages = max(cdiv(L, P) for L in kv_lens)
        bt = torch.zeros(len(tables), max_pages, dtype=torch.int32)
        pages, offsets = [], []
        for b, (t, n, L) in enumerate(zip(tables, q_lens, kv_lens)):
            used = t[: cdiv(L, P)]
            bt[b] = used[0]  # padding points at a live page of the same sequence
            bt[b, : len(used)] = torch.tensor(used, dtype=torch.int32)
            p, o = kv.slots(t, L - n, L)
            pages += p
            offsets += o
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(q_lens).cumsum(0)
        return cls(list(q_lens), list(kv_lens), bt.to(device),
                   torch.tensor(pages, dtype=torch.int64, device=device),
                   torch.tensor(offsets, dtype=torch.int64, device=device), cu.to(device),
                   [list(t[: cdiv(L, P)]) for t, L in zip(tables, kv_lens)], P)

    def rows(self, decode: bool) -> tuple[list[int], torch.Tensor | None]:
        """The decode rows (one new token) or the extend rows (several), and the flat indices of
        their tokens - None when they are all the step's tokens (no gather needed)."""
        rows = [b for b, n in enumerate(self.q_lens) if (n == 1) == decode]
        if len(rows) == len(self.q_lens):
            return rows, None
        if decode:
            return rows, self.cu_q[rows]
        tok = [t for b in rows for t in range(int(self.cu_q[b]), int(self.cu_q[b + 1]))]
        return rows, torch.tensor(tok, dtype=torch.int64, device=self.cu_q.device)


def _backend_class(name: str):
    """The class of a backend; each backend module lives in its own file and is imported lazily."""
    if name == "torch":
        return TorchBackend
    if name == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend
    if name == "cpu":
        from .cpu_backend import CpuBackend

        return CpuBackend
    raise ValueError(f"attention_backend={name!r} is unknown; use 'auto', 'torch', 'triton' or 'cpu'")


def backend_status(name: str, device) -> tuple[bool, str]:
    """(available, reason) for a backend on a device; never raises."""
    try:
        cls = _backend_class(name)
    except ImportError as e:
        return False, f"not installed ({e})"
    check = getattr(cls, "available", None)
    return check(torch.device(device)) if check else (True, "")


def available_backends(device) -> list[str]:
    return [n for n in ("torch", "triton", "cpu") if backend_status(n, device)[0]]


_noticed: set[str] = set()


def _notice_once(msg: str):
    if msg not in _noticed:
        _noticed.add(msg)
        print(msg, file=sys.stderr)


def make_backend(name: str, device):
    """An attention backend instance. "auto": triton on CUDA, cpu (C++ extension) on CPU when
    built, else the torch reference."""
    device = torch.device(device)
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu"
        ok, why = backend_status(preferred, device)
        name = preferred if ok and getattr(_backend_class(preferred), "auto_ok", True) else "torch"
        if not ok:
            _notice_once(f"treepo: attention backend {preferred!r} unavailable ({why}); using 'torch'")
    cls = _backend_class(name)
    ok, why = backend_status(name, device)
    if not ok:
        raise ValueError(f"attention_backend={name!r} is not available on {device}: {why} "
                         f"(available: {available_backends(device)})")
    return cls()


class PagedAttention:
    """The per-step callable handed to the model: appends K/V into pages, then attends."""

    def __init__(self, backend, meta: AttentionMetadata, kv: PagedKVCache, num_q_heads: int):
        self.backend, self.meta, self.kv = backend, meta, kv
        self.plan = backend.plan(meta, kv, num_q_heads)

    def __call__(self, layer_idx, q, k, v):
        return self.backend.forward(layer_idx, q, k, v, self.meta, self.kv, self.plan)

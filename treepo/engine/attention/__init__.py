"""Attention over the paged KV cache, behind one small backend interface.

The runner builds one AttentionMetadata per step (block tables, lengths, slots of the new tokens);
the backend turns it into a plan once (`plan`), and every layer then calls `forward` with that
plan. The model only ever sees `PagedAttention(layer_idx, q, k, v) -> out`.

Backends: "torch" (batched plain PyTorch, this file), "triton" (treepo_kernels, CUDA) and "cpu"
(csrc extension) when available; "auto" picks the fastest available for the device.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from treepo_kernels.paged_kv import append_kv_ref

from ..kv_cache import PagedKVCache


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
        max_pages = max(-(-L // P) for L in kv_lens)
        bt = torch.zeros(len(tables), max_pages, dtype=torch.int32)
        pages, offsets = [], []
        for b, (t, n, L) in enumerate(zip(tables, q_lens, kv_lens)):
            used = t[: -(-L // P)]
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
                   [list(t[: -(-L // P)]) for t, L in zip(tables, kv_lens)], P)


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


class TorchBackend:
    """Batched plain-PyTorch attention over the paged pool.

    Decode rows (one new token each) gather their pages with one index_select per layer (whole
    contiguous pages, the fast path) into [B, pages, H_kv, P, D] and attend page by page with
    batched matmuls: scores [B, pages, H_kv, g, P], one softmax over all pages of a row, then the
    per-page partial outputs summed in fp32. GQA packs the g query heads of a KV head as g rows, so
    no K/V is repeated per query head. Scores are formed in the model dtype and softmaxed in fp32
    (as transformers' eager attention). Extend rows (prefill, segments) go through SDPA with a
    causal-with-offset mask."""

    name = "torch"

    def plan(self, meta: AttentionMetadata, kv: PagedKVCache, num_q_heads: int):
        P, dev = kv.page_size, meta.block_tables.device
        g = num_q_heads // kv.num_kv_heads
        plan = {}
        dec = [b for b, n in enumerate(meta.q_lens) if n == 1]
        if dec:
            kv_lens = torch.tensor([meta.kv_lens[b] for b in dec], device=dev)
            n_pages = -(-int(kv_lens.max()) // P)
            j = torch.arange(n_pages * P, device=dev)
            bias = torch.zeros(len(dec), n_pages * P, device=dev).masked_fill(j[None] >= kv_lens[:, None], float("-inf"))
            pages = meta.block_tables[dec, :n_pages].reshape(-1).long()
            plan["decode"] = (pages, len(dec), n_pages, meta.cu_q[dec].to(dev), bias.view(len(dec), 1, 1, n_pages, P))
        ext = [b for b, n in enumerate(meta.q_lens) if n > 1]
        if ext:
            q_lens = torch.tensor([meta.q_lens[b] for b in ext], device=dev)
            kv_lens = torch.tensor([meta.kv_lens[b] for b in ext], device=dev)
            n_pages = -(-int(kv_lens.max()) // P)
            max_q = int(q_lens.max())
            i = torch.arange(max_q, device=dev)
            valid = i[None] < q_lens[:, None]  # [Be, max_q]
            tok = torch.where(valid, meta.cu_q[ext].to(dev)[:, None] + i, torch.zeros_like(valid, dtype=torch.long))
            qpos = kv_lens[:, None] - q_lens[:, None] + i[None]  # absolute position of each query
            j = torch.arange(n_pages * P, device=dev)
            mask = (j[None, None] <= qpos[:, :, None]) | (~valid[:, :, None] & (j == 0))  # [Be, max_q, L]
            mask = mask[:, None, None].expand(-1, 1, g, -1, -1).reshape(len(ext), 1, g * max_q, n_pages * P)
            plan["extend"] = (meta.block_tables[ext, :n_pages].long(), tok, valid, max_q, mask)
        return plan

    def forward(self, layer: int, q, k, v, meta: AttentionMetadata, kv: PagedKVCache, plan):
        append_kv_ref(kv.k[layer], kv.v[layer], k, v, meta.slot_pages, meta.slot_offsets)
        T, Hq, D = q.shape
        Hkv = kv.num_kv_heads
        g = Hq // Hkv
        out = torch.empty_like(q)
        if "decode" in plan:
            pages, B, M, tok, bias = plan["decode"]
            P = kv.page_size
            kk = torch.index_select(kv.k[layer], 0, pages).view(B, M, Hkv, P, D)
            vv = torch.index_select(kv.v[layer], 0, pages).view(B, M, Hkv, P, D)
            qq = q[tok].view(B, 1, Hkv, g, D).expand(B, M, Hkv, g, D)
            s = torch.matmul(qq, kk.transpose(-1, -2))  # [B, M, Hkv, g, P]
            s = s.permute(0, 2, 3, 1, 4).float() * D ** -0.5 + bias  # [B, Hkv, g, M, P]
            p = s.reshape(B, Hkv, g, M * P).softmax(-1).to(q.dtype)
            p = p.view(B, Hkv, g, M, P).permute(0, 3, 1, 2, 4)  # [B, M, Hkv, g, P]
            o = torch.matmul(p, vv).sum(1, dtype=torch.float32)  # [B, Hkv, g, D]
            out[tok] = o.view(B, Hq, D).to(q.dtype)
        if "extend" in plan:
            tables, tok, valid, max_q, mask = plan["extend"]
            B, n_pages = tables.shape
            L = n_pages * kv.page_size
            kk = kv.k[layer][tables].transpose(1, 2).reshape(B, Hkv, L, D)
            vv = kv.v[layer][tables].transpose(1, 2).reshape(B, Hkv, L, D)
            qq = q[tok].view(B, max_q, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * max_q, D)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
            o = o.view(B, Hkv, g, max_q, D).permute(0, 3, 1, 2, 4).reshape(B, max_q, Hq, D)
            out[tok[valid]] = o[valid]
        return out


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

"""Attention over the paged KV cache, behind one small backend interface.

The runner builds one AttentionMetadata per step (block tables, lengths, slots of the new tokens);
the backend turns it into a plan once (`plan`), and every layer then calls `forward` with that
plan. The model only ever sees `PagedAttention(layer_idx, q, k, v) -> out`.

Backends: "torch" (batched plain PyTorch, this file), "triton" (treepo_kernels, CUDA) and "cpu"
(csrc extension) when available; "auto" picks the fastest available for the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from treepo_kernels.paged_kv import append_kv_ref

from .kv_cache import PagedKVCache


@dataclass
class AttentionMetadata:
    """One engine step: B sequences, each with q_lens[b] new tokens on top of its cache."""

    q_lens: list[int]  # new tokens per sequence
    kv_lens: list[int]  # tokens per sequence after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_pages] int32, rows padded with their first page
    slot_pages: torch.Tensor  # [T] int64: page of each new token
    slot_offsets: torch.Tensor  # [T] int64: offset in that page
    cu_q: torch.Tensor  # [B + 1] int64: sequence b owns flat tokens cu_q[b]:cu_q[b+1]

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
                   torch.tensor(offsets, dtype=torch.int64, device=device), cu.to(device))


class TorchBackend:
    """Batched plain-PyTorch attention: decode rows in one SDPA, extend rows (prefill) in another.

    GQA without copying K/V per query head: the g query heads of a KV head become g query rows of
    that KV head. Each group gathers its sequences' pages into a dense padded tensor per layer."""

    name = "torch"

    def plan(self, meta: AttentionMetadata, kv: PagedKVCache, num_q_heads: int):
        P, dev = kv.page_size, meta.block_tables.device
        g = num_q_heads // kv.num_kv_heads
        groups = []
        for decode in (True, False):
            rows = [b for b, n in enumerate(meta.q_lens) if (n == 1) == decode and n > 0]
            if not rows:
                continue
            q_lens = torch.tensor([meta.q_lens[b] for b in rows], device=dev)
            kv_lens = torch.tensor([meta.kv_lens[b] for b in rows], device=dev)
            n_pages = -(-int(kv_lens.max()) // P)
            L = n_pages * P
            tables = meta.block_tables[rows, :n_pages].long()
            max_q = int(q_lens.max())
            i = torch.arange(max_q, device=dev)
            tok = meta.cu_q[rows].to(dev)[:, None] + i  # [Bg, max_q] flat token index
            valid = i[None] < q_lens[:, None]
            tok = torch.where(valid, tok, torch.zeros_like(tok))
            qpos = kv_lens[:, None] - q_lens[:, None] + i[None]  # [Bg, max_q]
            j = torch.arange(L, device=dev)
            mask = (j[None, None] <= qpos[:, :, None]) | (~valid[:, :, None] & (j == 0))  # [Bg, max_q, L]
            mask = mask[:, None, None].expand(-1, 1, g, -1, -1).reshape(len(rows), 1, g * max_q, L)
            groups.append((tables, tok, valid, max_q, mask))
        return groups

    def forward(self, layer: int, q, k, v, meta: AttentionMetadata, kv: PagedKVCache, plan):
        append_kv_ref(kv.k[layer], kv.v[layer], k, v, meta.slot_pages, meta.slot_offsets)
        T, Hq, D = q.shape
        Hkv = kv.num_kv_heads
        g = Hq // Hkv
        out = torch.empty_like(q)
        for tables, tok, valid, max_q, mask in plan:
            Bg, n_pages = tables.shape
            L = n_pages * kv.page_size
            kk = kv.k[layer][tables].transpose(1, 2).reshape(Bg, Hkv, L, D)
            vv = kv.v[layer][tables].transpose(1, 2).reshape(Bg, Hkv, L, D)
            qq = q[tok].view(Bg, max_q, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(Bg, Hkv, g * max_q, D)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
            o = o.view(Bg, Hkv, g, max_q, D).permute(0, 3, 1, 2, 4).reshape(Bg, max_q, Hq, D)
            out[tok[valid]] = o[valid]
        return out


BACKENDS = {"torch": TorchBackend}


def available_backends(device) -> list[str]:
    return [name for name in BACKENDS]


def make_backend(name: str, device):
    device = torch.device(device)
    if name == "auto":
        name = "torch"
    if name not in ("torch", "triton", "cpu"):
        raise ValueError(f"attention_backend={name!r} is unknown; use 'auto', 'torch', 'triton' or 'cpu'")
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not available on this machine "
                         f"(available: {available_backends(device)})")
    return BACKENDS[name]()


class PagedAttention:
    """The per-step callable handed to the model: appends K/V into pages, then attends."""

    def __init__(self, backend, meta: AttentionMetadata, kv: PagedKVCache, num_q_heads: int):
        self.backend, self.meta, self.kv = backend, meta, kv
        self.plan = backend.plan(meta, kv, num_q_heads)

    def __call__(self, layer_idx, q, k, v):
        return self.backend.forward(layer_idx, q, k, v, self.meta, self.kv, self.plan)

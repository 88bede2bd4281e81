"""attention_backend="torch": batched plain-PyTorch attention over the paged pool (no extension).

Decode rows (one new token each) gather their pages with one index_select per layer (whole
contiguous pages, the fast path) into [B, pages, H_kv, P, D] and attend page by page with batched
matmuls: scores [B, pages, H_kv, g, P], one softmax over all pages of a row, then the per-page
partial outputs summed in fp32. GQA packs the g query heads of a KV head as g rows, so no K/V is
repeated per query head. Scores are formed in the model dtype and softmaxed in fp32 (as
transformers' eager attention). Extend rows (prefill, segments) go through SDPA with a
causal-with-offset mask. The reference every other backend is compared with in the engine tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from treepo_kernels.common import cdiv
from treepo_kernels.paged_kv import append_kv_ref

from ..kv_cache import PagedKVCache

if TYPE_CHECKING:
    from . import AttentionMetadata


@dataclass
class TorchPlan:
    """One step's gather indices and masks, shared by every layer. B_d decode rows, each padded to
    M pages; B_e extend rows, padded to max_q queries and M_e pages. Decode (extend) fields are
    None when the step has no decode (extend) rows."""

    decode_pages: torch.Tensor | None = None  # [B_d * M] int64: page ids, row by row
    decode_tok: torch.Tensor | None = None  # [B_d] int64: flat token index of each decode row
    decode_bias: torch.Tensor | None = None  # [B_d, 1, 1, M, P] fp32: 0 for a key < kv_len, -inf after
    extend_tables: torch.Tensor | None = None  # [B_e, M_e] int64: page ids
    extend_tok: torch.Tensor | None = None  # [B_e, max_q] int64: flat token of query i (0 past q_len)
    extend_valid: torch.Tensor | None = None  # [B_e, max_q] bool: i < q_len
    extend_mask: torch.Tensor | None = None  # [B_e, 1, g * max_q, M_e * P] bool: key visible to query


class TorchBackend:
    """Batched plain-PyTorch attention (module docstring)."""

    name = "torch"

    def plan(self, meta: AttentionMetadata, kv: PagedKVCache, num_q_heads: int) -> TorchPlan:
        P, dev = kv.page_size, meta.block_tables.device
        g = num_q_heads // kv.num_kv_heads
        plan = TorchPlan()
        dec = [b for b, n in enumerate(meta.q_lens) if n == 1]
        if dec:
            kv_lens = torch.tensor([meta.kv_lens[b] for b in dec], device=dev)
            n_pages = cdiv(int(kv_lens.max()), P)
            j = torch.arange(n_pages * P, device=dev)
            bias = torch.zeros(len(dec), n_pages * P, device=dev)
            bias = bias.masked_fill(j[None] >= kv_lens[:, None], float("-inf"))
            plan.decode_pages = meta.block_tables[dec, :n_pages].reshape(-1).long()
            plan.decode_tok = meta.cu_q[dec].to(dev)
            plan.decode_bias = bias.view(len(dec), 1, 1, n_pages, P)
        ext = [b for b, n in enumerate(meta.q_lens) if n > 1]
        if ext:
            q_lens = torch.tensor([meta.q_lens[b] for b in ext], device=dev)
            kv_lens = torch.tensor([meta.kv_lens[b] for b in ext], device=dev)
            n_pages = cdiv(int(kv_lens.max()), P)
            max_q = int(q_lens.max())
            i = torch.arange(max_q, device=dev)
            valid = i[None] < q_lens[:, None]  # [Be, max_q]
            tok = torch.where(valid, meta.cu_q[ext].to(dev)[:, None] + i, torch.zeros_like(valid, dtype=torch.long))
            qpos = kv_lens[:, None] - q_lens[:, None] + i[None]  # absolute position of each query
            j = torch.arange(n_pages * P, device=dev)
            mask = (j[None, None] <= qpos[:, :, None]) | (~valid[:, :, None] & (j == 0))  # [Be, max_q, L]
            mask = mask[:, None, None].expand(-1, 1, g, -1, -1).reshape(len(ext), 1, g * max_q, n_pages * P)
            plan.extend_tables = meta.block_tables[ext, :n_pages].long()
            plan.extend_tok, plan.extend_valid, plan.extend_mask = tok, valid, mask
        return plan

    def forward(self, layer: int, q, k, v, meta: AttentionMetadata, kv: PagedKVCache, plan: TorchPlan):
        append_kv_ref(kv.k[layer], kv.v[layer], k, v, meta.slot_pages, meta.slot_offsets)
        T, Hq, D = q.shape
        Hkv = kv.num_kv_heads
        g = Hq // Hkv
        out = torch.empty_like(q)
        if plan.decode_tok is not None:
            tok, bias = plan.decode_tok, plan.decode_bias
            B, M, P = tok.shape[0], bias.shape[3], kv.page_size
            kk = torch.index_select(kv.k[layer], 0, plan.decode_pages).view(B, M, Hkv, P, D)
            vv = torch.index_select(kv.v[layer], 0, plan.decode_pages).view(B, M, Hkv, P, D)
            qq = q[tok].view(B, 1, Hkv, g, D).expand(B, M, Hkv, g, D)
            s = torch.matmul(qq, kk.transpose(-1, -2))  # [B, M, Hkv, g, P]
            s = s.permute(0, 2, 3, 1, 4).float() * D ** -0.5 + bias  # [B, Hkv, g, M, P]
            p = s.reshape(B, Hkv, g, M * P).softmax(-1).to(q.dtype)
            p = p.view(B, Hkv, g, M, P).permute(0, 3, 1, 2, 4)  # [B, M, Hkv, g, P]
            o = torch.matmul(p, vv).sum(1, dtype=torch.float32)  # [B, Hkv, g, D]
            out[tok] = o.view(B, Hq, D).to(q.dtype)
        if plan.extend_tok is not None:
            tables, tok, valid = plan.extend_tables, plan.extend_tok, plan.extend_valid
            B, n_pages = tables.shape
            max_q = tok.shape[1]
            L = n_pages * kv.page_size
            kk = kv.k[layer][tables].transpose(1, 2).reshape(B, Hkv, L, D)
            vv = kv.v[layer][tables].transpose(1, 2).reshape(B, Hkv, L, D)
            qq = q[tok].view(B, max_q, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * max_q, D)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=plan.extend_mask)
            o = o.view(B, Hkv, g, max_q, D).permute(0, 3, 1, 2, 4).reshape(B, max_q, Hq, D)
            out[tok[valid]] = o[valid]
        return out

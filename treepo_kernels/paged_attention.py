"""Attention of ragged query blocks over a paged KV cache (plain-PyTorch reference).

Covers decode (one query per sequence) and extend (a segment of new tokens on top of cached
ones): query i of sequence b sits at absolute position kv_lens[b] - q_lens[b] + i and attends to
every cached key at or before it. The reference is deliberately simple (a loop over sequences,
dense gather through the block table, fp32 math) - kernels and the engine's batched torch backend
are tested against it.
"""
import math

import torch


def gather_kv(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Dense [H_kv, length, D] copy of one sequence's K or V from a [pages, H_kv, P, D] pool."""
    P = cache.shape[2]
    pages = table[: -(-length // P)].long()
    dense = cache[pages].permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])
    return dense[:, :length]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, cu_q: torch.Tensor, kv_lens: torch.Tensor,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's new tokens over its paged context.

    q: [T, H_q, D], the new tokens of B sequences back to back (sequence b owns rows
       cu_q[b]:cu_q[b+1]); k_cache, v_cache: [num_pages, H_kv, page_size, D] (already holding
       the new tokens' K/V); block_tables: [B, max_pages] int; kv_lens: [B] total tokens per
       sequence including the new ones. H_q must be a multiple of H_kv (GQA).
    Returns (out [T, H_q, D] in q's dtype, lse [T, H_q] fp32, natural log).
    """
    T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    assert Hq % Hkv == 0, f"H_q={Hq} is not a multiple of H_kv={Hkv}"
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    for b in range(block_tables.shape[0]):
        s, e, L = int(cu_q[b]), int(cu_q[b + 1]), int(kv_lens[b])
        n = e - s
        if n == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], L).float().repeat_interleave(Hq // Hkv, 0)  # [Hq, L, D]
        v = gather_kv(v_cache, block_tables[b], L).float().repeat_interleave(Hq // Hkv, 0)
        qb = q[s:e].float().transpose(0, 1)  # [Hq, n, D]
        scores = qb @ k.transpose(1, 2) * scale  # [Hq, n, L]
        qpos = torch.arange(L - n, L, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(L, device=q.device)[None] > qpos, float("-inf"))
        lse_b = torch.logsumexp(scores, -1)  # [Hq, n]
        out[s:e] = (torch.softmax(scores, -1) @ v).transpose(0, 1).to(q.dtype)
        lse[s:e] = lse_b.transpose(0, 1)
    return out, lse

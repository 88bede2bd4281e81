"""Extend: the new tokens of many sequences (prefill, segments, re-runs) over their paged context.

Query i of sequence b sits at absolute position kv_lens[b] - q_lens[b] + i and attends to every
cached key at or before it (the new tokens' K/V are already appended). Decode is the case of one
new token per sequence. This file (docs/kernels.md, "Extend"): the plain-PyTorch reference of that
contract (`paged_attention_ref`, which decode and extend kernels alike are tested against), the
Triton paged extend kernel and its launcher `paged_extend`, and `tree_extend`, which reads a context
shared by several branches once through the tree-decode kernels. The C++ version of the paged extend
is `treepo_kernels.cpu.paged_extend`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import cdiv
from .tree_decode import tile_for, tree_decode, work_items
from .tree_plan import TreePlan, plan_tree
from .triton_common import LOG2E, block_d_for, load_kv_tile, online_softmax_finish, online_softmax_step, tl, triton


def gather_kv(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Dense [H_kv, length, D] copy of one sequence's K or V from a [pages, H_kv, P, D] pool."""
    P = cache.shape[2]
    pages = table[: cdiv(length, P)].long()
    dense = cache[pages].permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])
    return dense[:, :length]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, cu_q: torch.Tensor, kv_lens: torch.Tensor,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's new tokens over its paged context, deliberately simple
    (a loop over sequences, dense gather through the block table, fp32 math).

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


# ------------------------------------------------------------------------------------ Triton
# One program per (work item, KV head); a work item is a tile of BLOCK_Q consecutive queries of one
# sequence, whose g query heads per KV head are packed as rows of the `tl.dot` operand. Keys are
# walked in tiles of BLOCK_N tokens gathered through the block table, up to the tile's last query.

@triton.jit
def _extend_kernel(
        # queries, KV pools, per-sequence tables / lengths, work items
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_q_ptr, kv_lens_ptr, item_seq_ptr, item_q_ptr,
        # outputs
        out_ptr, lse_ptr,
        # sizes and strides
        page_size, scale_log2, stride_q_tok, stride_q_head, stride_cache_page, stride_cache_head, stride_cache_tok,
        stride_bt_seq, stride_out_tok, stride_out_head, stride_lse_tok,
        G: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PREC: tl.constexpr, OWN_ONLY: tl.constexpr):
    item = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(item_seq_ptr + item).to(tl.int64)
    q0 = tl.load(item_q_ptr + item)
    qs = tl.load(cu_q_ptr + b)
    qn = (tl.load(cu_q_ptr + b + 1) - qs).to(tl.int32)
    L = tl.load(kv_lens_ptr + b).to(tl.int32)
    r = tl.arange(0, BLOCK_M)  # row r: query q0 + r // G, query head h * G + r % G
    qi = q0 + r // G
    qh = h * G + r % G
    row_ok = (r < BLOCK_Q * G) & (qi < qn)
    qpos = L - qn + qi
    tok = (qs + qi).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + tok[:, None] * stride_q_tok + qh[:, None] * stride_q_head + d[None, :],
                mask=row_ok[:, None] & dm[None, :], other=0.0)
    kv_end = L - qn + tl.minimum(q0 + BLOCK_Q, qn)  # keys seen by the tile's last query
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_start = L - qn if OWN_ONLY else 0  # OWN_ONLY: the new tokens only (tree_extend's causal part)
    for t0 in range(kv_start, kv_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < kv_end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + b * stride_bt_seq, t, tm, h, d, dm,
                            page_size, stride_cache_page, stride_cache_head, stride_cache_tok)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        visible = (t[None, :] <= qpos[:, None]) & tm[None, :] & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, PREC)
    out, lse = online_softmax_finish(m_i, l_i, acc)
    tl.store(out_ptr + tok[:, None] * stride_out_tok + qh[:, None] * stride_out_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dm[None, :])
    tl.store(lse_ptr + tok * stride_lse_tok + qh, lse, mask=row_ok)


def extend_items(q_lens: list[int], block_q: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first query) of every work item, [items] int32 each."""
    seqs, firsts = [], []
    for b, n in enumerate(q_lens):
        for a in range(0, n, block_q):
            seqs.append(b)
            firsts.append(a)
    return (torch.tensor(seqs, dtype=torch.int32, device=device),
            torch.tensor(firsts, dtype=torch.int32, device=device))


def block_q_for(g: int) -> int:
    """Queries per work item: 64 query rows (g heads per query), at least one query."""
    return max(1, 64 // g) if g <= 64 else 1


def paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 cu_q: torch.Tensor, kv_lens: torch.Tensor, scale: float | None = None, items=None,
                 block_n: int = 16, own_only: bool = False):
    """Triton `paged_attention_ref`.

    q: [T, H_q, D] fp32 / fp16 / bf16 (sequence b owns rows cu_q[b]:cu_q[b+1]);
    k_cache, v_cache: [num_pages, H_kv, page_size, D] contiguous, q's dtype (holding the new
    tokens' K/V); block_tables: [B, max_pages] int32 contiguous; cu_q: [B + 1] and kv_lens: [B]
    int32 / int64, contiguous, on q's device. items: `extend_items(q_lens, block_q_for(g), device)`,
    to reuse across layers; own_only: attend to the new tokens only (tree_extend's causal part).
    Returns (out [T, H_q, D] in q's dtype, lse [T, H_q] fp32, natural log)."""
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    assert q.shape[2] == k_cache.shape[3] and q.shape[1] % k_cache.shape[1] == 0
    assert q.dtype == k_cache.dtype == v_cache.dtype and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dim() == 2 and block_tables.dtype == torch.int32 and block_tables.is_contiguous(), \
        f"block_tables must be contiguous [B, max_pages] int32, is {block_tables.dtype} {tuple(block_tables.shape)}"
    B = block_tables.shape[0]
    for name, a, n in (("cu_q", cu_q, B + 1), ("kv_lens", kv_lens, B)):
        ok = a.shape == (n,) and a.dtype in (torch.int32, torch.int64) and a.device == q.device
        assert ok and a.is_contiguous(), \
            f"{name} must be contiguous [{n}] int32/int64 on {q.device}, is {a.dtype} {tuple(a.shape)} on {a.device}"
    T, Hq, D = q.shape
    Hkv, P = k_cache.shape[1], k_cache.shape[2]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    bq = block_q_for(g)
    block_m = max(16, triton.next_power_of_2(bq * g))
    if items is None:
        items = extend_items((cu_q[1:] - cu_q[:-1]).tolist(), bq, q.device)
    out = torch.empty_like(q)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    if items[0].numel():
        _extend_kernel[(items[0].numel(), Hkv)](
            q, k_cache, v_cache, block_tables, cu_q, kv_lens, items[0], items[1],
            out, lse,
            P, scale * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1), lse.stride(0),
            G=g, D=D, BLOCK_Q=bq, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d_for(D),
            PREC="ieee" if q.dtype == torch.float32 else "tf32", OWN_ONLY=own_only)
    return out, lse


# ------------------------------------------------------------------------------ tree extend

@dataclass
class ExtendPlan:
    """Host-side plan of a tree-aware extend, built once per step and reused by every layer."""

    tree: TreePlan | None  # over the cached context: one virtual leaf per new token that has one
    tree_tok: torch.Tensor  # [V] int64: flat token index of each virtual leaf
    tree_items: tuple | None  # the tree's work items (`tree_decode.work_items`), on the device
    block_tables: torch.Tensor  # [B, max_pages] int32, each row's pages (padded with 0)
    cu_q: torch.Tensor  # [B + 1] int64: sequence b owns flat tokens cu_q[b]:cu_q[b+1]
    kv_lens: torch.Tensor  # [B] int64: tokens per sequence, cached + new
    items: tuple  # the causal kernel's work items (`extend_items`), on the device


def plan_extend(tables: list[list[int]], kv_lens: list[int], q_lens: list[int], page_size: int, g: int,
                device, min_fanout: int = 2, max_unit_pages: int | None = 64) -> ExtendPlan:
    """Plan `tree_extend` for B sequences: sequence b has q_lens[b] new tokens on top of
    kv_lens[b] - q_lens[b] cached ones, in pages tables[b] (host lists, as the engine holds them);
    g query heads per KV head."""
    v_tables, v_lens, v_tok = [], [], []
    start = 0
    for t, L, n in zip(tables, kv_lens, q_lens):
        if L > n:  # the cached context, once per new token (identical rows: one unit, read once)
            v_tables += [t] * n
            v_lens += [L - n] * n
            v_tok += range(start, start + n)
        start += n
    tree, tree_items = None, None
    if v_tok:
        tree = plan_tree(v_tables, v_lens, page_size, min_fanout=min_fanout, max_unit_pages=max_unit_pages)
        tree_items = tuple(x.to(device) for x in work_items(tree, tile_for(tree, g)[1], "cpu"))
        tree = tree.to(device)
    max_pages = max(cdiv(L, page_size) for L in kv_lens)
    bt = torch.zeros(len(tables), max_pages, dtype=torch.int32)
    for b, (t, L) in enumerate(zip(tables, kv_lens)):
        n_pages = cdiv(L, page_size)
        bt[b, :n_pages] = torch.tensor(t[:n_pages], dtype=torch.int32)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    items = extend_items(list(q_lens), block_q_for(g), device)
    return ExtendPlan(tree, torch.tensor(v_tok, dtype=torch.int64, device=device), tree_items, bt.to(device),
                      cu.to(device), torch.tensor(kv_lens, dtype=torch.int64, device=device), items)


def tree_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: ExtendPlan,
                scale: float | None = None):
    """Tree-aware extend: the new tokens of many branches at once. Their cached context goes
    through the tree-decode kernels (a node shared by several branches, and a branch's own context
    for all its new tokens, is read once); the new tokens attend causally among themselves with the
    extend kernel; the two parts are merged by LSE. q and the caches as in `paged_extend`, the
    plan from `plan_extend`. Returns (out [T, H_q, D] in q's dtype, lse [T, H_q] fp32)."""
    out, lse = paged_extend(q, k_cache, v_cache, plan.block_tables, plan.cu_q, plan.kv_lens, scale,
                            items=plan.items, own_only=True)
    if plan.tree is None:
        return out, lse
    o_ctx, lse_ctx = tree_decode(q[plan.tree_tok].contiguous(), k_cache, v_cache, plan.tree, scale,
                                 items=plan.tree_items)
    o_own, lse_own = out[plan.tree_tok].float(), lse[plan.tree_tok]
    m = torch.maximum(lse_ctx, lse_own)
    w_ctx, w_own = torch.exp(lse_ctx - m), torch.exp(lse_own - m)
    total = w_ctx + w_own
    merged = (o_ctx.float() * w_ctx[..., None] + o_own * w_own[..., None]) / total[..., None]
    out[plan.tree_tok] = merged.to(out.dtype)
    lse[plan.tree_tok] = m + torch.log(total)
    return out, lse

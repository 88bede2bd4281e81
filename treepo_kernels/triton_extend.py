"""Triton paged extend: the new tokens of many sequences (prefill, segments) over their pages.

Contract of `paged_attention_ref`: query i of sequence b sits at absolute position
kv_lens[b] - q_lens[b] + i and attends to every cached key at or before it (the new tokens' K/V
are already appended). One program per (work item, KV head); a work item is a tile of BLOCK_Q
consecutive queries of one sequence, whose g query heads per KV head are packed as rows of the
`tl.dot` operand. Keys are walked in tiles of BLOCK_N tokens gathered through the block table, up
to the tile's last query; online softmax in fp32 with exp2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_tree_decode import block_d_for

LOG2E = 1.4426950408889634


@triton.jit
def _extend_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, kvl_ptr, item_seq_ptr, item_q_ptr, out_ptr, lse_ptr,
                   s_qt, s_qh, s_cp, s_ch, s_ct, s_bt, s_ot, s_oh, s_lt, scale_log2, P,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, OWN_ONLY: tl.constexpr):
    item = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(item_seq_ptr + item).to(tl.int64)
    q0 = tl.load(item_q_ptr + item)
    qs = tl.load(cu_ptr + b)
    qn = (tl.load(cu_ptr + b + 1) - qs).to(tl.int32)
    L = tl.load(kvl_ptr + b).to(tl.int32)
    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // G
    qh = h * G + r % G
    row_ok = (r < BLOCK_Q * G) & (qi < qn)
    qpos = L - qn + qi
    tok = (qs + qi).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + tok[:, None] * s_qt + qh[:, None] * s_qh + d[None, :], mask=row_ok[:, None] & dm[None, :],
                other=0.0)
    kv_end = L - qn + tl.minimum(q0 + BLOCK_Q, qn)  # keys seen by the tile's last query
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_start = L - qn if OWN_ONLY else 0  # OWN_ONLY: the new tokens only (tree_extend's causal part)
    for t0 in range(kv_start, kv_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < kv_end
        page = tl.load(bt_ptr + b * s_bt + t // P, mask=tm, other=0).to(tl.int64)
        off = page[:, None] * s_cp + h * s_ch + (t % P)[:, None] * s_ct + d[None, :]
        kv_mask = tm[:, None] & dm[None, :]
        k = tl.load(kc_ptr + off, mask=kv_mask, other=0.0)
        v = tl.load(vc_ptr + off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        visible = (t[None, :] <= qpos[:, None]) & tm[None, :] & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(out_ptr + tok[:, None] * s_ot + qh[:, None] * s_oh + d[None, :],
             (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dm[None, :])
    tl.store(lse_ptr + tok * s_lt + qh, (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=row_ok)


def extend_items(q_lens: list[int], block_q: int, device):
    """(sequence, first query) of every work item."""
    seqs, firsts = [], []
    for b, n in enumerate(q_lens):
        for a in range(0, n, block_q):
            seqs.append(b)
            firsts.append(a)
    return (torch.tensor(seqs, dtype=torch.int32, device=device),
            torch.tensor(firsts, dtype=torch.int32, device=device))


def block_q_for(g: int) -> int:
    return max(1, 64 // g) if g <= 64 else 1


def paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 cu_q: torch.Tensor, kv_lens: torch.Tensor, scale: float | None = None, items=None,
                 block_n: int = 16, own_only: bool = False):
    """q [T, H_q, D] (sequence b owns rows cu_q[b]:cu_q[b+1]); caches [num_pages, H_kv, P, D]
    contiguous in q's dtype; block_tables [B, max_pages] int32; cu_q [B + 1] and kv_lens [B]
    integer tensors on q's device. `items` (from `extend_items`) may be reused across layers.
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
            q, k_cache, v_cache, block_tables, cu_q, kv_lens, items[0], items[1], out, lse,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1), lse.stride(0), scale * LOG2E, P,
            G=g, D=D, BLOCK_Q=bq, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d_for(D),
            PREC="ieee" if q.dtype == torch.float32 else "tf32", OWN_ONLY=own_only)
    return out, lse


@dataclass
class ExtendPlan:
    """Host-side plan of a tree-aware extend (built once per step, reused by every layer)."""

    tree: object  # TreePlan over the cached context, one virtual leaf per new token with a context
    tree_tok: torch.Tensor  # [V] flat token index of each virtual leaf
    tree_items: tuple
    block_tables: torch.Tensor
    cu_q: torch.Tensor
    kv_lens: torch.Tensor
    items: tuple


def plan_extend(tables: list[list[int]], kv_lens: list[int], q_lens: list[int], page_size: int, g: int,
                device, min_fanout: int = 2, max_unit_pages: int | None = 64) -> ExtendPlan:
    """Plan `tree_extend` for B sequences: sequence b has q_lens[b] new tokens on top of
    kv_lens[b] - q_lens[b] cached ones, in pages tables[b] (host lists, as the engine holds them)."""
    from .tree_plan import plan_tree
    from .triton_tree_decode import tile_for, work_items

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
    max_pages = max(-(-L // page_size) for L in kv_lens)
    bt = torch.zeros(len(tables), max_pages, dtype=torch.int32)
    for b, (t, L) in enumerate(zip(tables, kv_lens)):
        n_pages = -(-L // page_size)
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
    extend kernel; the two parts are merged by LSE. Same contract as `paged_extend`."""
    from .triton_tree_decode import tree_decode

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

"""Triton tree-aware decode: partials per work item + LSE merge, two launches per step.

Kernel 1 runs one program per (work item, KV head). A work item is a unit of the TreePlan (a run
of pages and the leaves below it, see tree_plan.py) and a tile of its leaves: the g query heads of
each leaf sharing this KV head are packed as rows of one `tl.dot` operand (>= 16 rows), so a
shared node's K/V tile is loaded once for all its leaves. Online softmax in fp32 with exp2 (log2(e)
folded into the scale); the partial output is written normalised with its LSE (natural log at
the boundary, like the references). Kernel 2 merges each leaf's partials in plan order, root
first: deterministic, no atomics. Plain (tree-unaware) paged decode is the same pair of kernels on
a plan with one unit per leaf (`paged_decode`).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .tree_plan import TreePlan, plan_tree

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _partials_kernel(q_ptr, kc_ptr, vc_ptr, item_unit_ptr, item_leaf_ptr, unit_page_ptr, unit_pages_ptr,
                     unit_len_ptr, unit_leaf_ptr, unit_leaves_ptr, po_ptr, pl_ptr,
                     s_qb, s_qh, s_cp, s_ch, s_ct, s_pob, s_poh, s_plb, scale_log2, P,
                     G: tl.constexpr, D: tl.constexpr, LEAF_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    item = tl.program_id(0)
    h = tl.program_id(1)
    u = tl.load(item_unit_ptr + item)
    first = tl.load(item_leaf_ptr + item)
    last = tl.load(unit_leaf_ptr + u + 1)
    r = tl.arange(0, BLOCK_M)
    slot = first + r // G
    qh = h * G + r % G
    row_ok = (r < LEAF_TILE * G) & (slot < last)
    leaf = tl.load(unit_leaves_ptr + slot, mask=row_ok, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + leaf[:, None] * s_qb + qh[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None] & dm[None, :], other=0.0)
    p0 = tl.load(unit_page_ptr + u)
    n = tl.load(unit_len_ptr + u)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t0 in range(0, n, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < n
        page = tl.load(unit_pages_ptr + p0 + t // P, mask=tm, other=0).to(tl.int64)
        off = page[:, None] * s_cp + h * s_ch + (t % P)[:, None] * s_ct + d[None, :]
        kv_mask = tm[:, None] & dm[None, :]
        k = tl.load(kc_ptr + off, mask=kv_mask, other=0.0)
        v = tl.load(vc_ptr + off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        s = tl.where(tm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds >= 1 valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(po_ptr + slot.to(tl.int64)[:, None] * s_pob + qh[:, None] * s_poh + d[None, :], out,
             mask=row_ok[:, None] & dm[None, :])
    tl.store(pl_ptr + slot.to(tl.int64) * s_plb + qh, lse, mask=row_ok)


@triton.jit
def _merge_kernel(po_ptr, pl_ptr, leaf_part_ptr, leaf_parts_ptr, out_ptr, lse_ptr,
                  s_pob, s_poh, s_plb, s_ob, s_oh, s_lb, HQ: tl.constexpr, D: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    a = tl.load(leaf_part_ptr + b)
    e = tl.load(leaf_part_ptr + b + 1)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = hh < HQ
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for k in range(a, e):
        slot = tl.load(leaf_parts_ptr + k).to(tl.int64)
        m = tl.maximum(m, tl.load(pl_ptr + slot * s_plb + hh, mask=hm, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    tot = tl.zeros([BLOCK_H], tl.float32)
    for k in range(a, e):  # fixed order: root first
        slot = tl.load(leaf_parts_ptr + k).to(tl.int64)
        lse = tl.load(pl_ptr + slot * s_plb + hh, mask=hm, other=float("-inf"))
        w = tl.exp(lse - m_safe)
        o = tl.load(po_ptr + slot * s_pob + hh[:, None] * s_poh + d[None, :], mask=hm[:, None] & dm[None, :],
                    other=0.0)
        acc += w[:, None] * o
        tot += w
    has = tot > 0
    out = acc / tl.where(has, tot, 1.0)[:, None]
    tl.store(out_ptr + b * s_ob + hh[:, None] * s_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=hm[:, None] & dm[None, :])
    tl.store(lse_ptr + b * s_lb + hh, tl.where(has, m_safe + tl.log(tl.where(has, tot, 1.0)), float("-inf")),
             mask=hm)


def work_items(plan: TreePlan, leaf_tile: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit, first partial slot) of every work item: each unit's leaves cut into tiles."""
    ptr = plan.unit_leaf_ptr.tolist()
    units, firsts = [], []
    for u in range(plan.num_units):
        for a in range(ptr[u], max(ptr[u + 1], ptr[u] + 1), leaf_tile):
            units.append(u)
            firsts.append(a)
    return (torch.tensor(units, dtype=torch.int32, device=device),
            torch.tensor(firsts, dtype=torch.int32, device=device))


def tile_for(plan: TreePlan, g: int) -> tuple[int, int]:
    """(rows of a program's query tile, leaves per work item): the g heads of each leaf are rows;
    16..64 rows, as few as the widest unit needs - but always all g heads of one leaf (g > 64)."""
    block_m = max(16, triton.next_power_of_2(g), min(64, triton.next_power_of_2(max(plan.max_unit_leaves, 1) * g)))
    return block_m, max(1, block_m // g)


def block_d_for(D: int) -> int:
    """Head-dim tile: a power of two (masked past D) and >= 16, the smallest K of a `tl.dot`
    (fp16 / bf16 dots with K < 16 do not compile for a GPU; head_dim 8 exists in tiny models)."""
    return max(16, triton.next_power_of_2(D))


def merge_heads_for(Hq: int, block_d: int) -> int:
    """Heads per merge program: all of them, up to 4096 accumulator elements (more spills)."""
    return min(triton.next_power_of_2(Hq), max(1, 4096 // block_d))


def _check(q, k_cache, v_cache):
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape, \
        f"q {tuple(q.shape)} must be [B, H_q, D], caches [pages, H_kv, P, D]"
    assert q.shape[2] == k_cache.shape[3], f"head_dim of q ({q.shape[2]}) != cache ({k_cache.shape[3]})"
    assert q.shape[1] % k_cache.shape[1] == 0, f"H_q={q.shape[1]} is not a multiple of H_kv={k_cache.shape[1]}"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and the caches must share a dtype"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1


def tree_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: TreePlan,
                scale: float | None = None, items=None, block_n: int = 16, num_warps: int = 4):
    """As `tree_decode_ref`: q [B, H_q, D] (row b = leaf b of the plan; fp32 / fp16 / bf16),
    caches [num_pages, H_kv, page_size, D] contiguous in q's dtype, plan arrays int32 on q's device.
    `items` (from `work_items`) may be passed to reuse them across layers; block_n (KV tokens per
    tile) and num_warps tune kernel 1 (64-token tiles need 8 warps to stay out of register spills).
    Returns (out [B, H_q, D] in q's dtype, lse [B, H_q] fp32, natural log)."""
    _check(q, k_cache, v_cache)
    B, Hq, D = q.shape
    Hkv, P = k_cache.shape[1], k_cache.shape[2]
    g = Hq // Hkv
    assert plan.num_leaves == B, f"plan has {plan.num_leaves} leaves, q has {B} rows"
    for name in ("unit_page_ptr", "unit_pages", "unit_len", "unit_leaf_ptr", "unit_leaves", "leaf_part_ptr",
                 "leaf_parts"):
        a = getattr(plan, name)
        assert a.dtype == torch.int32 and a.device == q.device and a.is_contiguous(), \
            f"plan.{name} must be contiguous int32 on {q.device}, is {a.dtype} on {a.device}"
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    block_m, leaf_tile = tile_for(plan, g)
    if items is None:
        items = work_items(plan, leaf_tile, q.device)
    parts = plan.num_parts
    part_o = torch.empty(max(parts, 1), Hq, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(max(parts, 1), Hq, dtype=torch.float32, device=q.device)
    block_d = block_d_for(D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if items[0].numel():
        _partials_kernel[(items[0].numel(), Hkv)](
            q, k_cache, v_cache, items[0], items[1], plan.unit_page_ptr, plan.unit_pages, plan.unit_len,
            plan.unit_leaf_ptr, plan.unit_leaves, part_o, part_lse, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), part_o.stride(0), part_o.stride(1),
            part_lse.stride(0), scale * LOG2E, P, G=g, D=D, LEAF_TILE=leaf_tile, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_D=block_d, PREC=prec, num_warps=num_warps)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    block_h = merge_heads_for(Hq, block_d)
    _merge_kernel[(B, triton.cdiv(Hq, block_h))](
        part_o, part_lse, plan.leaf_part_ptr, plan.leaf_parts, out, lse, part_o.stride(0), part_o.stride(1),
        part_lse.stride(0), out.stride(0), out.stride(1), lse.stride(0), HQ=Hq, D=D, BLOCK_H=block_h, BLOCK_D=block_d)
    return out, lse


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables, kv_lens,
                 scale: float | None = None, max_unit_pages: int | None = 64):
    """Plain (tree-unaware) paged decode: every leaf reads its whole context. Same kernels, a plan
    with one unit per leaf (rows longer than max_unit_pages pages are split, split-KV).
    block_tables [B][pages] / kv_lens [B]: host lists (as the engine holds them) or tensors (read
    back to the host once for the planner). Returns (out [B, H_q, D] in q's dtype, lse [B, H_q] fp32)."""
    if isinstance(block_tables, torch.Tensor):
        block_tables = block_tables.tolist()
    if isinstance(kv_lens, torch.Tensor):
        kv_lens = kv_lens.tolist()
    plan = plan_tree(block_tables, kv_lens, k_cache.shape[2], min_fanout=10**9, max_unit_pages=max_unit_pages,
                     device=q.device)
    return tree_decode(q, k_cache, v_cache, plan, scale)

"""Tree-aware decode: one query token per leaf, a shared node's KV read once, LSE merge.

The scheme (docs/kernels.md, "Tree decode"): the host planner (tree_plan.py) cuts the batch's tree
into units - a run of pages and the leaves below it. Kernel 1 computes a partial output + LSE for
every (unit, leaf) pair, reading the unit's K/V once for all its leaves; kernel 2 merges each leaf's
partials by LSE in plan order, root first (deterministic, no atomics). Two launches whatever the
tree's depth. Plain (tree-unaware) paged decode is the same pair of kernels on a plan with one unit
per leaf (`paged_decode`).

This file: the plain-PyTorch reference of both kernels (`tree_decode_ref`, itself checked against
`extend.paged_attention_ref`), the Triton kernels, their launcher `tree_decode` and `paged_decode`.
The C++ version is `treepo_kernels.cpu.tree_decode`.
"""
from __future__ import annotations

import math

import torch

from .common import cdiv
from .tree_plan import TreePlan, plan_tree
from .triton_common import LOG2E, block_d_for, load_kv_tile, online_softmax_finish, online_softmax_step, tl, triton


def unit_partials_ref(q, k_cache, v_cache, plan: TreePlan, scale: float):
    """Kernel-1 reference: partial outputs [parts, H_q, D] fp32 and LSEs [parts, H_q] fp32."""
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[1]
    g = Hq // Hkv
    part_o = torch.zeros(plan.num_parts, Hq, D, dtype=torch.float32, device=q.device)
    part_lse = torch.full((plan.num_parts, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    for u in range(plan.num_units):
        p0, p1 = int(plan.unit_page_ptr[u]), int(plan.unit_page_ptr[u + 1])
        l0, l1 = int(plan.unit_leaf_ptr[u]), int(plan.unit_leaf_ptr[u + 1])
        n = int(plan.unit_len[u])
        if n == 0 or l1 == l0:
            continue
        pages = plan.unit_pages[p0:p1].long()
        k = k_cache[pages].transpose(0, 1).reshape(Hkv, -1, D)[:, :n].float()  # [Hkv, n, D]
        v = v_cache[pages].transpose(0, 1).reshape(Hkv, -1, D)[:, :n].float()
        leaves = plan.unit_leaves[l0:l1].long()
        qq = q[leaves].float().view(-1, Hkv, g, D)  # [m, Hkv, g, D]
        s = torch.einsum("mhgd,hnd->mhgn", qq, k) * scale
        lse = torch.logsumexp(s, -1)  # [m, Hkv, g]
        o = torch.einsum("mhgn,hnd->mhgd", torch.softmax(s, -1), v)
        part_o[l0:l1] = o.reshape(-1, Hq, D)
        part_lse[l0:l1] = lse.reshape(-1, Hq)
    return part_o, part_lse


def merge_partials_ref(part_o, part_lse, plan: TreePlan, out_dtype):
    """Kernel-2 reference: each leaf's partials merged by LSE, in plan order (root first)."""
    B = plan.num_leaves
    Hq, D = part_o.shape[1], part_o.shape[2]
    out = torch.empty(B, Hq, D, dtype=out_dtype, device=part_o.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=part_o.device)
    for b in range(B):
        idx = plan.leaf_parts[int(plan.leaf_part_ptr[b]):int(plan.leaf_part_ptr[b + 1])].long()
        m = torch.logsumexp(part_lse[idx], 0)  # [Hq]
        w = torch.exp(part_lse[idx] - m)  # [parts, Hq]
        out[b] = (w[..., None] * part_o[idx]).sum(0).to(out_dtype)
        lse[b] = m
    return out, lse


def tree_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: TreePlan,
                    scale: float | None = None):
    """q [B, H_q, D] (one token per leaf, row b = leaf b of the plan); caches [pages, H_kv, P, D].

    Returns (out [B, H_q, D] in q's dtype, lse [B, H_q] fp32, natural log)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    part_o, part_lse = unit_partials_ref(q, k_cache, v_cache, plan, scale)
    return merge_partials_ref(part_o, part_lse, plan, q.dtype)


# ------------------------------------------------------------------------------------ Triton
# Kernel 1 runs one program per (work item, KV head). A work item is a unit and a tile of its
# leaves: the g query heads of each leaf sharing this KV head are packed as rows of one `tl.dot`
# operand (>= 16 rows), so the unit's K/V tile is loaded once for all its leaves. The partial
# output is written normalised, with its LSE.

@triton.jit
def _partials_kernel(
        # queries, KV pools, work items and the plan's CSR arrays
        q_ptr, k_cache_ptr, v_cache_ptr, item_unit_ptr, item_first_ptr, unit_page_ptr, unit_pages_ptr,
        unit_len_ptr, unit_leaf_ptr, unit_leaves_ptr,
        # outputs: one partial (output, LSE) per partial slot
        part_o_ptr, part_lse_ptr,
        # sizes and strides
        page_size, scale_log2, stride_q_leaf, stride_q_head, stride_cache_page, stride_cache_head, stride_cache_tok,
        stride_po_slot, stride_po_head, stride_pl_slot,
        G: tl.constexpr, D: tl.constexpr, LEAF_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    item = tl.program_id(0)
    h = tl.program_id(1)
    u = tl.load(item_unit_ptr + item)
    first = tl.load(item_first_ptr + item)  # the item's first partial slot
    last = tl.load(unit_leaf_ptr + u + 1)
    r = tl.arange(0, BLOCK_M)  # row r: leaf slot first + r // G, query head h * G + r % G
    slot = first + r // G
    qh = h * G + r % G
    row_ok = (r < LEAF_TILE * G) & (slot < last)
    leaf = tl.load(unit_leaves_ptr + slot, mask=row_ok, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + leaf[:, None] * stride_q_leaf + qh[:, None] * stride_q_head + d[None, :],
                mask=row_ok[:, None] & dm[None, :], other=0.0)
    p0 = tl.load(unit_page_ptr + u)
    n = tl.load(unit_len_ptr + u)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t0 in range(0, n, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < n
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, unit_pages_ptr + p0, t, tm, h, d, dm, page_size,
                            stride_cache_page, stride_cache_head, stride_cache_tok)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        s = tl.where(tm[None, :], s, float("-inf"))  # every tile holds >= 1 valid token
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, PREC)
    out, lse = online_softmax_finish(m_i, l_i, acc)  # an empty unit: lse -inf
    tl.store(part_o_ptr + slot.to(tl.int64)[:, None] * stride_po_slot + qh[:, None] * stride_po_head + d[None, :],
             out, mask=row_ok[:, None] & dm[None, :])
    tl.store(part_lse_ptr + slot.to(tl.int64) * stride_pl_slot + qh, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
        part_o_ptr, part_lse_ptr, leaf_part_ptr, leaf_parts_ptr, out_ptr, lse_ptr,
        stride_po_slot, stride_po_head, stride_pl_slot, stride_out_leaf, stride_out_head, stride_lse_leaf,
        HQ: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (leaf, block of BLOCK_H query heads): its partials merged by LSE."""
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
        m = tl.maximum(m, tl.load(part_lse_ptr + slot * stride_pl_slot + hh, mask=hm, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    tot = tl.zeros([BLOCK_H], tl.float32)
    for k in range(a, e):  # fixed order: root first
        slot = tl.load(leaf_parts_ptr + k).to(tl.int64)
        lse = tl.load(part_lse_ptr + slot * stride_pl_slot + hh, mask=hm, other=float("-inf"))
        w = tl.exp(lse - m_safe)
        o = tl.load(part_o_ptr + slot * stride_po_slot + hh[:, None] * stride_po_head + d[None, :],
                    mask=hm[:, None] & dm[None, :], other=0.0)
        acc += w[:, None] * o
        tot += w
    has = tot > 0
    out = acc / tl.where(has, tot, 1.0)[:, None]
    tl.store(out_ptr + b * stride_out_leaf + hh[:, None] * stride_out_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=hm[:, None] & dm[None, :])
    tl.store(lse_ptr + b * stride_lse_leaf + hh, tl.where(has, m_safe + tl.log(tl.where(has, tot, 1.0)), float("-inf")),
             mask=hm)


def work_items(plan: TreePlan, leaf_tile: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit, first partial slot) of every work item, [items] int32 each: each unit's leaves cut
    into tiles of leaf_tile (a unit without leaves still gets one item, which writes nothing)."""
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


def merge_heads_for(Hq: int, block_d: int) -> int:
    """Heads per merge program: all of them, up to 4096 accumulator elements (more spills)."""
    return min(triton.next_power_of_2(Hq), max(1, 4096 // block_d))


_PLAN_ARRAYS = ("unit_page_ptr", "unit_pages", "unit_len", "unit_leaf_ptr", "unit_leaves", "leaf_part_ptr",
                "leaf_parts")


def tree_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: TreePlan,
                scale: float | None = None, items=None, block_n: int = 16, num_warps: int = 4):
    """Triton `tree_decode_ref` (two launches).

    q: [B, H_q, D] fp32 / fp16 / bf16, row b = leaf b of the plan, last dim contiguous;
    k_cache, v_cache: [num_pages, H_kv, page_size, D] contiguous, q's dtype; H_q a multiple of H_kv;
    plan: a TreePlan whose arrays are contiguous int32 on q's device (`plan.to(device)`);
    items: the (unit, first slot) pair of `work_items(plan, tile_for(plan, g)[1], device)`, to reuse
    across layers (built here when None); block_n (KV tokens per tile) and num_warps tune kernel 1
    (64-token tiles need 8 warps to stay out of register spills); scale defaults to 1/sqrt(D).
    Returns (out [B, H_q, D] in q's dtype, lse [B, H_q] fp32, natural log)."""
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape, \
        f"q {tuple(q.shape)} must be [B, H_q, D], caches [pages, H_kv, P, D]"
    assert q.shape[2] == k_cache.shape[3], f"head_dim of q ({q.shape[2]}) != cache ({k_cache.shape[3]})"
    assert q.shape[1] % k_cache.shape[1] == 0, f"H_q={q.shape[1]} is not a multiple of H_kv={k_cache.shape[1]}"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and the caches must share a dtype"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
    B, Hq, D = q.shape
    Hkv, P = k_cache.shape[1], k_cache.shape[2]
    g = Hq // Hkv
    assert plan.num_leaves == B, f"plan has {plan.num_leaves} leaves, q has {B} rows"
    for name in _PLAN_ARRAYS:
        a = getattr(plan, name)
        assert a.dtype == torch.int32 and a.device == q.device and a.is_contiguous(), \
            f"plan.{name} must be contiguous int32 on {q.device}, is {a.dtype} on {a.device}"
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    block_m, leaf_tile = tile_for(plan, g)
    if items is None:
        items = work_items(plan, leaf_tile, q.device)
    parts = plan.num_parts
    part_o = torch.empty(max(parts, 1), Hq, D, dtype=torch.float32, device=q.device)  # [parts, H_q, D]
    part_lse = torch.empty(max(parts, 1), Hq, dtype=torch.float32, device=q.device)  # [parts, H_q]
    block_d = block_d_for(D)
    if items[0].numel():
        _partials_kernel[(items[0].numel(), Hkv)](
            q, k_cache, v_cache, items[0], items[1], plan.unit_page_ptr, plan.unit_pages, plan.unit_len,
            plan.unit_leaf_ptr, plan.unit_leaves,
            part_o, part_lse,
            P, scale * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            part_o.stride(0), part_o.stride(1), part_lse.stride(0),
            G=g, D=D, LEAF_TILE=leaf_tile, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    block_h = merge_heads_for(Hq, block_d)
    _merge_kernel[(B, cdiv(Hq, block_h))](
        part_o, part_lse, plan.leaf_part_ptr, plan.leaf_parts, out, lse,
        part_o.stride(0), part_o.stride(1), part_lse.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        HQ=Hq, D=D, BLOCK_H=block_h, BLOCK_D=block_d)
    return out, lse


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables, kv_lens,
                 scale: float | None = None, max_unit_pages: int | None = 64):
    """Plain (tree-unaware) paged decode, the contract of `extend.paged_attention_ref` with one new
    token per row: every leaf reads its whole context. Same kernels, a plan with one unit per leaf
    (rows longer than max_unit_pages pages are split, split-KV). block_tables [B][pages] / kv_lens
    [B]: host lists (as the engine holds them) or tensors (read back to the host once for the
    planner); q and the caches as in `tree_decode`. Returns (out [B, H_q, D] in q's dtype, lse [B, H_q] fp32)."""
    if isinstance(block_tables, torch.Tensor):
        block_tables = block_tables.tolist()
    if isinstance(kv_lens, torch.Tensor):
        kv_lens = kv_lens.tolist()
    plan = plan_tree(block_tables, kv_lens, k_cache.shape[2], min_fanout=10**9, max_unit_pages=max_unit_pages,
                     device=q.device)
    return tree_decode(q, k_cache, v_cache, plan, scale)

"""Tree attention for training: attention over packed trees, forward and backward (docs/kernels.md,
"Tree attention for training").

A micro-batch of trees is packed by treepo/train/batch.py: every unique token once, depth first,
trees back to back, and key j visible to query i iff j <= i < visible_end[j] (visible_end[j] is the
end of the subtree of j's node). Queries and keys are the same T tokens. A query therefore sees its
ancestors' segments whole and its own node causally; a shared prompt is one run of keys that every
token of its tree attends to - read once per query block that needs it, never once per leaf as an
unpacked (root-to-leaf rows) forward does.

This file, top to bottom:
- `tree_attention_ref`: the contract in plain PyTorch (dense [T, T] mask, fp32 math), returning
  the output and the LSE; autograd through it gives the reference gradients.
- `plan_tree_attention` / `TreeAttentionPlan` (in tree_attention_plan.py, re-exported here):
  block-level metadata, built once per micro-batch and shared by every layer and by the forward
  and the backward: for each query block the key blocks it visits, for each key block the query
  blocks that see it, each list with the tiles that need no mask first.
- Triton kernels: `_fwd_kernel` (online softmax, base 2, fp32; saves the LSE), `_dq_kernel` and
  `_dkdv_kernel` (FlashAttention-2 backward: the scores recomputed per tile from the saved LSE).
  A key block seen by many descendants (a prompt) accumulates dK, dV over all of them in one
  program, in the plan's fixed order; when that list is long it is cut into chunks whose fp32
  partials are summed afterwards in a fixed order. No atomics: results are deterministic.
- The launchers `tree_attention_fwd` / `tree_attention_bwd`, the autograd function, and the public
  `tree_attention(q, k, v, plan)`.

GQA: the g = H_q / H_kv query heads of a KV head share its K/V tiles. A program packs `hpp` of them
as rows of one `tl.dot` (hpp = the largest power of two dividing g, at most 8, so rows stay a power
of two with no padding: g = 3 runs one head per program, g = 4 and g = 8 pack all of them); the
dK/dV program of a KV head loops over all g heads, so nothing is accumulated across programs.
"""
from __future__ import annotations

import math

import torch

from .common import cdiv
from .tree_attention_plan import BLOCK_N, MAX_Q_BLOCKS, ROWS, TreeAttentionPlan, plan_tree_attention, tile_for
from .triton_common import LOG2E, block_d_for, online_softmax_finish, online_softmax_step, tl, triton

__all__ = ["BLOCK_N", "MAX_Q_BLOCKS", "ROWS", "TreeAttentionPlan", "plan_tree_attention", "tile_for", "tree_attention",
           "tree_attention_bwd", "tree_attention_fwd", "tree_attention_ref"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------- reference

def tree_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible_end: torch.Tensor,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed trees in plain PyTorch, fp32 math, the dense [T, T] mask.

    q: [T, H_q, D]; k, v: [T, H_kv, D] (H_kv divides H_q); visible_end: [T] int, key j visible to
    query i iff j <= i < visible_end[j]. Returns (out [T, H_q, D] in q's dtype, lse [T, H_q] fp32,
    natural log); differentiable in q, k, v."""
    T, Hq, D = q.shape
    g = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf = q.float().transpose(0, 1)  # [Hq, T, D]
    kf, vf = (t.float().repeat_interleave(g, 1).transpose(0, 1) for t in (k, v))
    i = torch.arange(T, device=q.device)
    mask = (i[None, :] <= i[:, None]) & (i[:, None] < visible_end[None, :].to(q.device))  # [T, T]
    s = (qf @ kf.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))  # [Hq, T, T]
    lse = torch.logsumexp(s, -1)  # [Hq, T]
    out = torch.softmax(s, -1) @ vf
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1)


# ------------------------------------------------------------------------------------ kernels
# Rows of a program: r in [0, BLOCK_Q * HPP), token qb * BLOCK_Q + r // HPP, query head
# hg * HPP + r % HPP (hg: the program's head group; its KV head is hg * HPP // G). Scores arrive
# multiplied by scale * log2(e) (exp2 throughout); the LSE is stored in natural log.

@triton.jit
def _load_rows(ptr, tok, head, row_ok, d, d_ok, stride_tok, stride_head):
    """[rows, BLOCK_D] of a [T, H, D] tensor at (tok[r], head[r]); 0 outside row_ok / d_ok."""
    off = tok.to(tl.int64)[:, None] * stride_tok + head[:, None] * stride_head + d[None, :]
    return tl.load(ptr + off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _query_rows(qb, hg, T, G: tl.constexpr, HPP: tl.constexpr, BLOCK_Q: tl.constexpr):
    """(token qi, query head qh, row_ok) of each row of query block qb, head group hg, and the
    group's KV head."""
    r = tl.arange(0, BLOCK_Q * HPP)
    qi = qb * BLOCK_Q + r // HPP
    return qi, hg * HPP + r % HPP, qi < T, hg * HPP // G


@triton.jit
def _key_tile(k_ptr, v_ptr, kb, kvh, T, d, d_ok, stride_k_tok, stride_k_head, BLOCK_N: tl.constexpr):
    """(key indices kj [BLOCK_N], kv_ok, K, V [BLOCK_N, BLOCK_D]) of key block kb, KV head kvh."""
    n = tl.arange(0, BLOCK_N)
    kj = kb * BLOCK_N + n
    kv_ok = kj < T
    k = _load_rows(k_ptr, kj, kvh + 0 * n, kv_ok, d, d_ok, stride_k_tok, stride_k_head)
    v = _load_rows(v_ptr, kj, kvh + 0 * n, kv_ok, d, d_ok, stride_k_tok, stride_k_head)
    return kj, kv_ok, k, v


@triton.jit
def _visible(kj, ve, qi):
    """[rows, BLOCK_N]: key kj[c] is visible to query qi[r] (j <= i < visible_end[j])."""
    return (kj[None, :] <= qi[:, None]) & (qi[:, None] < ve[None, :])


@triton.jit
def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, ve_ptr, q_kv_ptr_ptr, q_kv_full_ptr, q_kv_ptr,  # inputs, plan
        out_ptr, lse_ptr,  # outputs
        T, scale_log2, stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_o_tok, stride_o_head,
        stride_lse_tok,
        G: tl.constexpr, HPP: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    qb = tl.program_id(0)
    qi, qh, row_ok, kvh = _query_rows(qb, tl.program_id(1), T, G, HPP, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = _load_rows(q_ptr, qi, qh, row_ok, d, d_ok, stride_q_tok, stride_q_head)
    m_i = tl.full([BLOCK_Q * HPP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * HPP], tl.float32)
    acc = tl.zeros([BLOCK_Q * HPP, BLOCK_D], tl.float32)
    e0 = tl.load(q_kv_ptr_ptr + qb)
    e1 = tl.load(q_kv_ptr_ptr + qb + 1)
    ef = e0 + tl.load(q_kv_full_ptr + qb)
    for e in range(e0, ef):  # full tiles: every query sees every key
        kj, kv_ok, k, v = _key_tile(k_ptr, v_ptr, tl.load(q_kv_ptr + e), kvh, T, d, d_ok, stride_k_tok,
                                    stride_k_head, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, PREC)
    for e in range(ef, e1):  # masked tiles: j <= i < visible_end[j]
        kj, kv_ok, k, v = _key_tile(k_ptr, v_ptr, tl.load(q_kv_ptr + e), kvh, T, d, d_ok, stride_k_tok,
                                    stride_k_head, BLOCK_N)
        ve = tl.load(ve_ptr + kj, mask=kv_ok, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        s = tl.where(_visible(kj, ve, qi), s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, PREC)
    out, lse = online_softmax_finish(m_i, l_i, acc)
    o_off = qi.to(tl.int64)[:, None] * stride_o_tok + qh[:, None] * stride_o_head + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + qi.to(tl.int64) * stride_lse_tok + qh, lse, mask=row_ok)


@triton.jit
def _tile_grads(q, do, lse2, delta, k, v, s_mask, MASKED: tl.constexpr, scale_log2, PREC: tl.constexpr):
    """P [rows, BLOCK_N] (fp32) and dS = P * (dO V^T - delta) of one tile, from the saved LSE
    (lse2 = LSE * log2(e)); entries outside s_mask are 0 when MASKED."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(s_mask, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, ve_ptr, q_kv_ptr_ptr, q_kv_full_ptr, q_kv_ptr,
        dq_ptr,
        T, scale_log2, scale, stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_lse_tok,
        G: tl.constexpr, HPP: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    qb = tl.program_id(0)
    qi, qh, row_ok, kvh = _query_rows(qb, tl.program_id(1), T, G, HPP, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = _load_rows(q_ptr, qi, qh, row_ok, d, d_ok, stride_q_tok, stride_q_head)
    do = _load_rows(do_ptr, qi, qh, row_ok, d, d_ok, stride_q_tok, stride_q_head)  # dO, dQ: q's strides
    lse2 = tl.load(lse_ptr + qi.to(tl.int64) * stride_lse_tok + qh, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + qi.to(tl.int64) * stride_lse_tok + qh, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_Q * HPP, BLOCK_D], tl.float32)
    e0 = tl.load(q_kv_ptr_ptr + qb)
    e1 = tl.load(q_kv_ptr_ptr + qb + 1)
    ef = e0 + tl.load(q_kv_full_ptr + qb)
    for e in range(e0, ef):  # full tiles
        kj, kv_ok, k, v = _key_tile(k_ptr, v_ptr, tl.load(q_kv_ptr + e), kvh, T, d, d_ok, stride_k_tok,
                                    stride_k_head, BLOCK_N)
        p, ds = _tile_grads(q, do, lse2, delta, k, v, kv_ok[None, :], False, scale_log2, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    for e in range(ef, e1):  # masked tiles
        kj, kv_ok, k, v = _key_tile(k_ptr, v_ptr, tl.load(q_kv_ptr + e), kvh, T, d, d_ok, stride_k_tok,
                                    stride_k_head, BLOCK_N)
        ve = tl.load(ve_ptr + kj, mask=kv_ok, other=0)
        p, ds = _tile_grads(q, do, lse2, delta, k, v, _visible(kj, ve, qi), True, scale_log2, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq_off = qi.to(tl.int64)[:, None] * stride_q_tok + qh[:, None] * stride_q_head + d[None, :]
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_walk(q_ptr, do_ptr, lse_ptr, delta_ptr, kv_q_ptr, e0, e1, k, v, kj, ve, dk, dv, r, kvh, T, d, d_ok,
               scale_log2, stride_q_tok, stride_q_head, stride_lse_tok, MASKED: tl.constexpr, G: tl.constexpr,
               HPP: tl.constexpr, BLOCK_Q: tl.constexpr, PREC: tl.constexpr):
    """dK, dV [BLOCK_N, BLOCK_D] fp32 of one key tile plus the query blocks kv_q[e0:e1], each with
    every query head of KV head kvh, in order."""
    for e in range(e0, e1):
        qi = tl.load(kv_q_ptr + e) * BLOCK_Q + r // HPP
        row_ok = qi < T
        visible = _visible(kj, ve, qi)
        for hh in range(G // HPP):
            qh = kvh * G + hh * HPP + r % HPP
            q = _load_rows(q_ptr, qi, qh, row_ok, d, d_ok, stride_q_tok, stride_q_head)
            do = _load_rows(do_ptr, qi, qh, row_ok, d, d_ok, stride_q_tok, stride_q_head)
            lse2 = tl.load(lse_ptr + qi.to(tl.int64) * stride_lse_tok + qh, mask=row_ok, other=0.0) \
                * 1.4426950408889634
            delta = tl.load(delta_ptr + qi.to(tl.int64) * stride_lse_tok + qh, mask=row_ok, other=0.0)
            p, ds = _tile_grads(q, do, lse2, delta, k, v, visible, MASKED, scale_log2, PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, ve_ptr, kv_q_ptr_ptr, kv_q_full_ptr, kv_q_ptr,
        item_kb_ptr, item_start_ptr, item_end_ptr, item_part_ptr,
        dk_ptr, dv_ptr, part_dk_ptr, part_dv_ptr,
        T, scale_log2, scale, stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_lse_tok,
        G: tl.constexpr, HPP: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    it = tl.program_id(0)
    kvh = tl.program_id(1)
    kb = tl.load(item_kb_ptr + it)
    e0 = tl.load(item_start_ptr + it)
    e1 = tl.load(item_end_ptr + it)
    part = tl.load(item_part_ptr + it)
    ef = tl.load(kv_q_ptr_ptr + kb) + tl.load(kv_q_full_ptr + kb)  # the key block's full tiles end here
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kj, kv_ok, k, v = _key_tile(k_ptr, v_ptr, kb, kvh, T, d, d_ok, stride_k_tok, stride_k_head, BLOCK_N)
    ve = tl.load(ve_ptr + kj, mask=kv_ok, other=0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    r = tl.arange(0, BLOCK_Q * HPP)
    dk, dv = _dkdv_walk(q_ptr, do_ptr, lse_ptr, delta_ptr, kv_q_ptr, e0, tl.minimum(e1, ef), k, v, kj, ve, dk, dv, r,
                        kvh, T, d, d_ok, scale_log2, stride_q_tok, stride_q_head, stride_lse_tok, False, G, HPP,
                        BLOCK_Q, PREC)  # full tiles
    dk, dv = _dkdv_walk(q_ptr, do_ptr, lse_ptr, delta_ptr, kv_q_ptr, tl.maximum(e0, ef), e1, k, v, kj, ve, dk, dv, r,
                        kvh, T, d, d_ok, scale_log2, stride_q_tok, stride_q_head, stride_lse_tok, True, G, HPP,
                        BLOCK_Q, PREC)  # masked tiles
    dk = dk * scale
    if part < 0:
        off = kj.to(tl.int64)[:, None] * stride_k_tok + kvh * stride_k_head + d[None, :]
        ok = kv_ok[:, None] & d_ok[None, :]
        tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=ok)
        tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=ok)
    else:  # fp32 partial [n_parts, H_kv, BLOCK_N, BLOCK_D], summed by the launcher in a fixed order
        off = ((part.to(tl.int64) * tl.num_programs(1) + kvh) * BLOCK_N + n[:, None]) * BLOCK_D + d[None, :]
        tl.store(part_dk_ptr + off, dk)
        tl.store(part_dv_ptr + off, dv)


# ---------------------------------------------------------------------------------- launchers

def _check(q, k, v, plan: TreeAttentionPlan, who: str):
    ok = q.dim() == 3 and k.dim() == 3 and k.shape == v.shape and q.shape[0] == k.shape[0] \
        and q.shape[2] == k.shape[2] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0
    if not ok:
        raise ValueError(f"{who}: need q [T, H_q, D], k and v [T, H_kv, D] with H_kv dividing H_q; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != plan.tokens:
        raise ValueError(f"{who}: q has {q.shape[0]} tokens, the plan was built for T = {plan.tokens}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"{who}: q, k, v must share one dtype of fp32 / fp16 / bf16; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not (q.device == k.device == v.device == plan.visible_end.device):
        raise ValueError(f"{who}: q, k, v and the plan must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, plan on {plan.visible_end.device}")
    return tile_for(q.shape[1], k.shape[1])[0]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with a unit stride on its last dim and equal strides for k and v (a copy when not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _consts(q, k, plan, hpp):
    D = q.shape[2]
    return dict(G=q.shape[1] // k.shape[1], HPP=hpp, D=D, BLOCK_Q=plan.block_q, BLOCK_N=plan.block_n,
                BLOCK_D=block_d_for(D), PREC="ieee" if q.dtype == torch.float32 else "tf32")


def tree_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TreeAttentionPlan,
                       scale: float | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Forward launcher. q: [T, H_q, D]; k, v: [T, H_kv, D] (H_kv divides H_q); one dtype of fp32 /
    fp16 / bf16; last dim contiguous (copied when not; k and v then contiguous); plan from
    `plan_tree_attention` on their device; num_warps / num_stages override the plan's. Returns
    (out [T, H_q, D] contiguous in q's dtype, lse [T, H_q] fp32, natural log)."""
    hpp = _check(q, k, v, plan, "tree_attention")
    num_warps, num_stages = num_warps or plan.num_warps, num_stages or plan.num_stages
    q = _rows(q)
    k, v = k.contiguous(), v.contiguous()
    T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    _fwd_kernel[(cdiv(T, plan.block_q), Hq // hpp)](
        q, k, v, plan.visible_end, plan.q_kv_ptr, plan.q_kv_full, plan.q_kv,
        out, lse,
        T, scale * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), **_consts(q, k, plan, hpp), num_warps=num_warps, num_stages=num_stages)
    return out, lse


def tree_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, plan: TreeAttentionPlan, scale: float | None = None,
                       num_warps: int | None = None, num_stages: int | None = None):
    """Backward launcher: do, out [T, H_q, D] (q's dtype), lse [T, H_q] fp32 from the forward, the rest
    as in `tree_attention_fwd`. Returns (dq, dk, dv), contiguous, in q's dtype."""
    hpp = _check(q, k, v, plan, "tree_attention backward")
    num_warps, num_stages = num_warps or plan.num_warps, num_stages or plan.num_stages
    q, do, out = q.contiguous(), do.contiguous(), out.contiguous()
    k, v = k.contiguous(), v.contiguous()
    assert do.shape == q.shape == out.shape and lse.shape == q.shape[:2] and lse.dtype == torch.float32
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    delta = (do.float() * out.float()).sum(-1)  # [T, H_q] rowsum(dO * O)
    lse = lse.contiguous()
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    consts = _consts(q, k, plan, hpp)
    parts = max(plan.n_parts, 1)
    part_dk = torch.empty(parts, Hkv, plan.block_n, consts["BLOCK_D"], dtype=torch.float32, device=q.device)
    part_dv = torch.empty_like(part_dk)
    args = (T, scale * LOG2E, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0))
    _dq_kernel[(cdiv(T, plan.block_q), Hq // hpp)](
        q, k, v, do, lse, delta, plan.visible_end, plan.q_kv_ptr, plan.q_kv_full, plan.q_kv, dq,
        *args, **consts, num_warps=num_warps, num_stages=num_stages)
    _dkdv_kernel[(plan.item_kb.shape[0], Hkv)](
        q, k, v, do, lse, delta, plan.visible_end, plan.kv_q_ptr, plan.kv_q_full, plan.kv_q,
        plan.item_kb, plan.item_start, plan.item_end, plan.item_part, dk, dv, part_dk, part_dv,
        *args, **consts, num_warps=num_warps, num_stages=num_stages)
    if plan.n_parts:  # key blocks cut into chunks: sum their partials, chunk by chunk in order
        zero = torch.zeros(1, *part_dk.shape[1:], dtype=torch.float32, device=q.device)
        for dst, src in ((dk, part_dk), (dv, part_dv)):
            total = torch.cat([src, zero])[plan.split_parts].sum(1)  # [n_split, H_kv, BLOCK_N, BLOCK_D]
            rows = plan.split_kb.long()[:, None] * plan.block_n + torch.arange(plan.block_n, device=q.device)
            ok = rows < T
            dst[rows[ok]] = total.transpose(1, 2)[..., :D][ok].to(dst.dtype)
    return dq, dk, dv


# ------------------------------------------------------------------------- autograd and API

class _TreeAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out, lse = tree_attention_fwd(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = tree_attention_bwd(dout, q, k, v, out, lse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TreeAttentionPlan,
                   scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `tree_attention_ref`, differentiable in q, k, v (the LSE is not). Tensors as in
    `tree_attention_fwd`; plan = plan_tree_attention(visible_end, tile_for(H_q, H_kv)[1]) once per
    micro-batch. Returns (out [T, H_q, D] in q's dtype, lse [T, H_q] fp32)."""
    return _TreeAttentionFn.apply(q, k, v, plan, scale)

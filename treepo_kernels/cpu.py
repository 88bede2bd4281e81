"""Launchers of the C++ CPU kernels in csrc/ (torch.ops.treepo.*), with the references' contracts.

The extension is `treepo_kernels._C` when setup.py built it, else built just in time on first use
against the installed torch and cached (ext.py); `status()` loads or builds it once and says whether
it is usable and why not. Each launcher's docstring is its contract; the C++ op checks every
shape, dtype and index of it on entry (RuntimeError naming the bad input, raised before anything is
written), so no input can make a kernel read or write outside its tensors. Attention ops
(docs/kernels.md, "C++ kernels"): `append_kv` (paged_kv.py's contract), `tree_decode`
(tree_decode.py's), `paged_extend` (extend.py's `paged_attention_ref`); packed GEMMs
(docs/kernels.md, "CPU GEMMs"): `pack_linear`, `linear_packed`, `gemm_impl`.
"""
from __future__ import annotations

import math

import torch

from . import ext
from .tree_plan import TreePlan


def status() -> tuple[bool, str]:
    """(available, reason): whether the compiled CPU kernels can be used. The first call loads the
    prebuilt extension or builds it just in time (minutes, once per torch; ext.py); later calls are free."""
    st = ext.load()
    if st.ok:
        return True, ""
    if st.kind == "disabled":
        return False, "the C++ extension is disabled by TREEPO_NO_EXT=1"
    return False, f"the C++ extension is not available: {st.why}"


def _need():
    ok, why = status()
    if not ok:
        raise RuntimeError(why)


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """C++ `append_kv_ref`: write token t's K/V into page slot_pages[t] at offset slot_offsets[t].

    k_cache, v_cache: [num_pages, H_kv, page_size, D] contiguous CPU tensors, one dtype (fp32 / bf16 /
    fp16), written in place; k, v: [T, H_kv, D] (cast to the cache dtype); slot_pages, slot_offsets:
    [T] integer tensors (made int64), every slot inside the cache (checked before any write)."""
    _need()
    torch.ops.treepo.append_kv(k_cache, v_cache, k.to(k_cache.dtype), v.to(v_cache.dtype),
                               slot_pages.long().contiguous(), slot_offsets.long().contiguous())


def tree_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: TreePlan,
                scale: float | None = None, fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ `tree_decode_ref`.

    q: [B, H_q, D], row b = leaf b of the plan, in the caches' dtype (fp32, bf16 or fp16);
    k_cache, v_cache: [num_pages, H_kv, page_size, D] contiguous CPU tensors, H_q a multiple of H_kv;
    plan: a TreePlan on the CPU (contiguous int32 arrays; page ids and leaf / slot indices in range);
    scale defaults to 1/sqrt(D). Returns (out [B, H_q, D] in q's dtype, lse [B, H_q] fp32, natural
    log), bit-identical for any thread count.
    fixed: every row's arithmetic is the same whatever its task's row count; with a plan from
    `tree_plan.plan_chunked` a leaf's output then depends on its own query and keys only (batch
    invariance, docs/kernels.md), and equals `paged_extend(..., chunk=plan's chunk)` bit for bit."""
    _need()
    assert q.dim() == 3 and q.shape[0] == plan.num_leaves, f"q {tuple(q.shape)} vs {plan.num_leaves} leaves"
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.treepo.tree_decode(q, k_cache, v_cache, plan.unit_page_ptr, plan.unit_pages, plan.unit_len,
                                        plan.unit_leaf_ptr, plan.unit_leaves, plan.leaf_part_ptr,
                                        plan.leaf_parts, scale, fixed)


def paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 cu_q: torch.Tensor, kv_lens: torch.Tensor, scale: float | None = None, chunk: int = 0):
    """C++ `extend.paged_attention_ref` (decode rows are the case of one new token).

    q: [T, H_q, D] in the caches' dtype (sequence b owns rows cu_q[b]:cu_q[b+1]); k_cache, v_cache:
    [num_pages, H_kv, page_size, D] contiguous CPU tensors already holding the new tokens' K/V;
    block_tables: [B, max_pages] integer (made int32), each row holding at least
    ceil(kv_lens[b] / page_size) valid page ids; cu_q: [B + 1] from 0 to T, kv_lens: [B] with
    kv_lens[b] >= the new tokens of b (both made int64). Returns (out [T, H_q, D] in q's dtype,
    lse [T, H_q] fp32, natural log), bit-identical for any thread count.
    chunk: 0, or a multiple of page_size: keys cut into chunks of that many tokens at fixed positions
    and merged in chunk order, as `tree_decode(..., fixed=True)` on a `plan_chunked` plan does
    (batch invariance: a token's result is the same decoded or recomputed, alone or batched)."""
    _need()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.treepo.paged_extend(q, k_cache, v_cache, block_tables.int().contiguous(),
                                         cu_q.long().contiguous(), kv_lens.long().contiguous(), scale, chunk)


def gemm_impl() -> str:
    """"avx512bf16" (the fast packed GEMM), "portable" (a correct but slow loop: built for a CPU
    without AVX512-BF16) or "" when the extension is not built."""
    return torch.ops.treepo.gemm_impl() if status()[0] else ""


def pack_linear(w: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """A bf16 weight [N, K] (K even) packed for `linear_packed`: [ceil(N/16), K/2, 32] bf16, blocks of
    16 output columns with K in pairs. gated: w = cat([gate, up]) [2I, K], gate and up blocks
    interleaved so that `linear_packed(..., gated=True)` returns silu(x gate^T) * (x up^T)."""
    _need()
    return torch.ops.treepo.pack_linear(w.detach().to(torch.bfloat16), gated)


def linear_packed(x: torch.Tensor, packed: torch.Tensor, n_out: int, gated: bool = False,
                  fp32_out: bool = False, _impl: int = 0) -> torch.Tensor:
    """x [M, K] bf16 times a packed weight: [M, n_out] bf16 (fp32 with fp32_out), fp32 accumulation.
    _impl=1 forces the portable loop (tests)."""
    _need()
    return torch.ops.treepo.linear_packed(x.contiguous(), packed, n_out, gated, fp32_out, _impl)

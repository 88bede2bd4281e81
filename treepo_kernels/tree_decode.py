"""Tree-aware decode: one query token per leaf, shared KV read once per unit, LSE merge.

Plain-PyTorch reference of the two-kernel scheme in KERNELS.md (kernel 1: partial output + LSE of
every (unit, leaf) pair; kernel 2: each leaf merges its partials root first). The Triton and C++
kernels implement exactly this contract and are tested against this file.
"""
import math

import torch

from .tree_plan import TreePlan


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

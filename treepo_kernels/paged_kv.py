"""Append: write the K/V of the step's new tokens of many sequences into their pages.

Layout (docs/kernels.md, "KV layout"): per layer K and V pools [num_pages, H_kv, page_size, D];
token t of a step goes to page slot_pages[t] at offset slot_offsets[t] (any page, any offset: the
engine's page allocator decides). The C++ version of this op is `treepo_kernels.cpu.append_kv`.
"""
from __future__ import annotations

import torch

from .triton_common import tl, triton


def append_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Write token t's K/V into page slot_pages[t] at offset slot_offsets[t], in place.

    k_cache, v_cache: [num_pages, H_kv, page_size, D]; k, v: [T, H_kv, D] in the cache's dtype;
    slot_pages, slot_offsets: [T] integer tensors (offsets < page_size).
    """
    assert k_cache.dim() == 4 and k.dim() == 3 and k.shape[1:] == (k_cache.shape[1], k_cache.shape[3]), \
        f"k {tuple(k.shape)} does not match cache {tuple(k_cache.shape)}"
    assert slot_pages.shape == slot_offsets.shape == (k.shape[0],)
    # advanced indices on dims 0 and 2 -> the indexed view has shape [T, H_kv, D]
    k_cache[slot_pages, :, slot_offsets] = k.to(k_cache.dtype)
    v_cache[slot_pages, :, slot_offsets] = v.to(v_cache.dtype)


# ------------------------------------------------------------------------------------ Triton

@triton.jit
def _append_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, pages_ptr, offsets_ptr,
                   stride_k_tok, stride_k_head, stride_cache_page, stride_cache_head, stride_cache_tok,
                   D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (token, KV head): copies its D values of K and of V."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    page = tl.load(pages_ptr + t).to(tl.int64)
    off = tl.load(offsets_ptr + t).to(tl.int64)
    src = t.to(tl.int64) * stride_k_tok + h * stride_k_head + d
    dst = page * stride_cache_page + h * stride_cache_head + off * stride_cache_tok + d
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src, mask=dm), mask=dm)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=dm), mask=dm)


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Triton `append_kv_ref`: write token t's K/V into page slot_pages[t] at offset slot_offsets[t].

    k_cache, v_cache: [num_pages, H_kv, page_size, D], contiguous, same dtype (written in place);
    k, v: [T, H_kv, D], any float dtype (cast to the cache's); slot_pages, slot_offsets: [T] int32
    or int64 on the caches' device. Slots are not bounds-checked here (the engine's allocator
    hands them out; the C++ op checks them)."""
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.is_contiguous() and v_cache.is_contiguous()
    T, Hkv, D = k.shape
    assert (Hkv, D) == (k_cache.shape[1], k_cache.shape[3]) and v.shape == k.shape, \
        f"k {tuple(k.shape)} does not match cache {tuple(k_cache.shape)}"
    assert slot_pages.shape == slot_offsets.shape == (T,), \
        f"slot_pages {tuple(slot_pages.shape)} / slot_offsets {tuple(slot_offsets.shape)} must be [{T}]"
    assert not slot_pages.is_floating_point() and not slot_offsets.is_floating_point(), "slots must be integers"
    if T == 0:
        return
    k = k.to(k_cache.dtype).contiguous()
    v = v.to(v_cache.dtype).contiguous()
    _append_kernel[(T, Hkv)](
        k, v, k_cache, v_cache, slot_pages.contiguous(), slot_offsets.contiguous(),
        k.stride(0), k.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        D=D, BLOCK_D=triton.next_power_of_2(D))

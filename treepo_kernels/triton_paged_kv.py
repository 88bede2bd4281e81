"""Triton: append the K/V of new tokens into their pages (contract of `append_kv_ref`)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pages_ptr, offs_ptr,
                   s_kt, s_kh, s_cp, s_ch, s_ct, D: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    page = tl.load(pages_ptr + t).to(tl.int64)
    off = tl.load(offs_ptr + t).to(tl.int64)
    src = t.to(tl.int64) * s_kt + h * s_kh + d
    dst = page * s_cp + h * s_ch + off * s_ct + d
    tl.store(kc_ptr + dst, tl.load(k_ptr + src, mask=dm), mask=dm)
    tl.store(vc_ptr + dst, tl.load(v_ptr + src, mask=dm), mask=dm)


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Write token t's K/V into page slot_pages[t] at offset slot_offsets[t], in place.

    k_cache, v_cache: [num_pages, H_kv, page_size, D], contiguous, same dtype; k, v: [T, H_kv, D]
    (cast to the cache dtype); slot_pages, slot_offsets: [T] integer tensors on the same device.
    """
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
    _append_kernel[(T, Hkv)](k, v, k_cache, v_cache, slot_pages.contiguous(), slot_offsets.contiguous(),
                             k.stride(0), k.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                             D=D, BLOCK_D=triton.next_power_of_2(D))

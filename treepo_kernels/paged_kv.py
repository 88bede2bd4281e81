"""Append the K/V of new tokens of many sequences into their pages (plain-PyTorch reference)."""
import torch


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

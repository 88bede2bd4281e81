"""Append (treepo_kernels/paged_kv.py): write a step's new K/V into their page slots, one layer.

Providers: treepo_cpp (`cpu.append_kv`), triton (`paged_kv.append_kv`), torch (`append_kv_ref`,
one index_put per pool). Shapes: a decode step (one token per sequence, each in its own page at a
random offset) and a prefill (the tokens fill shuffled pages in order). GB/s counts K and V read
once and written once. Each provider's caches must equal the reference's bit for bit.
"""
import pytest
import torch
from suite import need_cpp, need_triton

PROVIDERS = ["treepo_cpp", "triton", "torch"]
# (id, (kind, tokens, H_kv, head_dim, page_size, pool pages))
SHAPES = {
    "tiny": [("decode_37", ("decode", 37, 3, 32, 8, 64))],
    "cpu": [("decode_128", ("decode", 128, 3, 64, 16, 4096)),
            ("prefill_4096", ("prefill", 4096, 3, 64, 16, 4096))],
    "gpu": [("decode_256", ("decode", 256, 8, 128, 16, 32768)),
            ("prefill_16384", ("prefill", 16384, 8, 128, 16, 32768))],
}


@pytest.fixture(scope="module")
def case(shape, device, kernel_dtype):
    """Caches, new K/V and slots of one shape, and the caches as `append_kv_ref` leaves them."""
    kind, T, Hkv, D, P, pages = shape[1]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(pages, generator=g)
    if kind == "decode":  # token t in page perm[t], at a random offset
        slot_pages, slot_offsets = perm[:T], torch.randint(0, P, (T,), generator=g)
    else:  # consecutive tokens fill shuffled pages
        t = torch.arange(T)
        slot_pages, slot_offsets = perm[t // P], t % P
    dtype = kernel_dtype
    k_cache = torch.randn(pages, Hkv, P, D, generator=g).to(dtype)  # [pages, H_kv, P, D]
    v_cache = torch.randn(pages, Hkv, P, D, generator=g).to(dtype)
    k = torch.randn(T, Hkv, D, generator=g).to(dtype)  # [T, H_kv, D]
    v = torch.randn(T, Hkv, D, generator=g).to(dtype)
    args = [x.to(device) for x in (k_cache, v_cache, k, v, slot_pages, slot_offsets)]
    ref_k, ref_v = args[0].clone(), args[1].clone()
    from treepo_kernels.paged_kv import append_kv_ref

    append_kv_ref(ref_k, ref_v, *args[2:])
    return args, ref_k, ref_v, 4 * T * Hkv * D * k.element_size()


def test_append(case, provider, shape, device, shape_set, timed):
    args, ref_k, ref_v, nbytes = case
    if provider == "treepo_cpp":
        need_cpp(device)
        from treepo_kernels.cpu import append_kv
    elif provider == "triton":
        timed.extra_info["interpreted"] = need_triton(device, shape_set)
        from treepo_kernels.paged_kv import append_kv
    else:
        from treepo_kernels.paged_kv import append_kv_ref as append_kv
    k_cache, v_cache = args[0].clone(), args[1].clone()  # this provider's own pool
    run_args = (k_cache, v_cache, *args[2:])
    append_kv(*run_args)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), f"{provider}: caches differ from append_kv_ref"
    s = timed(lambda: append_kv(*run_args), f"append:{shape[0]}", tokens=int(args[2].shape[0]), bytes=nbytes)
    if s:
        timed.extra_info["GBps"] = nbytes / s / 1e9

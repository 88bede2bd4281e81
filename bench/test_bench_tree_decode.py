"""Tree decode (treepo_kernels/tree_decode.py): one query token per leaf over a paged tree, one layer.

Providers: our kernels with the tree planner (`*_tree`: a shared page read once for all leaves
below it) and as plain paged decode (`*_plain`: the same kernels, one unit per leaf) in C++
(`cpu.tree_decode`) and Triton; the engine's torch backend (batched plain PyTorch, the step's
K/V append included, as the engine calls it); torch SDPA on per-leaf materialised KV (padded,
masked); flash-attn's `flash_attn_with_kvcache` on the same materialised KV and FlashInfer's batch
decode on our paged pool (bench_kernels.py's wrapper), when installed. The planner runs once per
step for all layers, outside the timed part (`plan_ms` in extra_info). Our kernels, flash-attn and
FlashInfer run in bf16 (fp16 under the Triton interpreter); torch and SDPA in `suite.torch_dtype`
(fp32 on a CPU without native bf16, on a copy of the pool; extra_info["dtype"]).

Shapes are built by the scripts' builder (`bench_kernels.build`): tiny = its smoke shape, gpu =
its SHAPES, cpu = bench_cpu_kernels.py's cases (SmolLM2 heads 9 / 3 / 64, bf16, pages of 16).
extra_info: leaves, path / unique KV tokens, `sol` = path / unique (the most a tree can gain over
plain decode), `unique_GBps` (unique K/V bytes over the time: the effective bandwidth) and `TFLOPs`
(4 D H_q path_tokens). Reference: `paged_attention_ref` in fp32 (per leaf, no planner).
"""
import time

import pytest
import torch
from bench_kernels import SHAPES as GPU_SHAPES
from bench_kernels import SMOKE, build
from suite import check, need_cpp, need_module, need_triton, slug, torch_dtype

PROVIDERS = ["treepo_cpp_tree", "treepo_cpp_plain", "triton_tree", "triton_plain", "torch", "sdpa",
             "flash_attn", "flashinfer"]
# (id, (name, (H_q, H_kv, d), leaves, shared prefix, own suffix, levels, prompts)): bench_kernels'
# format, plus `prompts` independent trees in one batch
SHAPES = {
    "tiny": [(slug(s[0]), (*s, 1)) for s in SMOKE],
    "cpu": [("tree", ("64 x (512 shared + 256 own)", (9, 3, 64), 64, 512, 256, 1, 1)),
            ("plain", ("64 x 768 own, nothing shared", (9, 3, 64), 64, 0, 768, 1, 1)),
            ("rl", ("8 prompts x 16 leaves: 60 + 4 levels of 64", (9, 3, 64), 16, 60, 256, 4, 8))],
    "gpu": [(slug(s[0]), (*s, 1)) for s in GPU_SHAPES],
}
PAGE = 16
MATERIALISED_MAX_BYTES = 8 * 2**30  # sdpa / flash_attn: per-leaf K and V copies larger than this are skipped


@pytest.fixture(scope="module")
def case(shape, device, kernel_dtype):
    """The pool, the leaves' tables, queries, both plans and the fp32 reference of one shape."""
    from treepo.engine.kv_cache import PagedKVCache
    from treepo_kernels.extend import paged_attention_ref
    from treepo_kernels.tree_plan import plan_tree

    name, (Hq, Hkv, D), leaves, prefix, suffix, levels, prompts = shape[1]
    dtype = kernel_dtype
    total = prompts * (prefix + leaves * suffix + 2 * leaves * PAGE)
    kv = PagedKVCache(1, Hkv, D, num_pages=total // PAGE + 64, page_size=PAGE, dtype=dtype, device=device)
    tables, lens = [], []
    for _ in range(prompts):
        t, n = build(kv, leaves, prefix, suffix, levels)
        tables += t
        lens += n
    kv.k.normal_()
    kv.v.normal_()
    B = len(lens)
    q = torch.randn(B, Hq, D, dtype=dtype, device=device)  # [B, H_q, D]: one token per leaf
    t0 = time.perf_counter()
    tree = plan_tree(tables, lens, PAGE, max_unit_pages=64)
    plan_ms = (time.perf_counter() - t0) * 1e3
    plain = plan_tree(tables, lens, PAGE, min_fanout=10**9, max_unit_pages=64)
    max_pages = max(len(t) for t in tables)
    bt = torch.tensor([t + [t[0]] * (max_pages - len(t)) for t in tables], dtype=torch.int32, device=device)
    cu = torch.arange(B + 1, device=device)
    kv_lens = torch.tensor(lens, device=device)
    ref = paged_attention_ref(q.float(), kv.k[0].float(), kv.v[0].float(), bt, cu, kv_lens)[0]
    info = dict(leaves=B, path_tokens=tree.path_tokens, unique_tokens=tree.unique_tokens,
                sol=tree.path_tokens / tree.unique_tokens, plan_ms=plan_ms)
    c = dict(kv=kv, tables=tables, lens=lens, q=q, tree=tree, plain=plain, ref=ref, info=info,
             flops=4 * D * Hq * tree.path_tokens, unique_bytes=2 * Hkv * D * q.element_size() * tree.unique_tokens)
    yield c
    c.clear()  # free this shape's tensors before the next shape's are built
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _pool_as(kv, dtype):
    """kv itself, or a one-layer pool of the same pages converted to dtype."""
    from treepo.engine.kv_cache import PagedKVCache

    if dtype == kv.k.dtype:
        return kv
    out = PagedKVCache(1, kv.num_kv_heads, kv.head_dim, kv.num_pages, kv.page_size, dtype=dtype, device=kv.k.device)
    out.k.copy_(kv.k)
    out.v.copy_(kv.v)
    return out


def _materialised(c, device, dtype):
    """Per-leaf dense copies: k, v [B, H_kv, L_max, D] in dtype (zero padded), mask [B, 1, 1, L_max]."""
    from treepo_kernels.extend import gather_kv

    kv, lens = c["kv"], c["lens"]
    B, Lmax = len(lens), max(c["lens"])
    if 2 * B * Lmax * kv.num_kv_heads * kv.head_dim * dtype.itemsize > MATERIALISED_MAX_BYTES:
        pytest.skip(f"per-leaf KV copies of {B} x {Lmax} tokens exceed {MATERIALISED_MAX_BYTES >> 30} GiB")
    kk = torch.zeros(B, kv.num_kv_heads, Lmax, kv.head_dim, dtype=dtype, device=device)
    vv = torch.zeros_like(kk)
    mask = torch.zeros(B, 1, 1, Lmax, dtype=torch.bool, device=device)
    for b, (t, L) in enumerate(zip(c["tables"], lens)):
        tt = torch.tensor(t, device=device)
        kk[b, :, :L] = gather_kv(kv.k[0], tt, L)
        vv[b, :, :L] = gather_kv(kv.v[0], tt, L)
        mask[b, ..., :L] = True
    return kk, vv, mask


def _provider(provider, c, device, shape_set, extra):
    """fn() -> out [B, H_q, D] for one provider (skips when it cannot run here)."""
    kv, q = c["kv"], c["q"]
    kc, vc = kv.k[0], kv.v[0]
    B, Hq, D = q.shape
    if provider.startswith("treepo_cpp"):
        need_cpp(device)
        from treepo_kernels import cpu

        plan = c["tree"] if provider.endswith("tree") else c["plain"]
        return lambda: cpu.tree_decode(q, kc, vc, plan)[0]
    if provider.startswith("triton"):
        extra["interpreted"] = need_triton(device, shape_set)
        from treepo_kernels.tree_decode import tile_for, tree_decode, work_items

        plan = (c["tree"] if provider.endswith("tree") else c["plain"]).to(device)
        items = work_items(plan, tile_for(plan, Hq // kv.num_kv_heads)[1], device)
        return lambda: tree_decode(q, kc, vc, plan, items=items)[0]
    if provider == "torch":
        from treepo.engine.attention import AttentionMetadata, TorchBackend

        extra["dtype"] = str(torch_dtype(device))
        pool = _pool_as(kv, torch_dtype(device))
        qt = q.to(pool.k.dtype)
        backend = TorchBackend()
        meta = AttentionMetadata.build(kv, c["tables"], [1] * B, c["lens"], device)
        plan = backend.plan(meta, pool, Hq)
        # the backend appends the step's K/V first: hand it the last token's own values
        last_k = pool.k[0][meta.slot_pages, :, meta.slot_offsets].clone()
        last_v = pool.v[0][meta.slot_pages, :, meta.slot_offsets].clone()
        return lambda: backend.forward(0, qt, last_k, last_v, meta, pool, plan)
    if provider == "sdpa":
        extra["dtype"] = str(torch_dtype(device))
        kk, vv, mask = _materialised(c, device, torch_dtype(device))
        qs = q.view(B, Hq, 1, D).to(kk.dtype)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda: sdpa(qs, kk, vv, attn_mask=mask, enable_gqa=True).view(B, Hq, D)
    if provider == "flash_attn":
        fa = need_module("flash_attn", device)
        kk, vv, _ = _materialised(c, device, q.dtype)
        kf, vf = kk.transpose(1, 2).contiguous(), vv.transpose(1, 2).contiguous()  # [B, L_max, H_kv, D]
        del kk, vv
        seqlens = torch.tensor(c["lens"], dtype=torch.int32, device=device)
        return lambda: fa.flash_attn_with_kvcache(q.view(B, 1, Hq, D), kf, vf, cache_seqlens=seqlens).view(B, Hq, D)
    assert provider == "flashinfer", provider
    flashinfer = need_module("flashinfer", device)
    from bench_kernels import _flashinfer_decode

    return _flashinfer_decode(flashinfer, q, kv, c["tables"], c["lens"])


def test_tree_decode(case, provider, shape, device, shape_set, timed):
    fn = _provider(provider, case, device, shape_set, timed.extra_info)
    out = fn()
    err = check(provider, out, case["ref"], out.dtype)
    s = timed(fn, f"tree_decode:{shape[0]}", **case["info"], rel_err=err)
    if s:
        timed.extra_info["unique_GBps"] = case["unique_bytes"] / s / 1e9
        timed.extra_info["TFLOPs"] = case["flops"] / s / 1e12

"""Extend (treepo_kernels/extend.py): many sequences' new tokens over their paged context, one layer.

Providers: our paged extend in C++ (`cpu.paged_extend`) and Triton (`extend.paged_extend`), the
Triton tree extend (`extend.tree_extend`: a shared context read once through the tree-decode
kernels, the new tokens causal among themselves, merged by LSE; plan outside the timed part); the
engine's torch backend (SDPA over gathered pages, the step's K/V append included); SDPA on
per-sequence materialised KV with a bottom-right causal mask; flash-attn's
`flash_attn_with_kvcache` (causal) on the same materialised KV when installed. Ours and flash-attn
run in bf16 (fp16 under the Triton interpreter), torch and SDPA in `suite.torch_dtype` (fp32 on a
CPU without native bf16).

Shapes: `seqs` sequences of `new` tokens each on top of a `shared`-token context they all hold
(bench_cpu_kernels.grow: the prompt forked into the sequences). shared = 0 is a prefill
(bench_cpu_kernels.py's extend case on the CPU); shared > 0 are the segments of one tree level.
Every sequence has the same lengths, so the materialised baselines need no ragged padding.
extra_info: tokens, unique / path KV tokens, TFLOP/s (4 D H_q x visible (query, key) pairs).
Reference: `paged_attention_ref` in fp32.
"""
import pytest
import torch
from bench_cpu_kernels import grow
from suite import check, need_cpp, need_module, need_triton, slug, torch_dtype

PROVIDERS = ["treepo_cpp", "triton", "triton_tree", "torch", "sdpa", "flash_attn"]
PAGE = 16


def _shapes(*specs):
    return [(slug(s[0].split(":")[0]), s) for s in specs]


# (id, (name, (H_q, H_kv, d), seqs, shared context, new tokens per sequence))
SHAPES = {
    "tiny": _shapes(("tiny: 4 x 16 new over 32 shared", (4, 2, 32), 4, 32, 16)),
    "cpu": _shapes(("prefill: 8 x 512", (9, 3, 64), 8, 0, 512),
                   ("segments: 16 x 64 new over 512 shared", (9, 3, 64), 16, 512, 64)),
    "gpu": _shapes(("prefill: 16 x 2048", (32, 8, 128), 16, 0, 2048),
                   ("long prefill: 1 x 16384", (32, 8, 128), 1, 0, 16384),
                   ("segments: 64 x 256 new over 4096 shared", (32, 8, 128), 64, 4096, 256)),
}


@pytest.fixture(scope="module")
def case(shape, device, kernel_dtype):
    """The pool, step metadata, queries and fp32 reference of one shape."""
    from treepo.engine.attention import AttentionMetadata
    from treepo.engine.kv_cache import PagedKVCache
    from treepo_kernels.extend import paged_attention_ref

    name, (Hq, Hkv, D), seqs, shared, new = shape[1]
    kv = PagedKVCache(1, Hkv, D, num_pages=(shared + seqs * (new + PAGE)) // PAGE + 8, page_size=PAGE,
                      dtype=kernel_dtype, device=device)
    tables, lens = grow(kv, (shared, [(seqs, new)]))
    kv.k.normal_()
    kv.v.normal_()
    meta = AttentionMetadata.build(kv, tables, [new] * seqs, lens, device)
    T = seqs * new
    q = torch.randn(T, Hq, D, dtype=kernel_dtype, device=device)  # [T, H_q, D], sequence b owns cu_q[b]:cu_q[b+1]
    kv_lens = torch.tensor(lens, device=device)
    ref = paged_attention_ref(q.float(), kv.k[0].float(), kv.v[0].float(), meta.block_tables, meta.cu_q, kv_lens)[0]
    pairs = seqs * (new * shared + new * (new + 1) // 2)  # visible (query, key) pairs
    info = dict(seqs=seqs, tokens=T, unique_tokens=shared + T, path_tokens=sum(lens))
    c = dict(kv=kv, meta=meta, tables=tables, lens=lens, q=q, kv_lens=kv_lens, ref=ref, info=info,
             flops=4 * D * Hq * pairs, new=new)
    yield c
    c.clear()  # free this shape's tensors before the next shape's are built
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dense(c, device, dtype):
    """Per-sequence copies k, v [B, H_kv, L, D] in dtype (every sequence holds L tokens)."""
    from treepo_kernels.extend import gather_kv

    kv = c["kv"]
    bt = c["meta"].block_tables
    L = c["lens"][0]
    k = torch.stack([gather_kv(kv.k[0], bt[b], L) for b in range(bt.shape[0])]).to(dtype)
    v = torch.stack([gather_kv(kv.v[0], bt[b], L) for b in range(bt.shape[0])]).to(dtype)
    return k, v


def _provider(provider, c, device, shape_set, extra):
    """fn() -> out [T, H_q, D] for one provider (skips when it cannot run here)."""
    kv, q, meta = c["kv"], c["q"], c["meta"]
    kc, vc = kv.k[0], kv.v[0]
    T, Hq, D = q.shape
    B, n, L = len(c["lens"]), c["new"], c["lens"][0]
    g = Hq // kv.num_kv_heads
    if provider == "treepo_cpp":
        need_cpp(device)
        from treepo_kernels import cpu

        return lambda: cpu.paged_extend(q, kc, vc, meta.block_tables, meta.cu_q, c["kv_lens"])[0]
    if provider == "triton":
        extra["interpreted"] = need_triton(device, shape_set)
        from treepo_kernels.extend import block_q_for, extend_items, paged_extend

        items = extend_items([n] * B, block_q_for(g), device)
        return lambda: paged_extend(q, kc, vc, meta.block_tables, meta.cu_q, c["kv_lens"], items=items)[0]
    if provider == "triton_tree":
        extra["interpreted"] = need_triton(device, shape_set)
        from treepo_kernels.extend import plan_extend, tree_extend

        plan = plan_extend(c["tables"], c["lens"], [n] * B, PAGE, g, device)
        return lambda: tree_extend(q, kc, vc, plan)[0]
    dt = torch_dtype(device)
    if provider == "torch":
        from treepo.engine.attention import TorchBackend

        extra["dtype"] = str(dt)
        pool = kv
        if dt != kv.k.dtype:  # a converted copy of the pool
            from treepo.engine.kv_cache import PagedKVCache

            pool = PagedKVCache(1, kv.num_kv_heads, kv.head_dim, kv.num_pages, PAGE, dtype=dt, device=device)
            pool.k.copy_(kv.k)
            pool.v.copy_(kv.v)
        qt = q.to(dt)
        backend = TorchBackend()
        plan = backend.plan(meta, pool, Hq)
        # the backend appends the step's K/V first: hand it the new tokens' own values
        k_new = pool.k[0][meta.slot_pages, :, meta.slot_offsets].clone()
        v_new = pool.v[0][meta.slot_pages, :, meta.slot_offsets].clone()
        return lambda: backend.forward(0, qt, k_new, v_new, meta, pool, plan)
    if provider == "sdpa":
        extra["dtype"] = str(dt)
        k, v = _dense(c, device, dt)
        qs = q.to(dt).view(B, n, Hq, D).transpose(1, 2)  # [B, H_q, n, D]
        i = torch.arange(n, device=device)
        mask = torch.arange(L, device=device)[None] <= (L - n + i)[:, None]  # [n, L] bottom-right causal
        mask = None if L == n else mask  # a prefill: is_causal (SDPA's flash path on CUDA)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def fn():
            o = sdpa(qs, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            return o.transpose(1, 2).reshape(T, Hq, D)
        return fn
    assert provider == "flash_attn", provider
    fa = need_module("flash_attn", device)
    k, v = (x.transpose(1, 2).contiguous() for x in _dense(c, device, q.dtype))  # [B, L, H_kv, D]
    seqlens = torch.full((B,), L, dtype=torch.int32, device=device)
    qf = q.view(B, n, Hq, D)
    return lambda: fa.flash_attn_with_kvcache(qf, k, v, cache_seqlens=seqlens, causal=True).reshape(T, Hq, D)


def test_extend(case, provider, shape, device, shape_set, timed):
    fn = _provider(provider, case, device, shape_set, timed.extra_info)
    out = fn()
    err = check(provider, out, case["ref"], out.dtype)
    s = timed(fn, f"extend:{shape[0]}", **case["info"], rel_err=err)
    if s:
        timed.extra_info["TFLOPs"] = case["flops"] / s / 1e12

"""Triton tree-attention kernels on a GPU: tree decode vs plain paged decode vs baselines.

For each shape (docs/kernels.md, "Benchmarks"): latency (median of triton.testing.do_bench, cold L2), effective GB/s
on the unique KV bytes and % of the measured device copy bandwidth, TFLOP/s, and the
speed-of-light ratio sum(p_j) / sum(l_n) (the most tree decode can gain over plain decode).
Baselines in the same run: our plain paged decode (same kernels, one unit per leaf), torch SDPA
on per-leaf materialised KV, and flash-attn's `flash_attn_with_kvcache` / FlashInfer's batch
decode on the same paged pool when importable (reported as not installed otherwise). The host
planner's time is reported separately (it runs once per step for all layers); `tree_bn32_ms` and
`tree_bn64w8_ms` time kernel 1 with 32-token KV tiles / 64-token tiles on 8 warps (default: 16
tokens, 4 warps), first tuning points. Usage:

    python bench/bench_kernels.py [--out DIR] [--quick]
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke     # CPU: a tiny run that checks the script
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table  # noqa: E402

# (name, (H_q, H_kv, d), leaves, shared prefix, own suffix, levels): levels > 1 splits the suffix into
# a 2-ary subtree of that many levels below the prefix (a TreePO-like tree)
SHAPES = [
    ("target: 64 x (2048 shared + 1024 own)", (32, 8, 128), 64, 2048, 1024, 1),
    ("nothing shared: 64 x 3072 own", (32, 8, 128), 64, 0, 3072, 1),
    ("long context: 1 x 32768", (32, 8, 128), 1, 0, 32768, 1),
    ("8 x (32768 shared + 256 own)", (32, 8, 128), 8, 32768, 256, 1),
    ("256 x (1024 shared + 128 own)", (28, 4, 128), 256, 1024, 128, 1),
    ("MHA 32 x (8192 shared + 512 own)", (32, 32, 128), 32, 8192, 512, 1),
    ("SmolLM2 128 leaves, 4-level tree", (9, 3, 64), 128, 512, 512, 4),
    ("GQA4 16 x (4096 shared + 8192 own)", (32, 8, 128), 16, 4096, 8192, 1),
]
SMOKE = [("smoke: 4 x (32 shared + 16 own)", (4, 2, 32), 4, 32, 16, 1)]


def build(kv, leaves, prefix, suffix, levels):
    root = []
    kv.grow(root, max(prefix, 0))
    rows = [(root, prefix)]
    per = suffix // levels
    fan = round(leaves ** (1 / levels)) if levels > 1 else leaves
    for lvl in range(levels):
        new = []
        n_kids = fan if lvl < levels - 1 else max(1, leaves // max(len(rows), 1))
        for table, L in rows:
            kids = kv.fork(table, L, n_kids - 1) + [table] if L > 0 else [table] + [[] for _ in range(n_kids - 1)]
            for t in kids:
                kv.grow(t, L + per)
                new.append((t, L + per))
        rows = new
    return [t for t, _ in rows], [L for _, L in rows]


def copy_bandwidth(device):
    x = torch.empty(512 * 2**20 // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    import triton.testing

    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / ms / 1e6  # GB/s, read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for results.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    ap.add_argument("--quick", action="store_true", help="first three shapes only")
    args = ap.parse_args()
    import triton.testing

    from treepo.engine.kv_cache import PagedKVCache
    from treepo_kernels.tree_decode import tile_for, tree_decode, work_items
    from treepo_kernels.tree_plan import plan_tree

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda and not args.smoke:
        sys.exit("bench_kernels needs CUDA (use --smoke with TRITON_INTERPRET=1 to check the script on a CPU)")
    dtype = torch.bfloat16 if cuda else torch.float32
    bench = (lambda f: triton.testing.do_bench(f, return_mode="median")) if cuda else _cpu_time
    bw = copy_bandwidth(device) if cuda else float("nan")
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    try:
        import flashinfer
    except ImportError:
        flashinfer = None
    shapes = SMOKE if args.smoke else SHAPES[:3] if args.quick else SHAPES
    rows = []
    for name, (Hq, Hkv, D), leaves, prefix, suffix, levels in shapes:
        P = 16
        total = prefix + leaves * suffix + 2 * leaves * P
        kv = PagedKVCache(1, Hkv, D, num_pages=total // P + 64, page_size=P, dtype=dtype, device=device)
        tables, lens = build(kv, leaves, prefix, suffix, levels)
        kv.k.normal_()
        kv.v.normal_()
        B = len(lens)
        q = torch.randn(B, Hq, D, dtype=dtype, device=device)
        t0 = time.perf_counter()
        tree = plan_tree(tables, lens, P, device=device, max_unit_pages=64)
        items = work_items(tree, tile_for(tree, Hq // Hkv)[1], device)
        plan_ms = (time.perf_counter() - t0) * 1e3
        plain = plan_tree(tables, lens, P, min_fanout=10**9, device=device, max_unit_pages=64)
        plain_items = work_items(plain, tile_for(plain, Hq // Hkv)[1], device)
        r = {"shape": name, "leaves": B, "sol": tree.path_tokens / tree.unique_tokens}
        out_tree = tree_decode(q, kv.k[0], kv.v[0], tree, items=items)[0]
        out_plain = tree_decode(q, kv.k[0], kv.v[0], plain, items=plain_items)[0]
        r["max_diff_tree_plain"] = (out_tree.float() - out_plain.float()).abs().max().item()  # a sanity check
        r["tree_ms"] = bench(lambda: tree_decode(q, kv.k[0], kv.v[0], tree, items=items))
        r["plain_ms"] = bench(lambda: tree_decode(q, kv.k[0], kv.v[0], plain, items=plain_items))
        # first tuning points for kernel 1 (default: 16-token KV tiles, 4 warps)
        r["tree_bn32_ms"] = bench(lambda: tree_decode(q, kv.k[0], kv.v[0], tree, items=items, block_n=32))
        r["tree_bn64w8_ms"] = bench(lambda: tree_decode(q, kv.k[0], kv.v[0], tree, items=items, block_n=64,
                                                        num_warps=8))
        if cuda and flashinfer is not None:  # plain paged decode on the same pool (HND = our layout)
            try:
                r["flashinfer_ms"] = bench(_flashinfer_decode(flashinfer, q, kv, tables, lens))
            except Exception as e:  # API differences between versions: report, do not stop
                r["flashinfer_ms"] = f"error: {type(e).__name__}: {e}"[:120]
        unique_bytes = 2 * Hkv * D * q.element_size() * tree.unique_tokens
        r["tree_GBps"] = unique_bytes / r["tree_ms"] / 1e6
        r["pct_copy_bw"] = 100 * r["tree_GBps"] / bw
        r["tree_TFLOPs"] = 4 * D * Hq * tree.path_tokens / r["tree_ms"] / 1e9
        r["tree_vs_plain"] = r["plain_ms"] / r["tree_ms"]
        r["plan_ms"] = plan_ms
        if cuda and sum(lens) * Hkv * D * 2 * 2 < 8 * 2**30:  # SDPA on materialised per-leaf KV
            from treepo_kernels.extend import gather_kv

            Lmax = max(lens)
            kk = torch.zeros(B, Hkv, Lmax, D, dtype=dtype, device=device)
            vv = torch.zeros_like(kk)
            mask = torch.zeros(B, 1, 1, Lmax, dtype=torch.bool, device=device)
            for b, (t, L) in enumerate(zip(tables, lens)):
                tt = torch.tensor(t, device=device)
                kk[b, :, :L] = gather_kv(kv.k[0], tt, L)
                vv[b, :, :L] = gather_kv(kv.v[0], tt, L)
                mask[b, ..., :L] = True
            qs = q.view(B, Hq, 1, D)
            r["sdpa_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                qs, kk, vv, attn_mask=mask, enable_gqa=True))
            if flash_attn_with_kvcache is not None:
                kf, vf = kk.transpose(1, 2).contiguous(), vv.transpose(1, 2).contiguous()
                seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
                r["flash_attn_ms"] = bench(lambda: flash_attn_with_kvcache(q.view(B, 1, Hq, D), kf, vf,
                                                                           cache_seqlens=seqlens))
            del kk, vv
        rows.append(r)
        kv = None  # free the pool before the next shape
        if cuda:
            torch.cuda.empty_cache()
    print(f"tree decode, one layer, {dtype}, page 16; copy bandwidth {bw:.0f} GB/s; flash-attn "
          f"{'available' if flash_attn_with_kvcache else 'not installed'}; FlashInfer "
          f"{'available' if flashinfer else 'not installed'}")
    print_table(rows, ["shape", "leaves", "sol", "tree_ms", "plain_ms", "tree_vs_plain", "tree_GBps", "pct_copy_bw",
                       "tree_TFLOPs", "tree_bn32_ms", "tree_bn64w8_ms", "sdpa_ms", "flash_attn_ms", "flashinfer_ms",
                       "plan_ms"])
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]  # NaN: no JSON
    result = {"bench": "kernels", "machine": machine(), "copy_GBps": bw if cuda else None,
              "flash_attn": flash_attn_with_kvcache is not None, "flashinfer": flashinfer is not None, "rows": rows}
    print(json.dumps(result))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump(result, f, indent=1)


def _flashinfer_decode(flashinfer, q, kv, tables, lens):
    """FlashInfer's batch decode over our pool: indptr / indices / last_page_len CSR, HND layout."""
    from treepo_kernels.common import cdiv

    P = kv.page_size
    dev = q.device
    n_pages = [cdiv(L, P) for L in lens]
    indptr = torch.tensor([0] + n_pages, device=dev).cumsum(0).int()
    indices = torch.tensor([p for t, n in zip(tables, n_pages) for p in t[:n]], dtype=torch.int32, device=dev)
    last = torch.tensor([L - (n - 1) * P for L, n in zip(lens, n_pages)], dtype=torch.int32, device=dev)
    B, Hq, D = q.shape
    Hkv = kv.num_kv_heads
    ws = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "HND", use_tensor_cores=Hq // Hkv >= 4)
    if hasattr(w, "plan"):
        w.plan(indptr, indices, last, Hq, Hkv, D, P, q_data_type=q.dtype, kv_data_type=kv.k.dtype)
        return lambda: w.run(q, (kv.k[0], kv.v[0]))
    w.begin_forward(indptr, indices, last, Hq, Hkv, D, P, data_type=kv.k.dtype)  # flashinfer < 0.2
    return lambda: w.forward(q, (kv.k[0], kv.v[0]))


def _cpu_time(f, n=3):
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


if __name__ == "__main__":
    main()

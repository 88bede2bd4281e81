"""C++ CPU kernels (attention_backend="cpu") vs the torch backend, one attention layer, CPU.

Cases (decode: one query per leaf; bf16 KV pages of 16 tokens):
- tree: 64 leaves share a 512-token prefix, each with its own 256-token suffix (issue #6's case);
- plain: 64 leaves with nothing shared (768 own tokens each);
- rl: 128 leaves of a TreePO level (60-token prompt, 3 levels of 64-token shared segments, own 64);
- extend: 8 sequences prefilling 512 tokens each.
For each: median latency of the cpu kernel with the tree planner (tree-aware), the cpu kernel
with one unit per leaf (plain paged decode), and the engine's torch backend; achieved GFLOP/s
and the planner's time (once per step for all layers). Usage:

    python bench/bench_cpu_kernels.py [--threads 2] [--heads 9,3,64] [--repeat 30]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import median_ms, print_table, result_line  # noqa: E402


def grow(kv, shape):
    """Leaves of a tree: shape = list of (fan-out, tokens) per level below a root of tokens[0]."""
    root_len, levels = shape
    root = []
    kv.grow(root, root_len)
    rows = [(root, root_len)]
    for fan, n in levels:
        new = []
        for table, L in rows:
            for t in kv.fork(table, L, fan - 1) + [table]:
                kv.grow(t, L + n)
                new.append((t, L + n))
        rows = new
    return [t for t, _ in rows], [L for _, L in rows]


CASES = {
    "tree": (512, [(64, 256)]),
    "plain": (768, [(1, 0)]),  # placeholder, built per leaf below
    "rl": (60, [(2, 64), (2, 64), (2, 64), (2, 64)]),  # x8 prompts below
}


def build(case, Hkv, D, P, dtype):
    from treepo.engine.kv_cache import PagedKVCache

    kv = PagedKVCache(1, Hkv, D, num_pages=8192, page_size=P, dtype=dtype)
    tables, lens = [], []
    if case == "plain":
        for _ in range(64):
            t = []
            kv.grow(t, 768)
            tables.append(t)
            lens.append(768)
    elif case == "rl":
        for _ in range(8):  # 8 prompts x 16 leaves
            t, n = grow(kv, CASES["rl"])
            tables += t
            lens += n
    else:
        tables, lens = grow(kv, CASES[case])
    kv.k.normal_()
    kv.v.normal_()
    return kv, tables, lens


def prefill_case(Hq, Hkv, D, P, dtype, seqs=8, tokens=512):
    """A prefill step: `seqs` sequences of `tokens` new tokens each in a fresh one-layer pool.
    Returns (kv, meta, q [seqs * tokens, Hq, D], k_new, v_new [seqs * tokens, Hkv, D])."""
    from treepo.engine.attention import AttentionMetadata
    from treepo.engine.kv_cache import PagedKVCache

    kv = PagedKVCache(1, Hkv, D, num_pages=1024, page_size=P, dtype=dtype)
    tables = []
    for _ in range(seqs):
        t = []
        kv.grow(t, tokens)
        tables.append(t)
    kv.k.normal_()
    kv.v.normal_()
    meta = AttentionMetadata.build(kv, tables, [tokens] * seqs, [tokens] * seqs, "cpu")
    q = torch.randn(seqs * tokens, Hq, D, dtype=dtype)
    k_new = kv.k[0][meta.slot_pages, :, meta.slot_offsets].clone()
    v_new = kv.v[0][meta.slot_pages, :, meta.slot_offsets].clone()
    return kv, meta, q, k_new, v_new


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", default="9,3,64", help="H_q,H_kv,head_dim (default SmolLM2's)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from treepo.engine.attention import AttentionMetadata, TorchBackend
    from treepo_kernels import cpu as kernels
    from treepo_kernels.tree_plan import plan_tree

    ok, why = kernels.status()
    if not ok:
        sys.exit(why)
    Hq, Hkv, D = map(int, args.heads.split(","))
    P, dtype = 16, getattr(torch, args.dtype)
    rows = []
    for case in ("tree", "plain", "rl"):
        kv, tables, lens = build(case, Hkv, D, P, dtype)
        B = len(lens)
        q = torch.randn(B, Hq, D, dtype=dtype)
        t0 = time.perf_counter()
        tree = plan_tree(tables, lens, P)
        plan_ms = (time.perf_counter() - t0) * 1e3
        plain = plan_tree(tables, lens, P, min_fanout=10**9)
        r = {"case": case, "leaves": B, "path_tokens": tree.path_tokens, "unique_tokens": tree.unique_tokens}
        r["cpu_tree_ms"] = median_ms(lambda: kernels.tree_decode(q, kv.k[0], kv.v[0], tree), args.repeat)
        r["cpu_plain_ms"] = median_ms(lambda: kernels.tree_decode(q, kv.k[0], kv.v[0], plain), args.repeat)
        backend = TorchBackend()
        meta = AttentionMetadata.build(kv, tables, [1] * B, lens, "cpu")
        tplan = backend.plan(meta, kv, Hq)
        # the torch backend appends the step's K/V first; rewrite the last token's own values
        last_k = kv.k[0][meta.slot_pages, :, meta.slot_offsets].clone()
        last_v = kv.v[0][meta.slot_pages, :, meta.slot_offsets].clone()
        r["torch_ms"] = median_ms(lambda: backend.forward(0, q, last_k, last_v, meta, kv, tplan), args.repeat)
        r["plan_ms"] = plan_ms
        r["tree_vs_torch"] = r["torch_ms"] / r["cpu_tree_ms"]
        r["plain_vs_torch"] = r["torch_ms"] / r["cpu_plain_ms"]
        r["tree_vs_plain"] = r["cpu_plain_ms"] / r["cpu_tree_ms"]
        r["tree_gflops"] = 4 * D * Hq * tree.path_tokens / r["cpu_tree_ms"] / 1e6
        rows.append(r)
    # extend (prefill): 8 sequences x 512 new tokens

    kv, meta, q, k_new, v_new = prefill_case(Hq, Hkv, D, P, dtype)
    r = {"case": "extend", "leaves": 8, "path_tokens": 8 * 512}
    from treepo.engine.attention.cpu_backend import CpuBackend

    for name, backend in (("cpu_tree_ms", CpuBackend()), ("torch_ms", TorchBackend())):
        plan = backend.plan(meta, kv, Hq)
        r[name] = median_ms(lambda: backend.forward(0, q, k_new, v_new, meta, kv, plan), max(3, args.repeat // 5))
    r["tree_vs_torch"] = r["torch_ms"] / r["cpu_tree_ms"]
    r["tree_gflops"] = 2 * D * Hq * 8 * 512 * 513 / r["cpu_tree_ms"] / 1e6
    rows.append(r)
    print(f"one attention layer, H_q={Hq} H_kv={Hkv} d={D}, {args.dtype}, page {P}, {args.threads} threads "
          "(extend: cpu_tree_ms is the cpu backend's paged extend)")
    print_table(rows, ["case", "leaves", "path_tokens", "unique_tokens", "cpu_tree_ms", "cpu_plain_ms", "torch_ms",
                       "tree_vs_torch", "plain_vs_torch", "tree_vs_plain", "tree_gflops", "plan_ms"])
    result_line("cpu_kernels", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()

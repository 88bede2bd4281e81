"""One attention layer over packed trees (treepo/train/tree_attention.py): which impl to train with.

SmolLM2-135M's heads (H_q=9, H_kv=3, d=64), fp32, micro-batches of at most --budget tokens
(plan_micro_batches over pack_trees sizes) of two rollouts:
- "tree": TreePO trees, a 60-token prompt and 4 levels of 32-token segments branching 2, 2, 2, 1
  (8 leaves, 764 packed tokens a tree, 5 trees = 3820 tokens);
- "seq": sequential groups, 8 leaves of 128 tokens under one 60-token prompt (1084 tokens a tree,
  3 trees = 3252 tokens).
Per impl: building the TreeAttention (masks), a no-grad forward, and forward + backward; medians of
--repeat calls, impls interleaved. FlexAttention has no backward on a CPU (forward only) and its
first call compiles (compile_s). Usage:

    python bench/bench_tree_attention.py [--threads 2] [--repeat 5] [--budget 4096] [--impls ...]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, print_table, result_line  # noqa: E402

from treepo.rollout.tree import Leaf, Node, Tree, TreeStats  # noqa: E402
from treepo.train.batch import pack_trees, packed_size, plan_micro_batches  # noqa: E402
from treepo.train.tree_attention import IMPLS, TreeAttention, tree_attention_ref  # noqa: E402


def make_tree(g: torch.Generator, prompt: int, seg: int, branching: list[int]) -> Tree:
    """A full tree: every node at depth d has branching[d] children of `seg` random tokens."""
    tok = lambda n: torch.randint(3, 49152, (n,), generator=g).tolist()  # noqa: E731
    nodes, frontier = [Node(0, None, 0)], [0]
    for b in branching:
        nxt = []
        for p in frontier:
            for _ in range(b):
                ids = tok(seg)
                n = Node(len(nodes), p, nodes[p].depth + 1, ids, [0.0] * seg)
                nodes[p].children.append(n.id)
                nodes.append(n)
                nxt.append(n.id)
        frontier = nxt
    leaves = []
    for k in frontier:
        path = []
        while k:
            path.append(k)
            k = nodes[k].parent
        path.reverse()
        ids = [t for k in path for t in nodes[k].token_ids]
        leaves.append(Leaf(ids, [0.0] * len(ids), path, "length"))
    return Tree(tok(prompt), nodes, leaves, TreeStats())


def micro_batch(case: str, budget: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = {"tree": (60, 32, [2, 2, 2, 1]), "seq": (60, 128, [8])}[case]
    trees = [make_tree(g, *shape) for _ in range(16)]
    first = plan_micro_batches([packed_size(t) for t in trees], budget)[0]
    return pack_trees([trees[i] for i in first], "tree")


def rows_for(case, impls, budget, repeat, Hq=9, Hkv=3, D=64):
    batch = micro_batch(case, budget)
    T = batch.tokens
    g = torch.Generator().manual_seed(1)
    q = torch.randn(T, Hq, D, generator=g).requires_grad_()
    k, v = (torch.randn(T, Hkv, D, generator=g).requires_grad_() for _ in range(2))
    go = torch.randn(T, Hq, D, generator=g)
    with torch.no_grad():
        ref = tree_attention_ref(q, k, v, batch.visible_end)
    rows, fwd, bwd, extra = [], {}, {}, {}
    for impl in impls:
        t0 = time.perf_counter()
        attn = TreeAttention.from_batch(batch, impl)
        setup = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        with torch.no_grad():
            out = attn(0, q, k, v)
        first = time.perf_counter() - t0
        err = (out.float() - ref).abs().max().item()
        extra[impl] = {"setup_ms": setup, "first_call_s": first, "max_err": err}

        def f(a=attn):
            with torch.no_grad():
                a(0, q, k, v)
        fwd[impl] = f
        if impl != "flex":  # no FlexAttention backward on a CPU
            def fb(a=attn):
                torch.autograd.grad(a(0, q, k, v), (q, k, v), go)
            bwd[impl] = fb
    ms_f, ms_b = interleaved(fwd, repeat), interleaved(bwd, repeat)
    dense = ms_b.get("dense")
    for impl in impls:
        r = {"case": case, "trees": len(batch.seq_offsets) - 1, "T": T, "impl": impl, **extra[impl],
             "fwd_ms": ms_f[impl], "fwd_bwd_ms": ms_b.get(impl)}
        if dense and impl in ms_b:
            r["speedup_vs_dense"] = dense / ms_b[impl]
        rows.append(r)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--budget", type=int, default=4096, help="micro-batch tokens")
    ap.add_argument("--cases", default="tree,seq")
    ap.add_argument("--impls", default=",".join(IMPLS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    impls = args.impls.split(",")
    rows = []
    for case in args.cases.split(","):
        rows += rows_for(case, impls, args.budget, args.repeat)
    print(f"one attention layer over packed trees, H_q=9 H_kv=3 d=64, fp32, {args.threads} threads, "
          f"budget {args.budget} tokens; load average {os.getloadavg()[0]:.2f}")
    print_table(rows, ["case", "trees", "T", "impl", "setup_ms", "first_call_s", "fwd_ms", "fwd_bwd_ms",
                       "speedup_vs_dense", "max_err"])
    result_line("tree_attention", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()

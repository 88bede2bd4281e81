"""What batch-invariant mode costs (EngineConfig.batch_invariant; docs/kernels.md, "Batch invariance").

Side by side, in one run:
1. one attention layer (SmolLM2's heads, bf16 pages of 16 tokens; bench_cpu_kernels.py's cases:
   a 512-token prefix shared by 64 leaves, 64 unshared leaves, a TreePO level of 128 leaves, an
   8 x 512-token prefill extend): the default tree plan vs the invariant chunked plan (16-, 32- and
   64-token chunks, `fixed` scores), kernel time (median, the two interleaved) and planner time;
2. the engine on the bundled SmolLM2-135M (bf16): `generate` of P prompts x n samples x T tokens and
   one TreePO tree per prompt, default vs batch_invariant=True; on a CPU without AVX512-BF16 two
   more rows split the cost into its attention part (invariant attention, default GEMMs) and its
   GEMM part (default attention, the portable packed GEMMs the invariant mode needs there).
Modes run round-robin `--rounds` times; medians are reported. Usage:

    python bench/bench_invariant.py [--threads 2] [--prompts 4] [--samples 8] [--tokens 64] [--rounds 2]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_cpu_kernels import build, prefill_case  # noqa: E402
from common import chat_prompts, interleaved, print_table, result_line  # noqa: E402


def attention_rows(Hq, Hkv, D, repeat, chunks):
    from treepo.engine.attention.cpu_backend import INVARIANT_CHUNK_TOKENS, CpuBackend
    from treepo_kernels import cpu as kernels
    from treepo_kernels.tree_plan import plan_chunked, plan_tree

    P, dtype = 16, torch.bfloat16
    rows = []
    for case in ("tree", "plain", "rl"):
        kv, tables, lens = build(case, Hkv, D, P, dtype)
        q = torch.randn(len(lens), Hq, D, dtype=dtype)
        for chunk in chunks:
            t0 = time.perf_counter()
            tree = plan_tree(tables, lens, P)
            t1 = time.perf_counter()
            chunked = plan_chunked(tables, lens, P, chunk // P)
            t2 = time.perf_counter()
            fns = {"default": lambda: kernels.tree_decode(q, kv.k[0], kv.v[0], tree),
                   "invariant": lambda: kernels.tree_decode(q, kv.k[0], kv.v[0], chunked, fixed=True)}
            ms = interleaved(fns, repeat)
            rows.append({"case": case, "chunk": chunk, "rows": len(lens), "path_tokens": tree.path_tokens,
                         "unique_default": tree.unique_tokens, "unique_invariant": chunked.unique_tokens,
                         "parts_default": tree.num_parts, "parts_invariant": chunked.num_parts,
                         "default_ms": ms["default"], "invariant_ms": ms["invariant"],
                         "cost": ms["invariant"] / ms["default"], "plan_default_ms": (t1 - t0) * 1e3,
                         "plan_invariant_ms": (t2 - t1) * 1e3})
    kv, meta, q, k_new, v_new = prefill_case(Hq, Hkv, D, P, dtype)
    fns = {}
    for name, backend in (("default", CpuBackend()), ("invariant", CpuBackend(chunk_tokens=INVARIANT_CHUNK_TOKENS))):
        plan = backend.plan(meta, kv, Hq)
        fns[name] = lambda b=backend, p=plan: b.forward(0, q, k_new, v_new, meta, kv, p)
    ms = interleaved(fns, max(3, repeat // 5))
    rows.append({"case": "extend", "chunk": INVARIANT_CHUNK_TOKENS, "rows": 8 * 512, "path_tokens": 8 * 512,
                 "default_ms": ms["default"], "invariant_ms": ms["invariant"],
                 "cost": ms["invariant"] / ms["default"]})
    return rows


def make_engine(mode, model, tok):
    from treepo import Engine
    from treepo.engine.attention.cpu_backend import INVARIANT_CHUNK_TOKENS, CpuBackend
    from treepo.engine.packed_model import PackedModel

    eng = Engine(model, tok, num_pages=4096, page_size=16, batch_invariant=mode == "invariant")
    if mode == "attention_only":  # attribution only: invariant attention, the default GEMMs (not invariant)
        eng.backend = eng.runner.backend = CpuBackend(chunk_tokens=INVARIANT_CHUNK_TOKENS)
    if mode == "gemm_only":  # attribution only: the default attention, the packed GEMMs of either build
        eng.runner.packed = PackedModel(model)
    return eng


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20, help="attention timings per case")
    ap.add_argument("--chunks", default="16,32,64", help="chunk sizes (tokens) of the attention rows")
    ap.add_argument("--parts", default="attention,engine", help="which parts to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from treepo.assets import bundled_model_path
    from treepo.engine.loader import load_model
    from treepo.engine.tokenizer import load_tokenizer
    from treepo_kernels import cpu as kernels

    ok, why = kernels.status()
    if not ok:
        sys.exit(why)
    path = bundled_model_path()
    model, tok = load_model(path, dtype="bfloat16"), load_tokenizer(path)
    cfg = model.config
    attn, rows = [], []
    if "attention" in args.parts:
        attn = attention_rows(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, args.repeat,
                              [int(c) for c in args.chunks.split(",")])
        print(f"one attention layer, H_q={cfg.num_heads} H_kv={cfg.num_kv_heads} d={cfg.head_dim}, bf16, page 16, "
              f"{args.threads} threads; the engine's chunk is 64 tokens; load average {os.getloadavg()[0]:.2f}")
        print_table(attn, ["case", "chunk", "rows", "path_tokens", "unique_default", "unique_invariant",
                           "parts_default", "parts_invariant", "default_ms", "invariant_ms", "cost",
                           "plan_default_ms", "plan_invariant_ms"])
    if "engine" in args.parts:
        rows = engine_rows(args, model, tok)
    result_line("invariant", {"args": vars(args), "attention": attn, "engine": rows,
                              "gemm_impl": kernels.gemm_impl()})


def engine_rows(args, model, tok) -> list[dict]:
    from treepo import SamplingParams, TreeConfig, TreeSampler
    from treepo_kernels import cpu as kernels

    prompts = chat_prompts(tok)[:args.prompts]
    params = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.tokens, seed=0, ignore_eos=True)
    tree_cfg = TreeConfig(segment_len=args.tokens // 4, max_depth=4, max_width=args.samples, branch_factor=2,
                          rep_count=0, seed=0)
    modes = ["default", "invariant"]
    if kernels.gemm_impl() != "avx512bf16":
        modes += ["attention_only", "gemm_only"]
    times = {(m, w): [] for m in modes for w in ("generate", "tree")}
    for _ in range(args.rounds):
        for m in modes:
            eng = make_engine(m, model, tok)
            eng.generate(prompts[:1], SamplingParams(n=2, max_tokens=4, ignore_eos=True))  # warm-up
            t = time.perf_counter()
            outs = eng.generate(prompts, params)
            times[(m, "generate")].append(time.perf_counter() - t)
            n_gen = sum(len(c.token_ids) for o in outs for c in o)
            t = time.perf_counter()
            trees = TreeSampler(eng, tree_cfg).sample(prompts, SamplingParams(seed=0, ignore_eos=True))
            times[(m, "tree")].append(time.perf_counter() - t)
            n_tree = sum(len(leaf.token_ids) for tr in trees for leaf in tr.leaves)
    rows = []
    for m in modes:
        g, tr = statistics.median(times[(m, "generate")]), statistics.median(times[(m, "tree")])
        rows.append({"mode": m, "generate_s": g, "generate_tok_s": n_gen / g, "tree_s": tr,
                     "tree_leaf_tok_s": n_tree / tr})
    for r in rows:
        r["generate_cost"] = r["generate_s"] / rows[0]["generate_s"]
        r["tree_cost"] = r["tree_s"] / rows[0]["tree_s"]
    print(f"\nengine, SmolLM2-135M bf16, {args.prompts} prompts x {args.samples} samples x {args.tokens} tokens "
          f"(tree: width {args.samples}, segments of {args.tokens // 4}); GEMMs: {kernels.gemm_impl()}; "
          f"median of {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}")
    print_table(rows, ["mode", "generate_s", "generate_tok_s", "generate_cost", "tree_s", "tree_leaf_tok_s",
                       "tree_cost"])
    return rows


if __name__ == "__main__":
    main()

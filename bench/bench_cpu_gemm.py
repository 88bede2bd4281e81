"""The packed bf16 GEMM (csrc/linear.cpp) vs torch's bf16 linear, and a whole engine decode step
with and without it, on the bundled SmolLM2-135M, CPU.

1. GEMMs: the 30 layers' weights of SmolLM2-135M (q/k/v/o, gate/up/down) times M rows: torch's
   F.linear per weight (seven a layer) vs linear_packed (q/k/v fused, gate/up fused with silu *
   up: four a layer); plus the LM head (49152 x 576). ms, GFLOP/s and weight GB/s.
2. Engine step: one decode step of M sequences (prompt of 40 tokens shared by up to 16, 100 own
   tokens each), Engine(packed_weights=False) vs the default (packed), same attention backend.
Usage:

    python bench/bench_cpu_gemm.py [--threads 2] [--rows 1,2,4,8,16,32,64,128] [--repeat 10]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import median_ms, print_table, result_line  # noqa: E402


def gemm_rows(args, rows_list):
    import torch.nn.functional as F

    from treepo_kernels import cpu as kernels

    H, I, L, NQ, NKV, V = 576, 1536, 30, 576, 192, 49152
    g = torch.Generator().manual_seed(0)

    def w(n, k):
        return (torch.randn(n, k, generator=g) * 0.02).bfloat16()

    layers = [dict(q=w(NQ, H), k=w(NKV, H), v=w(NKV, H), o=w(H, NQ), gate=w(I, H), up=w(I, H), down=w(H, I))
              for _ in range(L)]
    packed = [dict(qkv=kernels.pack_linear(torch.cat([x["q"], x["k"], x["v"]])), o=kernels.pack_linear(x["o"]),
                   gu=kernels.pack_linear(torch.cat([x["gate"], x["up"]]), gated=True),
                   down=kernels.pack_linear(x["down"])) for x in layers]
    head = w(V, H)
    head_p = kernels.pack_linear(head)
    n_params = L * (2 * NQ * H + 2 * NKV * H + 3 * I * H)
    out = []
    for M in rows_list:
        xh, xi = torch.randn(M, H).bfloat16(), torch.randn(M, I).bfloat16()

        def torch_layers():
            for x in layers:
                for name in ("q", "k", "v", "gate", "up"):
                    F.linear(xh, x[name])
                F.linear(xh, x["o"])
                F.linear(xi, x["down"])

        def packed_layers():
            for p in packed:
                kernels.linear_packed(xh, p["qkv"], NQ + 2 * NKV)
                kernels.linear_packed(xh, p["o"], H)
                kernels.linear_packed(xh, p["gu"], I, gated=True)
                kernels.linear_packed(xi, p["down"], H)

        r = {"rows": M, "torch_ms": median_ms(torch_layers, args.repeat),
             "packed_ms": median_ms(packed_layers, args.repeat),
             "head_torch_ms": median_ms(lambda: F.linear(xh, head).float(), args.repeat),
             "head_packed_ms": median_ms(lambda: kernels.linear_packed(xh, head_p, V, fp32_out=True), args.repeat)}
        r["speedup"] = r["torch_ms"] / r["packed_ms"]
        r["packed_gflops"] = 2 * M * n_params / r["packed_ms"] / 1e6
        r["packed_weight_gbs"] = 2 * n_params / r["packed_ms"] / 1e6
        out.append(r)
    return out


def engine_rows(args, rows_list):
    from treepo import Engine
    from treepo.assets import bundled_model_path

    out = []
    engines = {name: Engine.from_pretrained(bundled_model_path(), dtype="bfloat16", packed_weights=packed)
               for name, packed in (("plain", False), ("packed", None))}
    for M in rows_list:
        r = {"rows": M}
        for name, eng in engines.items():
            share = min(M, 16)
            seqs = []
            for i in range(M // share):
                s = eng.new_sequence(list(range(100 + i, 140 + i)))
                eng.forward([s])
                seqs += [s] + eng.fork(s, share - 1)
            for s in seqs:
                s.token_ids += list(range(200, 300))
            eng.forward(seqs)

            def step():
                for s in seqs:
                    s.token_ids.append(7)
                eng.forward(seqs)

            r[f"{name}_step_ms"] = median_ms(step, args.repeat)
            for s in seqs:
                eng.free(s)
        r["speedup"] = r["plain_step_ms"] / r["packed_step_ms"]
        out.append(r)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from treepo_kernels import cpu as kernels

    if kernels.gemm_impl() != "avx512bf16":
        sys.exit(f"the packed GEMM is {kernels.gemm_impl() or 'not built'} here: nothing to measure")
    rows_list = [int(x) for x in args.rows.split(",")]
    gemm = gemm_rows(args, rows_list)
    print(f"SmolLM2-135M GEMMs (30 layers) x M rows, bf16, {args.threads} threads")
    print_table(gemm, ["rows", "torch_ms", "packed_ms", "speedup", "packed_gflops", "packed_weight_gbs",
                       "head_torch_ms", "head_packed_ms"])
    eng = engine_rows(args, [m for m in rows_list if m in (2, 16, 64, 128)] or rows_list[:1])
    print("engine decode step (whole model, cpu attention backend)")
    print_table(eng, ["rows", "plain_step_ms", "packed_step_ms", "speedup"])
    result_line("cpu_gemm", {"args": vars(args), "gemm": gemm, "engine": eng})


if __name__ == "__main__":
    main()

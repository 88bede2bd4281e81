"""Packed CPU GEMM (csrc/linear.cpp, `cpu.linear_packed`) vs torch's linear, one weight, CPU only.

The weights of one SmolLM2-135M layer as the packed model fuses them (bench_cpu_gemm.py's shapes):
q/k/v in one GEMM, gate/up in one with silu(gate) * up, down, and the LM head (fp32 out), times M
rows (M = 1-16: decode steps, 128: a prefill chunk). Providers: treepo_cpp (`linear_packed` on a
weight packed outside the timed part; extra_info["gemm_impl"] says which build: "avx512bf16" or the
"portable" loop that batch-invariant mode uses) and torch (`F.linear` on the same weights in
`suite.torch_dtype`: fp32 on a CPU without native bf16, as the engine's "auto" dtype, else bf16).
extra_info: GFLOP/s and the weight bytes read per second. Reference: fp32 matmuls of the bf16 weights.
"""
import pytest
import torch
import torch.nn.functional as F
from suite import check, need_cpp, torch_dtype

PROVIDERS = ["treepo_cpp", "torch"]
H, I, NQ, NKV, V = 576, 1536, 576, 192, 49152  # SmolLM2-135M
WEIGHTS = {  # name: (N, K, gated); gated: cat([gate, up]), N = 2 I
    "qkv": (NQ + 2 * NKV, H, False), "gate_up": (2 * I, H, True), "down": (H, I, False), "lm_head": (V, H, False),
    "tiny": (64, 32, True)}


def _shapes(rows, names):
    return [(f"{n}_m{m}", (n, m)) for n in names for m in rows]


# (id, (weight, M rows)); the "gpu" set is the CPU one (a CUDA run skips this file)
CPU_SHAPES = _shapes((1, 16, 128), ("qkv", "gate_up", "down")) + _shapes((1, 16), ("lm_head",))
SHAPES = {"tiny": _shapes((3,), ("tiny",)), "cpu": CPU_SHAPES, "gpu": CPU_SHAPES}


@pytest.fixture(scope="module")
def case(shape, device):
    if device.type != "cpu":
        pytest.skip("the packed GEMM is a CPU kernel (--bench-device cpu)")
    name, M = shape[1]
    N, K, gated = WEIGHTS[name]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=g) * 0.02).bfloat16()  # [N, K]; gated: cat([gate, up])
    x = torch.randn(M, K, generator=g).bfloat16()
    ref = x.float() @ w.float().T  # [M, N]
    if gated:
        gate, up = ref.chunk(2, -1)
        ref = F.silu(gate) * up
    return dict(w=w, x=x, ref=ref, gated=gated, n_out=ref.shape[1], fp32_out=name == "lm_head",
                info=dict(M=M, N=N, K=K, gated=gated), flops=2 * M * N * K)


def test_gemm(case, provider, shape, device, timed):
    w, x, gated, n_out = case["w"], case["x"], case["gated"], case["n_out"]
    if provider == "treepo_cpp":
        need_cpp(device)
        from treepo_kernels import cpu

        timed.extra_info["gemm_impl"] = cpu.gemm_impl()
        packed = cpu.pack_linear(w, gated=gated)
        wbytes = packed.numel() * packed.element_size()

        def fn():
            return cpu.linear_packed(x, packed, n_out, gated=gated, fp32_out=case["fp32_out"])
    else:
        dt = torch_dtype(device)
        timed.extra_info["dtype"] = str(dt)
        wt, xt = w.to(dt), x.to(dt)
        wbytes = wt.numel() * wt.element_size()
        if gated:
            def fn():
                gate, up = F.linear(xt, wt).chunk(2, -1)
                return F.silu(gate) * up
        else:
            def fn():
                return F.linear(xt, wt)
    out = fn()
    err = check(provider, out, case["ref"], torch.bfloat16 if provider == "treepo_cpp" else out.dtype)
    s = timed(fn, f"gemm:{shape[0]}", **case["info"], rel_err=err)
    if s:
        timed.extra_info["GFLOPs"] = case["flops"] / s / 1e9
        timed.extra_info["weight_GBps"] = wbytes / s / 1e9

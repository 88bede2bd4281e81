"""Compile the Triton kernels for a GPU target ahead of time, without a GPU (run as a script).

The interpreter (how the kernel tests run on a CPU) accepts programs that the GPU compiler
rejects - e.g. a fp16 / bf16 `tl.dot` with K < 16. Lowering every kernel to a cubin for sm_90
with Triton's bundled ptxas catches those on a CPU-only machine. The constexprs come from the
launchers' own helpers, so this compiles what the launchers would launch.

    python tests/triton_aot_check.py        # prints one line per kernel, exit 1 on a failure
Exit code 2 (and a reason) when this Triton cannot compile for CUDA here; TRITON_INTERPRET must
be unset (the kernels must be decorated as JIT functions).
"""
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(f"SKIP this Triton has no AOT API ({e})")
    sys.exit(2)

from treepo_kernels import extend, paged_kv, tree_attention, tree_decode  # noqa: E402
from treepo_kernels.triton_common import block_d_for  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200

# (dtype, head_dim, g): tiny-model head_dim 8 (below tl.dot's K minimum), a non-power-of-two,
# the benchmark shapes of docs/kernels.md, MQA with more than 64 query heads per KV head
CASES = [("bf16", 8, 3), ("fp16", 48, 4), ("bf16", 128, 8), ("bf16", 128, 7), ("fp32", 64, 1), ("bf16", 64, 96)]
# the training tree attention (dtype, head_dim, g, rows per program): SmolLM2's odd head split,
# an odd head dim, the benchmark shape at 128 rows, fp32
TRAIN_CASES = [("bf16", 64, 3, 64), ("fp16", 80, 4, 64), ("bf16", 128, 8, 128), ("fp32", 96, 1, 64)]


def compile_kernel(fn, types: dict, constexprs: dict):
    sig = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs), target=TARGET)


def kernels_for(dt: str, D: int, g: int, leaves: int = 12, block_n: int = 16):
    """(name, fn, pointer types, constexprs) of every kernel a launch with these shapes runs."""
    prec = "ieee" if dt == "fp32" else "tf32"
    block_d = block_d_for(D)
    block_m, leaf_tile = tree_decode.tile_for(SimpleNamespace(max_unit_leaves=leaves), g)
    i32 = "*i32"
    partials = dict(q_ptr=f"*{dt}", k_cache_ptr=f"*{dt}", v_cache_ptr=f"*{dt}", part_o_ptr="*fp32",
                    part_lse_ptr="*fp32", scale_log2="fp32", item_unit_ptr=i32, item_first_ptr=i32, unit_page_ptr=i32,
                    unit_pages_ptr=i32, unit_len_ptr=i32, unit_leaf_ptr=i32, unit_leaves_ptr=i32)
    yield "partials", tree_decode._partials_kernel, partials, dict(
        G=g, D=D, LEAF_TILE=leaf_tile, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=prec)
    Hq = 4 * g
    merge = dict(part_o_ptr="*fp32", part_lse_ptr="*fp32", leaf_part_ptr=i32, leaf_parts_ptr=i32, out_ptr=f"*{dt}",
                 lse_ptr="*fp32")
    yield "merge", tree_decode._merge_kernel, merge, dict(
        HQ=Hq, D=D, BLOCK_H=tree_decode.merge_heads_for(Hq, block_d), BLOCK_D=block_d)
    bq = extend.block_q_for(g)
    ext = dict(q_ptr=f"*{dt}", k_cache_ptr=f"*{dt}", v_cache_ptr=f"*{dt}", block_tables_ptr=i32, cu_q_ptr="*i64",
               kv_lens_ptr="*i64", item_seq_ptr=i32, item_q_ptr=i32, out_ptr=f"*{dt}", lse_ptr="*fp32",
               scale_log2="fp32")
    for own_only in (False, True):  # paged_extend / tree_extend's causal part
        yield "extend", extend._extend_kernel, ext, dict(
            G=g, D=D, BLOCK_Q=bq, BLOCK_M=max(16, triton.next_power_of_2(bq * g)), BLOCK_N=block_n, BLOCK_D=block_d,
            PREC=prec, OWN_ONLY=own_only)
    append = dict(k_ptr=f"*{dt}", v_ptr=f"*{dt}", k_cache_ptr=f"*{dt}", v_cache_ptr=f"*{dt}", pages_ptr="*i64",
                  offsets_ptr="*i64")
    yield "append", paged_kv._append_kernel, append, dict(D=D, BLOCK_D=triton.next_power_of_2(D))


def train_kernels_for(dt: str, D: int, g: int, rows: int):
    """(name, fn, pointer types, constexprs) of the three kernels of `tree_attention.tree_attention`."""
    hpp, bq = tree_attention.tile_for(g, 1, rows)
    consts = dict(G=g, HPP=hpp, D=D, BLOCK_Q=bq, BLOCK_N=tree_attention.BLOCK_N, BLOCK_D=block_d_for(D),
                  PREC="ieee" if dt == "fp32" else "tf32")
    t, i32 = f"*{dt}", "*i32"
    plan = dict(ve_ptr=i32, q_kv_ptr_ptr=i32, q_kv_full_ptr=i32, q_kv_ptr=i32, kv_q_ptr_ptr=i32, kv_q_full_ptr=i32,
                kv_q_ptr=i32, item_kb_ptr=i32, item_start_ptr=i32, item_end_ptr=i32, item_part_ptr=i32)
    fwd = dict(q_ptr=t, k_ptr=t, v_ptr=t, out_ptr=t, lse_ptr="*fp32", scale_log2="fp32", **plan)
    bwd = dict(fwd, do_ptr=t, delta_ptr="*fp32", dq_ptr=t, dk_ptr=t, dv_ptr=t, part_dk_ptr="*fp32",
               part_dv_ptr="*fp32", scale="fp32")
    yield "ta_fwd", tree_attention._fwd_kernel, fwd, consts
    yield "ta_dq", tree_attention._dq_kernel, bwd, consts
    yield "ta_dkdv", tree_attention._dkdv_kernel, bwd, consts


def main() -> int:
    try:  # can this Triton lower to a cubin here at all (CUDA backend + ptxas bundled)?
        _, fn, types, constexprs = list(kernels_for("fp16", 64, 1))[3]  # the append kernel: quick
        compile_kernel(fn, types, constexprs)
    except Exception as e:
        print(f"SKIP cannot compile for {TARGET} here ({type(e).__name__}: {str(e).strip()[:200]})")
        return 2
    failed = 0
    cases = [(c, kernels_for(*c)) for c in CASES] + [(c[:3], train_kernels_for(*c)) for c in TRAIN_CASES]
    for (dt, D, g), kernels in cases:
        for name, fn, types, constexprs in kernels:
            try:
                compile_kernel(fn, types, constexprs)
                print(f"ok   {name:8s} {dt} head_dim={D} g={g}")
            except Exception as e:
                failed += 1
                lines = [x for x in str(e).strip().splitlines() if x.strip()]
                print(f"FAIL {name:8s} {dt} head_dim={D} g={g} {constexprs}: {type(e).__name__}: "
                      f"{' | '.join(lines[-3:])[:400]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

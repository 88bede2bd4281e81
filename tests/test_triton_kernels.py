"""The Triton kernels against the plain-PyTorch references (on a CPU through the Triton
interpreter, fp32 and fp16; tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA), the
engine with attention_backend="triton" against the torch backend, and GPU-only checks (bf16, large
shapes, CUDA graph capture) that skip without CUDA."""
import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import assert_close, tiny_hf_model  # noqa: E402
from kernel_cases import (  # noqa: E402
    EXTRA_SHAPES,
    TOL,
    append_case,
    assert_greedy_parity,
    assert_tree_parity,
    extend_case,
    tree_case,
)
from test_tree_plan import SHAPES  # noqa: E402

from treepo import TreeConfig  # noqa: E402
from treepo_kernels import paged_attention_ref  # noqa: E402
from treepo_kernels.extend import paged_extend  # noqa: E402
from treepo_kernels.paged_kv import append_kv  # noqa: E402
from treepo_kernels.tree_decode import paged_decode, tree_decode, tree_decode_ref  # noqa: E402
from treepo_kernels.tree_plan import plan_tree  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16]  # the interpreter has no bf16 dot; bf16 is in the GPU tests
ALL = SHAPES + EXTRA_SHAPES


def to_dev(plan):
    for name in ("unit_page_ptr", "unit_pages", "unit_len", "unit_start", "unit_leaf_ptr", "unit_leaves",
                 "leaf_part_ptr", "leaf_parts"):
        setattr(plan, name, getattr(plan, name).to(DEV))
    return plan


def torch_same_dtype(q, k_cache, v_cache, tables, lens):
    """Plain torch decode in q's dtype, as a GPU runs it (fp32-accumulated matmuls whose results
    are rounded to the dtype, softmax in fp32, P rounded to the dtype - the torch backend's
    recipe): the error budget a kernel is held to. The matmuls run in fp32 on the rounded values
    here (CPU half matmuls are slow). Returns (out, lse fp32)."""
    from treepo_kernels.extend import gather_kv

    B, Hq, D = q.shape
    g = Hq // k_cache.shape[1]
    out, lse = torch.empty_like(q), torch.empty(B, Hq)
    for b, (t, L) in enumerate(zip(tables, lens)):
        kk = gather_kv(k_cache, torch.tensor(t), L).repeat_interleave(g, 0)  # [Hq, L, D]
        vv = gather_kv(v_cache, torch.tensor(t), L).repeat_interleave(g, 0)
        s = (q[b, :, None].float() @ kk.transpose(1, 2).float()).to(q.dtype).float()[:, 0] * D ** -0.5  # [Hq, L]
        out[b] = (s.softmax(-1).to(q.dtype).float()[:, None] @ vv.float())[:, 0].to(q.dtype)
        lse[b] = s.logsumexp(-1)
    return out, lse


def assert_close_vs_torch(actual, torch_low, exact, atol, what):
    """actual's max error vs the fp32 reference `exact` is at most 2x plain torch's in the same
    dtype plus atol; on failure, how many elements exceed that and where the worst one is."""
    budget = 2 * (torch_low.float() - exact).abs().max().item() + atol
    assert_close(actual, exact, atol=budget, what=f"{what} (budget 2 x torch error + {atol})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("min_fanout", [2, 10**9])
@pytest.mark.parametrize("case", range(len(ALL)))
def test_tree_decode_matches_reference(case, min_fanout, dtype):
    q, k, v, tables, lens, P = tree_case(ALL[case], case, dtype)
    plan = plan_tree(tables, lens, P, min_fanout=min_fanout, max_unit_pages=2 if case % 2 else None)
    # the kernel runs first: a reference's freed buffers must not pre-fill the kernel's outputs
    out, lse = tree_decode(q.to(DEV), k.to(DEV), v.to(DEV), to_dev(plan))
    ref, ref_lse = tree_decode_ref(q.float(), k.float(), v.float(), plan)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out.cpu(), ref, **TOL[dtype], what=f"tree decode out {ALL[case]}")
    assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-6, what="tree decode lse")
    if dtype != torch.float32:  # and no worse than plain torch in the same dtype (docs/kernels.md)
        low, low_lse = torch_same_dtype(q, k, v, tables, lens)
        assert_close_vs_torch(out.cpu(), low, ref, atol=1e-4, what=f"tree decode out vs torch {dtype}")
        assert_close_vs_torch(lse.cpu(), low_lse, ref_lse, atol=1e-5, what="tree decode lse vs torch")


def test_plain_paged_decode_is_the_same_contract():
    q, k, v, tables, lens, P = tree_case(SHAPES[1], 1, torch.float32)
    out, lse = paged_decode(q.to(DEV), k.to(DEV), v.to(DEV), tables, lens, max_unit_pages=3)
    B = len(lens)
    bt = torch.zeros(B, max(len(t) for t in tables), dtype=torch.int32)
    for b, t in enumerate(tables):
        bt[b, :len(t)] = torch.tensor(t)
    ref, ref_lse = paged_attention_ref(q, k, v, bt, torch.arange(B + 1), torch.tensor(lens))
    assert_close(out.cpu(), ref, **TOL[torch.float32], what="paged decode")
    assert_close(lse.cpu(), ref_lse, atol=1e-5, what="paged decode lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4, 32, 4), (9, 3, 64, 16), (8, 2, 128, 8), (8, 1, 64, 16), (16, 2, 32, 4)])
@pytest.mark.parametrize("seed", range(2))
def test_paged_extend_matches_reference(heads, seed, dtype):
    q, k, v, tables, cu, kv_lens = extend_case(seed, *heads, dtype)
    out, lse = paged_extend(q.to(DEV), k.to(DEV), v.to(DEV), tables.to(DEV), cu.to(DEV), kv_lens.to(DEV))
    ref, ref_lse = paged_attention_ref(q.float(), k.float(), v.float(), tables, cu, kv_lens)
    assert_close(out.cpu(), ref, **TOL[dtype], what="extend out")
    assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-6, what="extend lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_kv_matches_reference(dtype):
    k_cache, v_cache, k, v, pages, offsets, ref_k, ref_v = append_case(48, dtype)  # head_dim 48: not a power of 2
    kc, vc = k_cache.to(DEV), v_cache.to(DEV)
    append_kv(kc, vc, k.to(DEV), v.to(DEV), pages.to(DEV), offsets.to(DEV))
    assert torch.equal(kc.cpu(), ref_k) and torch.equal(vc.cpu(), ref_v)


def test_launchers_reject_bad_shapes():
    q, k, v, tables, lens, P = tree_case(SHAPES[1], 1, torch.float32)
    plan = plan_tree(tables, lens, P)
    with pytest.raises(AssertionError, match="multiple"):
        tree_decode(q[:, :4].contiguous().to(DEV), k.to(DEV), v.to(DEV), to_dev(plan))
    with pytest.raises(AssertionError, match="leaves"):
        tree_decode(torch.cat([q, q]).to(DEV), k.to(DEV), v.to(DEV), to_dev(plan))
    with pytest.raises(AssertionError, match="dtype"):
        tree_decode(q.half().to(DEV), k.to(DEV), v.to(DEV), to_dev(plan))
    plan.unit_pages = plan.unit_pages.long()
    with pytest.raises(AssertionError, match="plan.unit_pages must be contiguous int32"):
        tree_decode(q.to(DEV), k.to(DEV), v.to(DEV), to_dev(plan))
    qe, ke, ve, te, cu, kl = extend_case(0, 4, 4, 32, 4, torch.float32)
    with pytest.raises(AssertionError, match="block_tables must be contiguous"):
        paged_extend(qe.to(DEV), ke.to(DEV), ve.to(DEV), te.long().to(DEV), cu.to(DEV), kl.to(DEV))
    with pytest.raises(AssertionError, match=r"kv_lens must be contiguous \["):
        paged_extend(qe.to(DEV), ke.to(DEV), ve.to(DEV), te.to(DEV), cu.to(DEV), kl[:-1].to(DEV))


TRITON_SHAPES = [  # (Hq, Hkv, D, page_size, prompt_len, depth, branch, seg_len), beyond the shared grid
    (6, 2, 8, 4, 9, 2, 3, 5),  # head_dim 8 (the tiny engine models'): below tl.dot's K minimum, padded
    (8, 2, 48, 8, 13, 2, 2, 6),  # g=4, head_dim 48: not a power of two
    (96, 1, 16, 4, 6, 1, 3, 3),  # MQA with g=96 > 64 query rows: one leaf per tile, all its heads
]


@pytest.mark.parametrize("case", range(len(TRITON_SHAPES)))
def test_tree_decode_odd_heads(case):
    q, k, v, tables, lens, P = tree_case(TRITON_SHAPES[case], 10 + case, torch.float32)
    plan = plan_tree(tables, lens, P, max_unit_pages=2)
    out, lse = tree_decode(q.to(DEV), k.to(DEV), v.to(DEV), to_dev(plan))
    ref, ref_lse = tree_decode_ref(q, k, v, plan)
    assert_close(out.cpu(), ref, **TOL[torch.float32], what=f"tree decode out {TRITON_SHAPES[case]}")
    assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-6, what="tree decode lse")
    Hq, Hkv, D = TRITON_SHAPES[case][:3]
    qe, ke, ve, te, cu, kl = extend_case(case, Hq, Hkv, D, P, torch.float32)
    out, lse = paged_extend(qe.to(DEV), ke.to(DEV), ve.to(DEV), te.to(DEV), cu.to(DEV), kl.to(DEV))
    ref, ref_lse = paged_attention_ref(qe, ke, ve, te, cu, kl)
    assert_close(out.cpu(), ref, **TOL[torch.float32], what="extend out")
    assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-6, what="extend lse")


def test_tree_decode_page_edges():
    """Forks mid-page (the child's partial tail copied, full pages shared by id), leaves whose last
    page holds 1 token / is full / is the shared node's own last page (no own tokens)."""
    from treepo.engine.kv_cache import PagedKVCache

    P = 8
    kv = PagedKVCache(1, 2, 32, num_pages=64, page_size=P)
    kv._free = torch.randperm(64, generator=torch.Generator().manual_seed(3)).tolist()
    root = []
    kv.grow(root, 2 * P)  # two full pages: shared by id
    kv.k.normal_()
    kv.v.normal_()
    mid = kv.fork(root, 2 * P, 1)[0]  # a node forked again mid-page
    kv.grow(mid, 2 * P + 5)
    tables, lens = [root], [2 * P]  # a leaf ending exactly at the end of the shared pages
    for own in (1, P, P - 1):  # 1 token on the last page, a full last page, one short
        t = kv.fork(root, 2 * P, 1)[0]
        kv.grow(t, 2 * P + own)
        tables.append(t)
        lens.append(2 * P + own)
    for own in (0, 1, 3 + P):
        t = kv.fork(mid, 2 * P + 5, 1)[0]  # private copy of mid's partial page
        kv.grow(t, 2 * P + 5 + own)
        tables.append(t)
        lens.append(2 * P + 5 + own)
    q = torch.randn(len(lens), 8, 32)
    for min_fanout in (2, 10**9):
        plan = plan_tree(tables, lens, P, min_fanout=min_fanout)
        out, lse = tree_decode(q.to(DEV), kv.k[0].to(DEV), kv.v[0].to(DEV), to_dev(plan))
        ref, ref_lse = tree_decode_ref(q, kv.k[0], kv.v[0], plan)
        assert_close(out.cpu(), ref, **TOL[torch.float32], what=f"page edges, min_fanout={min_fanout}")
        assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-6, what="page edges lse")


def test_zero_length_unit_contributes_nothing():
    """An empty unit (hand-made: the planner never emits one) gets LSE -inf and leaves the merged
    result unchanged; no NaN from 0/0 or -inf - -inf."""
    q, k, v, tables, lens, P = tree_case(SHAPES[1], 0, torch.float32)
    plan = plan_tree(tables, lens, P)
    ref, ref_lse = tree_decode(q.to(DEV), k.to(DEV), v.to(DEV), to_dev(plan))
    z = torch.zeros(1, dtype=torch.int32)
    empty = plan_tree(tables, lens, P)  # unit 0: no pages, 0 tokens, serving leaf 0 (partial slot 0)
    empty.unit_page_ptr = torch.cat([z, plan.unit_page_ptr])
    empty.unit_len = torch.cat([z, plan.unit_len])
    empty.unit_start = torch.cat([z, plan.unit_start])
    empty.unit_leaf_ptr = torch.cat([z, plan.unit_leaf_ptr + 1])
    empty.unit_leaves = torch.cat([z, plan.unit_leaves])
    ptr = plan.leaf_part_ptr.tolist()
    parts = [[0] * (b == 0) + [x + 1 for x in plan.leaf_parts[ptr[b]:ptr[b + 1]].tolist()] for b in range(len(lens))]
    empty.leaf_parts = torch.tensor([x for p in parts for x in p], dtype=torch.int32)
    empty.leaf_part_ptr = torch.tensor([0] + [len(p) for p in parts]).cumsum(0).int()
    empty.max_leaf_parts += 1
    out, lse = tree_decode(q.to(DEV), k.to(DEV), v.to(DEV), to_dev(empty))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out.cpu(), ref.cpu(), atol=1e-6, what="with an empty unit")
    assert_close(lse.cpu(), ref_lse.cpu(), atol=1e-6, what="lse with an empty unit")


@pytest.mark.skipif(CUDA, reason="on a GPU the kernel tests compile for the device anyway")
def test_kernels_compile_for_a_gpu():
    """The interpreter accepts kernels a GPU compiler rejects (a fp16 tl.dot with K < 16): lower
    every kernel for sm_90 with Triton's bundled ptxas (tests/triton_aot_check.py), no GPU needed."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(os.path.dirname(__file__), "triton_aot_check.py")
    r = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode == 2:
        pytest.skip(r.stdout.strip() or r.stderr.strip()[-300:])
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


# ------------------------------------------------------------------------------ engine level

@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama3_rope_gqa3", vocab=160, layers=2)


def test_engine_greedy_parity_with_torch_backend(hf):
    assert_greedy_parity(hf, "triton", max_tokens=12, device=DEV)


def test_engine_tree_parity_with_torch_backend(hf):
    cfg = TreeConfig(segment_len=4, max_depth=3, max_width=6, branch_factor=2, rep_count=0, seed=3)
    assert_tree_parity(hf, "triton", cfg, num_pages=1024, device=DEV)


# ------------------------------------------------------------------------------ GPU only

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads", [(32, 8, 128), (28, 4, 128), (32, 32, 128), (9, 3, 64)])
def test_gpu_bf16_large_tree(heads):
    """64 leaves sharing a 2048-token prefix with 256-token own suffixes, bf16, page 16."""
    from treepo.engine.kv_cache import PagedKVCache

    Hq, Hkv, D = heads
    kv = PagedKVCache(1, Hkv, D, num_pages=(2048 + 64 * 272) // 16 + 8, page_size=16, dtype=torch.bfloat16,
                      device="cuda")
    root = []
    kv.grow(root, 2048)
    tables = kv.fork(root, 2048, 64)
    for t in tables:
        kv.grow(t, 2048 + 256)
    kv.free(root)
    kv.k.normal_()
    kv.v.normal_()
    lens = [2048 + 256] * 64
    q = torch.randn(64, Hq, D, dtype=torch.bfloat16, device="cuda")
    plan = plan_tree(tables, lens, 16, device="cuda")
    out, lse = tree_decode(q, kv.k[0], kv.v[0], plan)
    ref, ref_lse = tree_decode_ref(q.float(), kv.k[0].float(), kv.v[0].float(), plan)
    assert_close(out, ref, **TOL[torch.bfloat16], what="bf16 tree decode")
    assert_close(lse, ref_lse, atol=1e-3, what="bf16 lse")


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture_of_a_decode_step():
    q, k, v, tables, lens, P = tree_case(SHAPES[4], 4, torch.bfloat16)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    plan = plan_tree(tables, lens, P, device="cuda")
    from treepo_kernels.tree_decode import tile_for, work_items

    items = work_items(plan, tile_for(plan, q.shape[1] // k.shape[1])[1], "cuda")
    expect = tree_decode(q, k, v, plan, items=items)[0]  # warm-up compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_decode(q, k, v, plan, items=items)[0]
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(out, expect)
    assert_close(out, tree_decode(q, k, v, plan, items=items)[0], atol=0.0, what="graph replay")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(ALL)))
def test_tree_extend_matches_reference(case, dtype):
    """New tokens of every branch of a forked tree at once (their context read through the tree
    plan, the new tokens causal among themselves, merged by LSE) equal plain causal attention. New
    tokens lie in each branch's own pages, as the KV cache guarantees (shared pages are full)."""
    import random
    from collections import Counter

    from treepo_kernels.extend import plan_extend, tree_extend

    q, k, v, tables, lens, P = tree_case(ALL[case], case, dtype)
    used = [t[: -(-L // P)] for t, L in zip(tables, lens)]
    count = Counter(p for t in used for p in set(t))
    own = [L - P * sum(count[p] > 1 for p in t) for t, L in zip(used, lens)]
    r = random.Random(case)
    q_lens = [r.randint(min(1, o), min(o, 9)) for o in own]
    Hq, D = q.shape[1], q.shape[2]
    qq = torch.randn(sum(q_lens), Hq, D, generator=torch.Generator().manual_seed(case)).to(dtype)
    plan = plan_extend(tables, lens, q_lens, P, Hq // k.shape[1], DEV)
    out, lse = tree_extend(qq.to(DEV), k.to(DEV), v.to(DEV), plan)
    ref, ref_lse = paged_attention_ref(qq.float(), k.float(), v.float(), plan.block_tables.cpu(), plan.cu_q.cpu(),
                                       plan.kv_lens.cpu())
    assert_close(out.cpu(), ref, **TOL[dtype], what="tree extend out")
    assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-6, what="tree extend lse")

"""The Triton kernels against the plain-PyTorch references (on a CPU through the Triton
interpreter, fp32 and fp16; tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA), the
engine with attention_backend="triton" against the torch backend, and GPU-only checks (bf16, large
shapes, CUDA graph capture) that skip without CUDA."""
import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import assert_close, tiny_hf_model  # noqa: E402
from kernel_cases import EXTRA_SHAPES, TOL, extend_case, tree_case  # noqa: E402
from test_tree_plan import SHAPES  # noqa: E402
from treepo import Engine, SamplingParams, TreeConfig, TreeSampler  # noqa: E402
from treepo_kernels import append_kv_ref, paged_attention_ref  # noqa: E402
from treepo_kernels.tree_decode import tree_decode_ref  # noqa: E402
from treepo_kernels.tree_plan import plan_tree  # noqa: E402
from treepo_kernels.triton_extend import paged_extend  # noqa: E402
from treepo_kernels.triton_paged_kv import append_kv  # noqa: E402
from treepo_kernels.triton_tree_decode import paged_decode, tree_decode  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16]  # the interpreter has no bf16 dot; bf16 is in the GPU tests
ALL = SHAPES + EXTRA_SHAPES


def to_dev(plan):
    for name in ("unit_page_ptr", "unit_pages", "unit_len", "unit_start", "unit_leaf_ptr", "unit_leaves",
                 "leaf_part_ptr", "leaf_parts"):
        setattr(plan, name, getattr(plan, name).to(DEV))
    return plan


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("min_fanout", [2, 10**9])
@pytest.mark.parametrize("case", range(len(ALL)))
def test_tree_decode_matches_reference(case, min_fanout, dtype):
    q, k, v, tables, lens, P = tree_case(ALL[case], case, dtype)
    plan = plan_tree(tables, lens, P, min_fanout=min_fanout, max_unit_pages=2 if case % 2 else None)
    ref, ref_lse = tree_decode_ref(q.float(), k.float(), v.float(), plan)
    out, lse = tree_decode(q.to(DEV), k.to(DEV), v.to(DEV), to_dev(plan))
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out.cpu(), ref, **TOL[dtype], what=f"tree decode out {ALL[case]}")
    assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-6, what="tree decode lse")


def test_plain_paged_decode_is_the_same_contract():
    q, k, v, tables, lens, P = tree_case(SHAPES[1], 1, torch.float32)
    out, lse = paged_decode(q.to(DEV), k.to(DEV), v.to(DEV), tables, lens)
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
    ref, ref_lse = paged_attention_ref(q.float(), k.float(), v.float(), tables, cu, kv_lens)
    out, lse = paged_extend(q.to(DEV), k.to(DEV), v.to(DEV), tables.to(DEV), cu.to(DEV), kv_lens.to(DEV))
    assert_close(out.cpu(), ref, **TOL[dtype], what="extend out")
    assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-6, what="extend lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_kv_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(20, 3, 8, 48, generator=g).to(dtype)  # head_dim 48: not a power of two
    v_cache = torch.randn(20, 3, 8, 48, generator=g).to(dtype)
    T = 37
    slots = torch.randperm(20 * 8, generator=g)[:T]
    pages, offsets = slots // 8, slots % 8
    k = torch.randn(T, 3, 48, generator=g).to(dtype)
    v = torch.randn(T, 3, 48, generator=g).to(dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    append_kv_ref(ref_k, ref_v, k, v, pages, offsets)
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


# ------------------------------------------------------------------------------ engine level

@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama3_rope_gqa3", vocab=160, layers=2)


def test_engine_greedy_parity_with_torch_backend(hf):
    prompts = [[5, 9, 33, 7, 100], list(range(10, 31)), [42]]
    outs = {}
    for backend in ("torch", "triton"):
        eng = Engine.from_model(hf, num_pages=256, page_size=4, attention_backend=backend, device=DEV)
        assert eng.backend.name == backend
        outs[backend] = eng.generate(prompts, SamplingParams(n=3, temperature=0.0, max_tokens=12, ignore_eos=True))
    for a, b in zip(outs["torch"], outs["triton"]):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), atol=1e-4)


def test_engine_tree_parity_with_torch_backend(hf):
    prompts = [[5, 9, 33, 7, 100], list(range(10, 31))]
    cfg = TreeConfig(segment_len=4, max_depth=3, max_width=6, branch_factor=2, rep_count=0, seed=3)
    trees = {}
    for backend in ("torch", "triton"):
        eng = Engine.from_model(hf, num_pages=1024, page_size=4, attention_backend=backend, device=DEV)
        eng.eos_token_ids = set(range(1, 20))
        trees[backend] = TreeSampler(eng, cfg).sample(prompts, SamplingParams(seed=3, temperature=1.0))
        assert eng.kv.num_used == 0
    for a, b in zip(trees["torch"], trees["triton"]):
        assert [(x.token_ids, x.finish_reason, x.from_fallback) for x in a.leaves] == \
               [(x.token_ids, x.finish_reason, x.from_fallback) for x in b.leaves]
        for la, lb in zip(a.leaves, b.leaves):
            assert_close(torch.tensor(lb.logprobs), torch.tensor(la.logprobs), atol=1e-4)


# ------------------------------------------------------------------------------ GPU only

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads", [(32, 8, 128), (28, 4, 128), (32, 32, 128), (9, 3, 64)])
def test_gpu_bf16_large_tree(heads):
    """64 leaves sharing a 2048-token prefix with 256-token own suffixes, bf16, page 16."""
    from treepo.kv_cache import PagedKVCache

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
    from treepo_kernels.triton_tree_decode import tile_for, work_items

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

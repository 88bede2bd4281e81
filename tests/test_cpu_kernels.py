"""The C++ CPU kernels (csrc/, torch.ops.treepo) against the plain-PyTorch references, and the
engine with attention_backend="cpu" against the torch backend."""
import pytest
import torch
from helpers import assert_close, tiny_hf_model
from kernel_cases import (
    EXTRA_SHAPES,
    TOL,
    append_case,
    assert_greedy_parity,
    assert_tree_parity,
    extend_case,
    tree_case,
)
from test_tree_plan import SHAPES

from treepo import Engine, TreeConfig
from treepo_kernels import cpu as kernels
from treepo_kernels import paged_attention_ref
from treepo_kernels.tree_decode import tree_decode_ref
from treepo_kernels.tree_plan import plan_tree

ok, why = kernels.status()
pytestmark = pytest.mark.skipif(not ok, reason=why)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# beyond the shared grids: the C++ kernels keep row accumulators in registers only for head dims
# 32 / 64 / 128; any other head dim takes the generic loop. And pages of a single token.
CPU_SHAPES = [  # (Hq, Hkv, D, page_size, prompt_len, depth, branch, seg_len)
    (6, 2, 80, 4, 9, 2, 3, 5),  # head dim 80: the generic path
    (9, 3, 96, 1, 7, 2, 3, 4),  # head dim 96, page size 1
    (24, 3, 80, 16, 70, 1, 40, 3),  # generic path with 40 leaves under one node (> one task's leaf tile)
    (8, 2, 64, 1, 3, 2, 2, 2),  # page size 1 on the register path
]
TREE_SHAPES = SHAPES + EXTRA_SHAPES + CPU_SHAPES
EXTEND_HEADS = [(4, 4, 32, 4), (9, 3, 64, 16), (8, 2, 128, 8), (8, 1, 64, 16), (16, 2, 32, 4),  # (Hq, Hkv, D, P)
                (6, 2, 80, 4), (9, 3, 96, 1), (16, 2, 96, 16), (4, 4, 32, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("min_fanout", [2, 3, 10**9])
@pytest.mark.parametrize("case", range(len(TREE_SHAPES)))
def test_tree_decode_matches_reference(case, min_fanout, dtype):
    shape = TREE_SHAPES[case]
    q, k, v, tables, lens, P = tree_case(shape, case, dtype)
    for max_unit_pages in (None, 2):
        plan = plan_tree(tables, lens, P, min_fanout=min_fanout, max_unit_pages=max_unit_pages)
        out, lse = kernels.tree_decode(q, k, v, plan)
        ref, ref_lse = tree_decode_ref(q.float(), k.float(), v.float(), plan)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_close(out, ref, **TOL[dtype], what=f"tree decode out {shape}")
        assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6, what="tree decode lse")


def test_zero_length_unit_contributes_nothing():
    """A unit of 0 tokens (a hand-made plan: the planner never emits one) gives LSE -inf and does
    not change the merged result."""
    q, k, v, tables, lens, P = tree_case(SHAPES[1], 0, torch.float32)
    plan = plan_tree(tables, lens, P)
    ref, ref_lse = kernels.tree_decode(q, k, v, plan)
    # prepend an empty unit (no pages) for leaf 0 and make it leaf 0's first partial
    empty = plan_tree(tables, lens, P)
    n0 = int(plan.unit_leaf_ptr[-1])
    empty.unit_page_ptr = torch.cat([plan.unit_page_ptr[:1], plan.unit_page_ptr])
    empty.unit_len = torch.cat([torch.zeros(1, dtype=torch.int32), plan.unit_len])
    empty.unit_start = torch.cat([torch.zeros(1, dtype=torch.int32), plan.unit_start])
    empty.unit_leaf_ptr = torch.cat([torch.zeros(1, dtype=torch.int32), plan.unit_leaf_ptr + 1])
    empty.unit_leaves = torch.cat([torch.zeros(1, dtype=torch.int32), plan.unit_leaves])
    parts = [[0] + [int(x) + 1 for x in plan.leaf_parts[plan.leaf_part_ptr[0]:plan.leaf_part_ptr[1]]]]
    for b in range(1, plan.num_leaves):
        parts.append([int(x) + 1 for x in plan.leaf_parts[plan.leaf_part_ptr[b]:plan.leaf_part_ptr[b + 1]]])
    empty.leaf_parts = torch.tensor([x for p in parts for x in p], dtype=torch.int32)
    empty.leaf_part_ptr = torch.tensor([0] + [len(p) for p in parts], dtype=torch.int32).cumsum(0).int()
    assert int(empty.unit_leaf_ptr[-1]) == n0 + 1
    out, lse = kernels.tree_decode(q, k, v, empty)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", EXTEND_HEADS)
@pytest.mark.parametrize("seed", range(3))
def test_paged_extend_matches_reference(heads, seed, dtype):
    q, k, v, tables, cu, kv_lens = extend_case(seed, *heads, dtype)
    out, lse = kernels.paged_extend(q, k, v, tables, cu, kv_lens)
    ref, ref_lse = paged_attention_ref(q.float(), k.float(), v.float(), tables, cu, kv_lens)
    assert_close(out, ref, **TOL[dtype], what="extend out")
    assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6, what="extend lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, page_size", [(32, 8), (80, 8), (96, 1), (32, 1)])
def test_append_kv_matches_reference(D, page_size, dtype):
    k_cache, v_cache, k, v, pages, offsets, ref_k, ref_v = append_case(D, dtype, page_size)
    kernels.append_kv(k_cache, v_cache, k, v, pages, offsets)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_bad_input_is_a_clear_error_and_changes_nothing():
    k_cache = torch.zeros(4, 2, 4, 8)
    v_cache = torch.zeros(4, 2, 4, 8)
    k = torch.ones(2, 2, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.append_kv(k_cache, v_cache, k, k, torch.tensor([0, 4]), torch.tensor([0, 0]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.append_kv(k_cache, v_cache, k, k, torch.tensor([0, 1]), torch.tensor([0, 4]))
    assert not k_cache.any() and not v_cache.any()  # checked before anything is written
    plan = plan_tree([[0, 1], [0, 9]], [6, 7], 4)
    with pytest.raises(RuntimeError, match="page id 9"):
        kernels.tree_decode(torch.ones(2, 4, 8), k_cache, v_cache, plan)
    with pytest.raises(RuntimeError, match="multiple"):
        kernels.tree_decode(torch.ones(2, 3, 8), k_cache, v_cache, plan_tree([[0, 1], [0, 2]], [6, 7], 4))
    with pytest.raises(RuntimeError, match="pages in its table"):
        kernels.paged_extend(torch.ones(3, 4, 8), k_cache, v_cache, torch.tensor([[0]]), torch.tensor([0, 3]),
                             torch.tensor([9]))


def test_bit_identical_across_runs_and_thread_counts():
    q, k, v, tables, lens, P = tree_case(EXTRA_SHAPES[1], 1, torch.bfloat16)
    plan = plan_tree(tables, lens, P)
    qe, ke, ve, te, cu, kl = extend_case(2, 9, 3, 64, 16, torch.bfloat16)
    qg, kg, vg, tg, lg, Pg = tree_case(CPU_SHAPES[2], 2, torch.bfloat16)  # the generic head-dim path
    plan_g = plan_tree(tg, lg, Pg)
    qx, kx, vx, tx, cux, klx = extend_case(3, 9, 3, 96, 1, torch.bfloat16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2, 1):
            torch.set_num_threads(threads)
            results.append(kernels.tree_decode(q, k, v, plan) + kernels.paged_extend(qe, ke, ve, te, cu, kl)
                           + kernels.tree_decode(qg, kg, vg, plan_g) + kernels.paged_extend(qx, kx, vx, tx, cux, klx))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ------------------------------------------------------------------------------ engine level

@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama3_rope_gqa3", vocab=160, layers=2)


def test_engine_greedy_parity_with_torch_backend(hf):
    assert_greedy_parity(hf, "cpu", max_tokens=24)


def test_engine_tree_parity_with_torch_backend(hf):
    cfg = TreeConfig(segment_len=5, max_depth=4, max_width=8, branch_factor=2, rep_count=0, seed=3)
    assert_tree_parity(hf, "cpu", cfg, num_pages=4096)


def test_auto_picks_cpu_backend_on_cpu(hf):
    assert Engine.from_model(hf, num_pages=16, page_size=4).backend.name == "cpu"

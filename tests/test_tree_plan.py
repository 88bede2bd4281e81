"""Tree planner and tree-decode reference on trees grown with real KV-cache forks."""
import random

import pytest
import torch
from helpers import assert_close

from treepo.engine.kv_cache import PagedKVCache
from treepo_kernels import paged_attention_ref
from treepo_kernels.tree_decode import tree_decode_ref
from treepo_kernels.tree_plan import plan_tree


def grow_tree(kv, seed, prompt_len, depth, branch, seg_len):
    """Random tree: a prompt, then levels of forks with segments of random length."""
    r = random.Random(seed)
    root = []
    kv.grow(root, prompt_len)
    rows = [(root, prompt_len)]
    for _ in range(depth):
        new_rows = []
        for table, L in rows:
            nkids = r.randint(1, branch)
            kids = kv.fork(table, L, nkids - 1) + [table]
            for t in kids:
                n = r.randint(0, seg_len)
                kv.grow(t, L + n)
                new_rows.append((t, L + n))
        rows = new_rows
    return [t for t, _ in rows], [max(L, 1) for _, L in rows]


SHAPES = [  # (Hq, Hkv, D, page_size, prompt_len, depth, branch, seg_len)
    (4, 4, 32, 4, 1, 0, 1, 0),  # single leaf, single token
    (9, 3, 64, 16, 37, 2, 3, 20),  # SmolLM2 heads, forks mid-page
    (8, 1, 32, 4, 16, 3, 2, 4),  # MQA, prompt exactly full pages, zero-length segments possible
    (16, 2, 128, 8, 5, 5, 2, 9),  # deep chain-ish unbalanced
    (32, 4, 64, 16, 64, 1, 8, 33),  # wide fan-out
]


@pytest.mark.parametrize("min_fanout", [2, 3, 10**9])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_tree_decode_ref_matches_paged_attention(shape, min_fanout):
    Hq, Hkv, D, P, prompt, depth, branch, seg = SHAPES[shape]
    kv = PagedKVCache(1, Hkv, D, num_pages=4096, page_size=P)
    kv._free = torch.randperm(4096, generator=torch.Generator().manual_seed(shape)).tolist()  # shuffled
    tables, lens = grow_tree(kv, shape, prompt, depth, branch, seg)
    kv.k.normal_()
    kv.v.normal_()
    plan = plan_tree(tables, lens, P, min_fanout=min_fanout)
    assert plan.path_tokens == sum(lens)
    if min_fanout >= 10**9:
        assert plan.num_units == len(lens)  # plain paged decode: one unit per row
    q = torch.randn(len(lens), Hq, D)
    out, lse = tree_decode_ref(q, kv.k[0], kv.v[0], plan)
    B = len(lens)
    bt = torch.zeros(B, max(len(t) for t in tables), dtype=torch.int32)
    for b, t in enumerate(tables):
        bt[b, :len(t)] = torch.tensor(t)
    ref, ref_lse = paged_attention_ref(q, kv.k[0], kv.v[0], bt, torch.arange(B + 1), torch.tensor(lens))
    assert_close(out, ref, atol=1e-5, what="tree decode out")
    assert_close(lse, ref_lse, atol=1e-5, what="tree decode lse")


def test_plan_reads_shared_prefix_once():
    kv = PagedKVCache(1, 1, 2, num_pages=4400, page_size=16)
    root = []
    kv.grow(root, 2048)
    tables, lens = [], []
    for t in kv.fork(root, 2048, 64):
        kv.grow(t, 2048 + 1024)
        tables.append(t)
        lens.append(2048 + 1024)
    kv.free(root)
    plan = plan_tree(tables, lens, 16)
    assert plan.num_units == 65 and plan.unique_tokens == 2048 + 64 * 1024
    assert plan.path_tokens / plan.unique_tokens == pytest.approx(2.9, abs=0.05)  # docs/kernels.md: the most it saves
    split = plan_tree(tables, lens, 16, max_unit_pages=32)
    assert split.num_units == 2048 // 512 + 64 * 2 and split.max_unit_pages == 32
    plain = plan_tree(tables, lens, 16, min_fanout=65)
    assert plain.num_units == 64 and plain.unique_tokens == plain.path_tokens


def test_plan_rejects_shared_partial_page():
    with pytest.raises(ValueError, match="only full pages may be shared"):
        plan_tree([[0, 1], [0, 1]], [20, 30], 16)

"""Tree advantage, GRPO / REINFORCE++ baselines and whitening against hand-computed values
(docs/algorithm.md section 2), and whitening across a real 2-process gloo group."""
import os
import random
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close

from treepo.advantages import (
    broadcast_to_tokens,
    grpo_advantages,
    reinforce_pp_baseline_advantages,
    tree_advantages,
    whiten,
)
from treepo.losses import token_count_for_step
from treepo.rollout.tree import Leaf, Tree, TreeStats, trees_to_batch

# --------------------------------------------------------------------------- the hand-worked tree
# Prompt 0 (node ids per tree; node 0 is the root):
#
#   root ─ 1 ─ 3 ─ 5      L0  R =  1
#          │   └── 6      L1  R = -1
#          ├── 4          L2  R =  1
#          └── 7 ─ 8      L4  R = 0.5   (fallback: cut L0 at depth 1, new child 7 of node 1)
#   root ─ 2              L3  R = -1    (depth 1: root group only)
#   root ─ 9 ─ 10         L5  R = -1    (fallback from the root; its depth-1 group is a singleton)
#
# Root group: all six, mean = (1 - 1 + 1 - 1 + 0.5 - 1) / 6 = -1/12.
# G(node 1, depth 1) = {L0, L1, L2, L4}: mean (1 - 1 + 1 + 0.5) / 4 = 0.375, size 4.
# G(node 3, depth 2) = {L0, L1}: mean 0, size 2.  G(node 7) = {L4}, G(node 9) = {L5}: singletons.
# Depth-3 nodes (5, 6, 8) and L2's node 4 / L3's node 2 are the leaves' own last nodes: excluded.
# a_{i,k} = R_i - mean:  L0: 13/12, 5/8, 1   L1: -11/12, -11/8, -1   L2: 13/12, 5/8
#                        L3: -11/12          L4: 7/12, 1/8            L5: -11/12
P0_PATHS = [[1, 3, 5], [1, 3, 6], [1, 4], [2], [1, 7, 8], [9, 10]]
P0_R = [1.0, -1.0, 1.0, -1.0, 0.5, -1.0]

P0_EXPECTED = {
    # average = mean of the included a's
    ("average", True, None): [(13 / 12 + 5 / 8 + 1) / 3, (-11 / 12 - 11 / 8 - 1) / 3, (13 / 12 + 5 / 8) / 2,
                              -11 / 12, (7 / 12 + 1 / 8) / 2, -11 / 12],  # 65/72, -79/72, 41/48, ., 17/48, .
    # size_weighted: weights 6 (root), 4 (node 1), 2 (node 3)
    ("size_weighted", True, None): [(6 * 13 / 12 + 4 * 5 / 8 + 2 * 1) / 12,  # 11/12
                                    (6 * -11 / 12 + 4 * -11 / 8 + 2 * -1) / 12,  # -13/12
                                    (6 * 13 / 12 + 4 * 5 / 8) / 10,  # 0.9
                                    -11 / 12,
                                    (6 * 7 / 12 + 4 * 1 / 8) / 10,  # 0.4
                                    -11 / 12],
    # no root: L3 and L5 have no group of size > 1 -> 0
    ("average", False, None): [(5 / 8 + 1) / 2, (-11 / 8 - 1) / 2, 5 / 8, 0.0, 1 / 8, 0.0],
    # subgroups capped at depth 1: node 3 is dropped
    ("average", True, 1): [(13 / 12 + 5 / 8) / 2, (-11 / 12 - 11 / 8) / 2, (13 / 12 + 5 / 8) / 2,
                           -11 / 12, (7 / 12 + 1 / 8) / 2, -11 / 12],
    # cap 0: the root group only = R - mean
    ("average", True, 0): [13 / 12, -11 / 12, 13 / 12, -11 / 12, 7 / 12, -11 / 12],
}


@pytest.mark.parametrize("key", list(P0_EXPECTED), ids=str)
def test_tree_advantages_hand_computed(key):
    aggregation, root, cap = key
    A = tree_advantages(torch.tensor(P0_R), P0_PATHS, torch.zeros(6, dtype=torch.long), aggregation=aggregation,
                        include_root=root, max_subgroup_depth=cap)
    assert A.dtype == torch.float32 and A.shape == (6,)
    assert_close(A, torch.tensor(P0_EXPECTED[key]), atol=1e-6, what=str(key))


def test_tree_advantages_spot_values():
    """The fractions of the comments above, written out."""
    A = tree_advantages(torch.tensor(P0_R, dtype=torch.float64), P0_PATHS, torch.zeros(6, dtype=torch.long))
    assert A.dtype == torch.float64
    assert_close(A, torch.tensor([65 / 72, -79 / 72, 41 / 48, -11 / 12, 17 / 48, -11 / 12], dtype=torch.float64),
                 atol=1e-12)
    S = tree_advantages(torch.tensor(P0_R), P0_PATHS, torch.zeros(6, dtype=torch.long), aggregation="size_weighted")
    assert_close(S, torch.tensor([0.916667, -1.083333, 0.9, -0.916667, 0.4, -0.916667]), atol=1e-6)


# Prompt "flat-sub": M0 [1,2,3] R=1, M1 [1,2,4] R=1, M2 [1,5] R=-1, M3 [6,7] R=-1.
# Root mean 0; G(node 1) = {M0, M1, M2} mean 1/3; G(node 2) = {M0, M1} all 1 (flat); G(node 6) singleton.
# Without rejection: M0 = (1 + 2/3 + 0) / 3 = 5/9; M2 = (-1 - 4/3) / 2 = -7/6; M3 = -1.
# reject_flat_subgroups drops node 2: M0 = (1 + 2/3) / 2 = 5/6.
FLAT_PATHS = [[1, 2, 3], [1, 2, 4], [1, 5], [6, 7]]
FLAT_R = [1.0, 1.0, -1.0, -1.0]


@pytest.mark.parametrize("reject, expected", [(False, [5 / 9, 5 / 9, -7 / 6, -1.0]),
                                              (True, [5 / 6, 5 / 6, -7 / 6, -1.0])])
def test_reject_flat_subgroups(reject, expected):
    A = tree_advantages(torch.tensor(FLAT_R), FLAT_PATHS, torch.zeros(4, dtype=torch.long),
                        reject_flat_subgroups=reject)
    assert_close(A, torch.tensor(expected), atol=1e-6)


def test_all_equal_rewards_give_exact_zero_and_groups_are_per_prompt():
    """Three prompts in one shuffled batch; prompt 7 reuses prompt 0's node ids with rewards all 0.1
    (whose mean is not exactly 0.1 in floating point): its advantages are exactly 0, and it does
    not leak into prompt 0's groups."""
    rows = [(0, j, p, r) for j, (p, r) in enumerate(zip(P0_PATHS, P0_R))]
    rows += [(7, j, p, 0.1) for j, p in enumerate(([1, 3, 5], [1, 3, 6], [1, 4]))]
    rows += [(3, j, p, r) for j, (p, r) in enumerate(zip(FLAT_PATHS, FLAT_R))]
    random.Random(0).shuffle(rows)
    A = tree_advantages(torch.tensor([r for *_, r in rows]), [p for _, _, p, _ in rows],
                        torch.tensor([g for g, *_ in rows]))
    expect = {0: P0_EXPECTED[("average", True, None)], 3: [5 / 9, 5 / 9, -7 / 6, -1.0], 7: [0.0] * 3}
    for a, (g, j, _, _) in zip(A.tolist(), rows):
        assert a == pytest.approx(expect[g][j], abs=1e-6)
    assert all(a == 0.0 for a, (g, *_) in zip(A.tolist(), rows) if g == 7)  # exactly
    # every aggregation / option keeps a flat prompt at exactly 0
    for kw in (dict(aggregation="size_weighted"), dict(include_root=False), dict(reject_flat_subgroups=True)):
        B = tree_advantages(torch.full((3,), 0.1), [[1, 3, 5], [1, 3, 6], [1, 4]], torch.zeros(3, dtype=torch.long),
                            **kw)
        assert B.tolist() == [0.0, 0.0, 0.0], kw


def test_depth_one_paths_reduce_to_group_mean_baseline():
    """Sequential sampling (every leaf one segment) has only the root group: A = R - mean_g,
    the REINFORCE++-baseline advantage."""
    R = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 0.25])
    p = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    A = tree_advantages(R, [[i] for i in range(7)], p)
    # group 0 mean -1/3, group 1 mean 1/3, group 2 = one leaf -> 0
    expected = torch.tensor([4 / 3, -2 / 3, -2 / 3, 2 / 3, 2 / 3, -4 / 3, 0.0])
    assert_close(A, expected, atol=1e-6)
    assert_close(reinforce_pp_baseline_advantages(R, p), expected, atol=1e-6)


def _reference(R, paths, pidx, aggregation, include_root, reject_flat, cap):
    """Straight from the spec's definitions, by scanning all leaves for every group."""
    out = []
    for i, path in enumerate(paths):
        terms = []
        top = len(path) - 1 if cap is None else min(len(path) - 1, cap)
        for k in range(0, top + 1):
            members = [j for j in range(len(paths)) if pidx[j] == pidx[i]
                       and (k == 0 or (len(paths[j]) >= k and paths[j][k - 1] == path[k - 1]))]
            vals = [R[j] for j in members]
            if k == 0 and not include_root:
                continue
            if k >= 1 and (len(members) < 2 or (reject_flat and len(set(vals)) == 1)):
                continue
            terms.append((len(members), R[i] - sum(vals) / len(vals)))
        if not terms:
            out.append(0.0)
        elif aggregation == "average":
            out.append(sum(a for _, a in terms) / len(terms))
        else:
            out.append(sum(n * a for n, a in terms) / sum(n for n, _ in terms))
    return out


def _random_forest(rng, n_prompts):
    paths, pidx = [], []
    for g in range(n_prompts):
        next_id = [1]

        def grow(prefix, depth):
            if depth >= 1 and (depth == 4 or rng.random() < 0.3):
                paths.append(prefix)
                pidx.append(g)
                return
            for _ in range(rng.choice([1, 2, 2, 3])):
                nid = next_id[0]
                next_id[0] += 1
                grow(prefix + [nid], depth + 1)

        grow([], 0)
    return paths, pidx


@pytest.mark.parametrize("seed", range(4))
def test_tree_advantages_match_reference_on_random_trees(seed):
    rng = random.Random(seed)
    paths, pidx = _random_forest(rng, 4)
    R = [rng.choice([1.0, -1.0, -1.0, 0.5]) for _ in paths]
    for aggregation in ("average", "size_weighted"):
        for root in (True, False):
            for reject in (False, True):
                for cap in (None, 1, 2):
                    A = tree_advantages(torch.tensor(R, dtype=torch.float64), paths, torch.tensor(pidx),
                                        aggregation=aggregation, include_root=root, reject_flat_subgroups=reject,
                                        max_subgroup_depth=cap)
                    ref = torch.tensor(_reference(R, paths, pidx, aggregation, root, reject, cap), dtype=torch.float64)
                    assert_close(A, ref, atol=1e-12, what=f"{aggregation} root={root} reject={reject} cap={cap}")


def test_tree_advantages_from_trees_to_batch():
    """The keys the trainer passes: trees_to_batch's "paths" and "prompt_index" (two trees whose
    node ids collide)."""
    def tree(paths):
        leaves = [Leaf(token_ids=[5, 6], logprobs=[-0.1, -0.2], path=p, finish_reason="eos",
                       from_fallback=(p == [1, 7, 8])) for p in paths]
        return Tree(prompt_token_ids=[1, 2, 3], nodes=[], leaves=leaves, stats=TreeStats())

    batch = trees_to_batch([tree(P0_PATHS), tree(FLAT_PATHS)])
    R = torch.tensor(P0_R + FLAT_R)
    A = tree_advantages(R, batch["paths"], batch["prompt_index"])
    assert_close(A, torch.tensor(P0_EXPECTED[("average", True, None)] + [5 / 9, 5 / 9, -7 / 6, -1.0]), atol=1e-6)


def test_tree_advantages_errors_name_the_input():
    with pytest.raises(ValueError, match="aggregation='mean'"):
        tree_advantages(torch.zeros(2), [[1], [2]], torch.zeros(2, dtype=torch.long), aggregation="mean")
    with pytest.raises(ValueError, match="3 paths for 2 rewards"):
        tree_advantages(torch.zeros(2), [[1], [2], [3]], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_index has shape"):
        tree_advantages(torch.zeros(2), [[1], [2]], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="leaf 1 is nan"):
        tree_advantages(torch.tensor([0.0, float("nan")]), [[1], [2]], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_subgroup_depth=-1"):
        tree_advantages(torch.zeros(2), [[1], [2]], torch.zeros(2, dtype=torch.long), max_subgroup_depth=-1)


# --------------------------------------------------------------------------- GRPO

def test_grpo_advantages_hand_computed():
    # group 0: R = 1, -1, 1: mean 1/3, unbiased std sqrt(((2/3)^2 + (4/3)^2 + (2/3)^2) / 2) = sqrt(4/3)
    # group 5: a single response -> 0; group 2: equal rewards -> 0
    R = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, 0.5])
    p = torch.tensor([0, 0, 0, 5, 2, 2])
    s = (4 / 3) ** 0.5
    A = grpo_advantages(R, p)
    assert_close(A, torch.tensor([(2 / 3) / (s + 1e-6), (-4 / 3) / (s + 1e-6), (2 / 3) / (s + 1e-6), 0, 0, 0]),
                 atol=1e-6)
    assert_close(A[:3], torch.tensor([0.577350, -1.154700, 0.577350]), atol=1e-5)
    B = grpo_advantages(R, p, use_std=False)
    assert_close(B, torch.tensor([2 / 3, -4 / 3, 2 / 3, 0, 0, 0]), atol=1e-6)
    assert_close(reinforce_pp_baseline_advantages(R, p), B, atol=0)


# --------------------------------------------------------------------------- whitening

def test_whiten_hand_computed():
    # valid values 1, 2, 4: mean 7/3, Bessel variance (16/9 + 1/9 + 25/9) / 2 = 7/3
    v = torch.tensor([[1.0, 2.0, 100.0], [4.0, -50.0, 7.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = whiten(v, m)
    sd = (7 / 3 + 1e-8) ** 0.5
    expected = torch.tensor([[(1 - 7 / 3) / sd, (2 - 7 / 3) / sd, 0.0], [(4 - 7 / 3) / sd, 0.0, 0.0]])
    assert_close(out, expected, atol=1e-6)
    assert_close(out[m.bool()], torch.tensor([-0.872872, -0.218218, 1.091089]), atol=1e-6)
    assert out.dtype == torch.float32


def test_whiten_is_token_weighted():
    """A long response counts once per token: whitening the token-level advantages of two leaves
    with 3 and 1 tokens is whitening the multiset {a, a, a, b}."""
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = whiten(broadcast_to_tokens(adv, mask), mask)
    flat = torch.tensor([1.0, 1.0, 1.0, -1.0])  # mean 0.5, Bessel var (3 * 0.25 + 2.25) / 3 = 1
    expected = (flat - 0.5) / (1.0 + 1e-8) ** 0.5
    assert_close(out[mask.bool()], expected, atol=1e-6)


def test_whiten_edge_cases():
    assert whiten(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)  # a rank without data
    one = whiten(torch.tensor([[3.0, 9.0]]), torch.tensor([[1, 0]]))  # one token: var 0 -> 0
    assert one.tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match=r"values \(2, 3\) and mask \(2, 4\)"):
        whiten(torch.zeros(2, 3), torch.zeros(2, 4))


def test_broadcast_to_tokens():
    out = broadcast_to_tokens(torch.tensor([0.5, -2.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert out.tolist() == [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="adv \\(3,\\), mask \\(2, 3\\)"):
        broadcast_to_tokens(torch.zeros(3), torch.zeros(2, 3))


# --------------------------------------------------------------------------- 2 ranks (gloo)

def _shards():
    g = torch.Generator().manual_seed(1)
    v0, v1 = torch.randn(3, 6, generator=g) * 2 + 1, torch.randn(2, 6, generator=g) - 3
    m0 = (torch.arange(6)[None] < torch.tensor([[6], [2], [4]])).long()
    m1 = (torch.arange(6)[None] < torch.tensor([[5], [1]])).long()
    return (v0, m0), (v1, m1)


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        v, m = _shards()[rank]
        res = {"whiten": whiten(v, m)}
        # rank 1 has no data this time: both still take part in the collective
        v_e, m_e = (v, m) if rank == 0 else (torch.zeros(0, 6), torch.zeros(0, 6, dtype=torch.long))
        res["whiten_empty_peer"] = whiten(v_e, m_e)
        res["tokens"] = token_count_for_step([m[:1], m[1:]] if rank == 0 else [m])
        res["tokens_none"] = token_count_for_step([] if rank == 1 else [m])
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_whiten_across_two_ranks_equals_concatenation():
    (v0, m0), (v1, m1) = _shards()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), d), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    full = whiten(torch.cat([v0, v1]), torch.cat([m0, m1]))
    assert_close(torch.cat([r0["whiten"], r1["whiten"]]), full, atol=1e-6, what="2-rank whiten")
    assert_close(r0["whiten_empty_peer"], whiten(v0, m0), atol=1e-6, what="whiten with an empty rank")
    assert r1["whiten_empty_peer"].shape == (0, 6)
    total = int(m0.sum() + m1.sum())  # 12 + 6 = 18
    assert r0["tokens"] == r1["tokens"] == total == 18
    assert r0["tokens_none"] == r1["tokens_none"] == int(m0.sum()) == 12

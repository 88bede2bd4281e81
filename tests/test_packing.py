"""pack_trees: what each leaf sees, its positions and predecessors, and bad trees (treepo/train/batch.py)."""
import copy
import random

import pytest
import torch
from tree_cases import KINDS, build_tree, random_tree

from treepo.rollout.tree import trees_to_batch
from treepo.train.batch import pack_trees, packed_size, plan_micro_batches


def leaf_rows(trees):
    return [(t, leaf) for t in trees for leaf in t.leaves]


def brute_mask(pb):
    """mask[i, j] from first principles: j <= i and j lies on the path from the tree's start to i
    (the path = what the last token of some leaf through i sees)."""
    T = pb.tokens
    m = torch.zeros(T, T, dtype=torch.bool)
    vis = pb.visible_end.tolist()
    for j in range(T):
        for i in range(j, vis[j]):
            m[i, j] = True
    return m


@pytest.mark.parametrize("share", ["tree", "prompt"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_leaf_sees_exactly_its_prompt_and_response(kind, share):
    rng = random.Random(hash((kind, share)) % 1000)
    for _ in range(4):
        trees = [random_tree(rng, kind) for _ in range(rng.randint(1, 3))]
        pb = pack_trees(trees, share)
        mask = pb.mask()
        assert pb.n_leaves == sum(len(t.leaves) for t in trees)
        assert pb.leaf_tokens == sum(len(t.prompt_token_ids) + len(lf.token_ids) for t, lf in leaf_rows(trees))
        assert pb.tokens == sum(packed_size(t, share) for t in trees)
        assert pb.seq_offsets.tolist()[-1] == pb.tokens
        for r, (t, leaf) in enumerate(leaf_rows(trees)):
            sel = pb.pair_row == r
            assert pb.pair_pos[sel].tolist() == list(range(len(leaf.token_ids)))
            u = pb.pair_unique[sel]
            assert pb.labels[u].tolist() == leaf.token_ids
            assert torch.equal(pb.input_ids[pb.target_index[u]], pb.labels[u])
            # the keys the leaf's last token sees: its prompt and its response, in order, at positions 0..
            if not len(u):  # a leaf of zero tokens (empty segments only): nothing to score
                continue
            end = int(pb.target_index[u[-1]])
            seen = mask[end].nonzero()[:, 0]
            assert pb.input_ids[seen].tolist() == t.prompt_token_ids + leaf.token_ids
            assert pb.position_ids[seen].tolist() == list(range(len(seen)))
            # the hidden state predicting response token k is the key just before it on the path
            Lp = len(t.prompt_token_ids)
            assert pb.pred_index[u].tolist() == seen[Lp - 1:-1].tolist()
        # no query sees another tree; the interval test equals the definition
        off = pb.seq_offsets.tolist()
        for a, b in zip(off, off[1:]):
            assert not mask[a:b, :a].any() and not mask[a:b, b:].any()
        assert torch.equal(mask, brute_mask(pb))


def test_unique_tokens_once_and_prompt_sharing_counts():
    rng = random.Random(3)
    trees = [random_tree(rng, "random") for _ in range(5)]
    tree, prompt = pack_trees(trees, "tree"), pack_trees(trees, "prompt")
    nodes = sum(len(n.token_ids) for t in trees for n in t.nodes)
    assert tree.target_index.numel() == nodes  # every node segment once (all nodes lie on a leaf path)
    assert prompt.target_index.numel() == sum(len(lf.token_ids) for t in trees for lf in t.leaves)
    assert tree.pair_unique.numel() == prompt.pair_unique.numel() == prompt.target_index.numel()
    assert tree.tokens <= prompt.tokens < prompt.leaf_tokens + 1


def test_sequential_group_is_a_depth_one_tree_sharing_its_prompt():
    rng = random.Random(0)
    star = random_tree(rng, "star")
    pb = pack_trees([star], "tree")
    assert pb.tokens == len(star.prompt_token_ids) + sum(len(lf.token_ids) for lf in star.leaves)
    assert torch.equal(pb.input_ids, pack_trees([star], "prompt").input_ids)


def test_scatter_gives_the_padded_layout_and_sums_gradients_of_shared_tokens():
    rng = random.Random(1)
    trees = [random_tree(rng, "deep"), random_tree(rng, "fallbackk")]
    pb = pack_trees(trees)
    b = trees_to_batch(trees)
    width = b["responses"].shape[1]
    got = pb.scatter(pb.labels, width)
    assert torch.equal(got, b["responses"] * b["response_mask"])
    x = torch.randn(pb.target_index.numel(), requires_grad=True)
    pb.scatter(x, width).sum().backward()
    uses = torch.bincount(pb.pair_unique, minlength=x.numel()).float()
    assert torch.equal(x.grad, uses) and uses.max() > 1


def test_plan_micro_batches():
    assert plan_micro_batches([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]
    assert plan_micro_batches([], 5) == []
    assert plan_micro_batches([7], 1) == [[0]]  # larger than the budget: its own micro-batch
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="micro_batch_tokens"):
            plan_micro_batches([1], bad)


def test_bad_trees_are_clear_errors_naming_the_tree():
    rng = random.Random(2)
    good = random_tree(rng, "random")
    with pytest.raises(ValueError, match="no trees"):
        pack_trees([])
    with pytest.raises(ValueError, match="share="):
        pack_trees([good], "leaf")
    empty = build_tree([5, 6], [], rng)
    with pytest.raises(ValueError, match="tree 1 has no leaves"):
        pack_trees([good, empty])
    no_prompt = copy.deepcopy(good)
    no_prompt.prompt_token_ids = []
    with pytest.raises(ValueError, match="tree 0 has an empty prompt"):
        pack_trees([no_prompt])
    wrong_tokens = copy.deepcopy(good)
    wrong_tokens.leaves[0].token_ids = wrong_tokens.leaves[0].token_ids + [7]
    with pytest.raises(ValueError, match="tree 0 leaf 0: its .* response tokens differ"):
        pack_trees([wrong_tokens])
    wrong_path = copy.deepcopy(good)
    wrong_path.leaves[-1].path = list(reversed(wrong_path.leaves[-1].path)) + [len(good.nodes) + 3]
    with pytest.raises(ValueError, match="not a root-to-node chain"):
        pack_trees([wrong_path])
    orphan = copy.deepcopy(good)
    orphan.nodes[1].parent = 99
    with pytest.raises(ValueError, match="node 1's parent 99"):
        pack_trees([orphan])


def test_the_docs_example():
    """docs/training.md section 10's picture: prompt p0-p2; A = a0 a1 with children C = c0 c1 and
    D = d0; B = b0 under the prompt."""
    t = build_tree([10, 11, 12], [(0, [20, 21], False), (1, [30, 31], False), (1, [40], False),
                                  (0, [50], False)], random.Random(0))
    pb = pack_trees([t])
    assert pb.input_ids.tolist() == [10, 11, 12, 20, 21, 30, 31, 40, 50]
    assert pb.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 5, 3]
    assert pb.visible_end.tolist() == [9, 9, 9, 8, 8, 7, 7, 8, 9]
    assert pb.pred_index.tolist() == [2, 3, 4, 5, 4, 2]  # a0<-p2 a1<-a0 c0<-a1 c1<-c0 d0<-a1 b0<-p2
    assert pb.pair_unique.tolist() == [0, 1, 2, 3, 0, 1, 4, 5]
    assert (pb.tokens, pb.leaf_tokens) == (9, 17)
    assert pb.mask()[7].tolist() == [1, 1, 1, 1, 1, 0, 0, 1, 0]  # d0 sees p, a; not C
    assert pb.mask()[8].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 1]  # b0 sees only the prompt

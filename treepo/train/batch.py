"""Tree-packed training batches: every unique token of a tree goes through the trainer once.

The sampler shares a tree's prompt and segments in the KV cache; `trees_to_batch` flattens each
tree back into one padded row per leaf, so a trainer that uses it recomputes the prompt and every
shared segment once per leaf. `pack_trees` keeps the tree (docs/training.md section 10):

- per tree, the prompt once, then each node's segment once in depth-first order; trees follow
  each other in one flat token sequence;
- per token, its position id along its own path (what RoPE saw while sampling) and `visible_end`:
  key j is visible to query i iff j <= i < visible_end[j]. Depth-first order puts a node's subtree
  right after it, so visible_end[j] is the end of the subtree of j's node, and the test says "j's
  node is an ancestor-or-self of i's node, and within one node j comes first" - an interval test,
  no [T, T] mask needed (`PackedBatch.mask()` builds it for the reference);
- per unique response token, the packed index of the hidden state that predicts it: the previous
  token of its node, or for a node's first token the last token of its parent (a parent's last
  state serves every child; an empty parent passes on its own parent's);
- per (leaf, token) pair, the unique token it reads, so each leaf keeps its own advantage and the
  DAPO token-mean counts pairs exactly as the padded layout counts valid tokens.

share="prompt" shares only the prompt (each leaf one child segment of it, like verl's
PrefixGrouper); packing "none" is the padded per-leaf layout of `trees_to_batch`, the reference.
Fallback leaves need nothing special: a continuation forked from a depth-k node is a child of that
node, and a sequential group (W i.i.d. samples) is a depth-1 tree whose prompt is shared.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from treepo.rollout.tree import Tree

PACKINGS = ("tree", "prompt", "none")
"""TrainConfig.packing: "tree" shares every common prefix, "prompt" only the prompt, "none" pads one
row per leaf (the reference, and what trainers without tree support compute)."""

SHARES = ("tree", "prompt")


@dataclass
class PackedBatch:
    """Some trees packed into one flat sequence of T tokens (U unique response tokens, P (leaf,
    token) pairs, n_leaves leaves in tree order then leaf order). All tensors int64."""

    input_ids: torch.Tensor  # [T] token ids: per tree, the prompt, then node segments depth-first
    position_ids: torch.Tensor  # [T] position along the token's own path (the prompt starts at 0)
    visible_end: torch.Tensor  # [T] key j is visible to queries j <= i < visible_end[j]
    seq_offsets: torch.Tensor  # [S + 1] packed start of each tree (attention never crosses them)
    target_index: torch.Tensor  # [U] packed index of each unique response token
    pred_index: torch.Tensor  # [U] packed index of the hidden state that predicts it
    labels: torch.Tensor  # [U] its token id (input_ids[target_index])
    pair_unique: torch.Tensor  # [P] the unique token (index into U) of each (leaf, token) pair
    pair_row: torch.Tensor  # [P] the pair's leaf (0 .. n_leaves - 1)
    pair_pos: torch.Tensor  # [P] the token's position in that leaf's response
    n_leaves: int
    leaf_tokens: int  # sum over leaves of prompt + response length: an unpadded per-leaf layout's tokens

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name),
                                                                                     torch.Tensor)
                              else getattr(self, f.name) for f in fields(self)})

    def mask(self) -> torch.Tensor:
        """[T, T] bool, mask[i, j] = query i sees key j: the dense reference of visible_end."""
        i = torch.arange(self.tokens, device=self.visible_end.device)
        return (i[None, :] <= i[:, None]) & (i[:, None] < self.visible_end[None, :])

    def scatter(self, per_unique: torch.Tensor, width: int) -> torch.Tensor:
        """[n_leaves, width]: per_unique [U] copied to every (leaf, token) pair that reads it, 0 elsewhere
        (differentiable: a shared token's gradient is the sum over the leaves that contain it)."""
        longest = int(self.pair_pos.max()) + 1 if self.pair_pos.numel() else 0
        if width < longest:
            raise ValueError(f"scatter: width={width} < the longest response ({longest})")
        out = per_unique.new_zeros(self.n_leaves, width)
        return out.index_put((self.pair_row, self.pair_pos), per_unique[self.pair_unique])


def _check_tree(t: int, tree: Tree):
    """The tree's leaves agree with its nodes (else a clear error naming tree t and the leaf)."""
    if not tree.leaves:
        raise ValueError(f"tree {t} has no leaves: nothing to train on (drop it before packing)")
    if not tree.prompt_token_ids:
        raise ValueError(f"tree {t} has an empty prompt: its first response token has no predecessor")
    nodes = tree.nodes
    if not nodes or nodes[0].parent is not None:
        raise ValueError(f"tree {t}: nodes[0] must be the root (parent None), got {nodes[:1]}")
    for k, n in enumerate(nodes):
        if n.id != k:
            raise ValueError(f"tree {t}: nodes[{k}] has id {n.id}; node ids must equal their index")
        if k and not (isinstance(n.parent, int) and 0 <= n.parent < len(nodes) and k in nodes[n.parent].children):
            raise ValueError(f"tree {t}: node {k}'s parent {n.parent} is not a node that lists it as a child")
    for r, leaf in enumerate(tree.leaves):
        if not leaf.path:
            raise ValueError(f"tree {t} leaf {r} has an empty path; a leaf ends at a node of depth >= 1")
        prev = 0
        for k in leaf.path:
            if not (isinstance(k, int) and 0 < k < len(nodes)) or nodes[k].parent != prev:
                raise ValueError(f"tree {t} leaf {r}: path {leaf.path} is not a root-to-node chain "
                                 f"(node {k} is not a child of node {prev})")
            prev = k
        seg = [x for k in leaf.path for x in nodes[k].token_ids]
        if seg != list(leaf.token_ids):
            raise ValueError(f"tree {t} leaf {r}: its {len(leaf.token_ids)} response tokens differ from the "
                             f"{len(seg)} tokens of the nodes on its path {leaf.path}")


def _structure(tree: Tree, share: str) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(children, segments, leaf paths) of the packing: the tree's nodes on some leaf's path, or
    (share="prompt") one child segment of the root per leaf."""
    if share == "prompt":
        segments = [[]] + [list(leaf.token_ids) for leaf in tree.leaves]
        return [list(range(1, len(segments)))] + [[] for _ in tree.leaves], segments, \
            [[r + 1] for r in range(len(tree.leaves))]
    used = {k for leaf in tree.leaves for k in leaf.path}
    children = [[c for c in n.children if c in used] for n in tree.nodes]
    return children, [list(n.token_ids) for n in tree.nodes], [list(leaf.path) for leaf in tree.leaves]


def packed_size(tree: Tree, share: str = "tree") -> int:
    """Tokens this tree takes in a PackedBatch (its micro-batching cost)."""
    if share == "prompt":
        return len(tree.prompt_token_ids) + sum(len(leaf.token_ids) for leaf in tree.leaves)
    used = {k for leaf in tree.leaves for k in leaf.path}
    return len(tree.prompt_token_ids) + sum(len(tree.nodes[k].token_ids) for k in used)


def pack_trees(trees: list[Tree], share: str = "tree") -> PackedBatch:
    """Pack trees (share "tree": every common prefix once; "prompt": only the prompt) - see the module doc."""
    if share not in SHARES:
        raise ValueError(f"share={share!r}; valid: {', '.join(SHARES)}")
    if not trees:
        raise ValueError("pack_trees: no trees")
    for t, tree in enumerate(trees):
        _check_tree(t, tree)
    ids, pos, vis, seq_off = [], [], [], []
    tgt, pred, pair_u, pair_r, pair_p = [], [], [], [], []
    leaf_tokens, row0 = 0, 0
    for tree in trees:
        children, segments, paths = _structure(tree, share)
        base = len(ids)
        seq_off.append(base)
        prompt = tree.prompt_token_ids
        ids += prompt
        pos += range(len(prompt))
        vis += [0] * len(prompt)  # set to the tree's end below
        last = {0: base + len(prompt) - 1}  # node -> packed index of the last token on the path to it
        start = {}  # node -> packed index of its first token
        uid = {}  # packed index -> unique-token index
        stack = [(c, 0, len(prompt)) for c in reversed(children[0])]  # (node, parent, its first position)
        open_nodes = []  # (node, first packed index) whose subtree end is not known yet
        while stack:
            node, parent, depth_pos = stack.pop()
            first = len(ids)
            seg = segments[node]
            start[node] = first
            parent_last = last[parent]
            for i in range(len(seg)):
                q = first + i
                uid[q] = len(tgt)
                tgt.append(q)
                pred.append(parent_last if i == 0 else q - 1)
            ids += seg
            pos += range(depth_pos, depth_pos + len(seg))
            vis += [0] * len(seg)
            last[node] = first + len(seg) - 1 if seg else parent_last
            open_nodes.append(node)
            stack += [(c, node, depth_pos + len(seg)) for c in reversed(children[node])]
        end = len(ids)
        vis[base:base + len(prompt)] = [end] * len(prompt)
        for node in open_nodes:  # subtree end: the first packed index after its last descendant
            e = _subtree_end(node, children, start, segments)
            vis[start[node]:start[node] + len(segments[node])] = [e] * len(segments[node])
        for r, path in enumerate(paths):
            p = 0
            for node in path:
                for i in range(len(segments[node])):
                    pair_u.append(uid[start[node] + i])
                    pair_r.append(row0 + r)
                    pair_p.append(p)
                    p += 1
            leaf_tokens += len(prompt) + p
        row0 += len(paths)
    seq_off.append(len(ids))
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    input_ids = long(ids)
    target = long(tgt)
    return PackedBatch(input_ids, long(pos), long(vis), long(seq_off), target, long(pred), input_ids[target],
                       long(pair_u), long(pair_r), long(pair_p), row0, leaf_tokens)


def _subtree_end(node: int, children: list[list[int]], start: dict, segments: list[list[int]]) -> int:
    """Packed index just past node's last descendant (depth-first: the last child's subtree end)."""
    while children[node]:
        node = children[node][-1]
    return start[node] + len(segments[node])


def plan_micro_batches(costs: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of item indices whose costs sum to at most `budget` tokens; an item costing
    more than the budget gets a micro-batch of its own (a tree is never split: splitting it would
    recompute its shared context in every part)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"micro_batch_tokens={budget!r}; it must be an integer >= 1 (tokens per forward)")
    groups: list[list[int]] = []
    used = 0
    for i, c in enumerate(costs):
        if groups and used + c <= budget:
            groups[-1].append(i)
            used += c
        else:
            groups.append([i])
            used = c
    return groups

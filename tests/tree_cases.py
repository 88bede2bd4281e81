"""Random TreePO trees for packing tests: every shape the sampler can produce, and some it rarely does.

`random_tree(rng, kind)` builds a valid `Tree` (leaves agree with their nodes): kinds are "random"
(any shape), "chain" (one path), "star" (depth 1: a sequential group), "deep" (deep and thin),
"fallback0" / "fallbackk" (a fallback leaf forked from the prompt / from a depth-k node), "single"
(one leaf), "tiny" (zero-length and 1-token segments). Token ids are in [3, vocab).
"""
from __future__ import annotations

import random

from treepo.rollout.tree import Leaf, Node, Tree, TreeStats

KINDS = ("random", "chain", "star", "deep", "fallback0", "fallbackk", "single", "tiny")


def _segment(rng: random.Random, lo: int, hi: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]


def build_tree(prompt: list[int], edges: list[tuple[int, list[int], bool]], rng: random.Random) -> Tree:
    """A Tree from (parent id, segment tokens, from_fallback) per node 1..n (parents before children);
    every node without children ends a leaf."""
    nodes = [Node(0, None, 0)]
    for parent, seg, fb in edges:
        n = Node(len(nodes), parent, nodes[parent].depth + 1, list(seg),
                 [-rng.random() * 3 for _ in seg], from_fallback=fb)
        nodes[parent].children.append(n.id)
        nodes.append(n)
    leaves = []
    for n in nodes[1:]:
        if n.children:
            continue
        path, cur = [], n
        while cur.id != 0:
            path.append(cur.id)
            cur = nodes[cur.parent]
        path.reverse()
        ids = [t for k in path for t in nodes[k].token_ids]
        lps = [lp for k in path for lp in nodes[k].logprobs]
        n.finish_reason = "eos"
        leaves.append(Leaf(ids, lps, path, "eos", from_fallback=any(nodes[k].from_fallback for k in path),
                           model_logprobs=list(lps)))
    return Tree(list(prompt), nodes, leaves, TreeStats())


def random_tree(rng: random.Random, kind: str = "random", vocab: int = 160, seg: int = 6,
                max_prompt: int = 9) -> Tree:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; valid: {', '.join(KINDS)}")
    prompt = _segment(rng, 1, max_prompt, vocab)
    edges: list[tuple[int, list[int], bool]] = []

    def add(parent, lo=1, hi=seg, fb=False):
        edges.append((parent, _segment(rng, lo, hi, vocab), fb))
        return len(edges)

    if kind == "single":
        add(0)
    elif kind == "chain":
        p = 0
        for _ in range(rng.randint(2, 5)):
            p = add(p)
    elif kind == "star":
        for _ in range(rng.randint(2, 6)):
            add(0)
    elif kind == "deep":
        p = 0
        for _ in range(rng.randint(5, 9)):
            nxt = add(p)
            if rng.random() < 0.5:
                add(p)  # a short side branch
            p = nxt
    elif kind == "tiny":
        p = add(0, 0, 1)
        add(p, 0, 0)
        q = add(p, 1, 1)
        add(q, 0, 1)
        add(q, 1, 1)
        add(0, 0, 1)
    else:  # random / fallbacks
        frontier = [0]
        for _ in range(rng.randint(1, 10)):
            frontier.append(add(rng.choice(frontier), 0 if rng.random() < 0.15 else 1))
        if kind == "fallback0":
            add(0, fb=True)
        elif kind == "fallbackk":
            internal = sorted({parent for parent, _, _ in edges if parent != 0}) or [1]
            p = add(rng.choice(internal), fb=True)
            add(p, fb=True)
    return build_tree(prompt, edges, rng)

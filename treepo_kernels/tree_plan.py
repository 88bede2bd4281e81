"""Host-side planner for tree-aware decode: find the shared KV of a batch and cut it into work.

The tree is read off the block tables themselves: the KV cache only ever shares *full* pages (a
fork copies the partial tail), so two decode rows share a page exactly when they share a prefix
node of the sampling tree. Inserting every row's page list into a trie and compressing chains
whose leaf set does not change gives the tree's nodes: a run of pages and the rows (leaves)
below it. A shared node's KV then needs to be read once per step for all its leaves
(docs/kernels.md, "Tree planner").

Output: work *units*, each = (a run of pages holding `unit_len` tokens, the leaves that attend to
it). A unit produces one partial (output, LSE) per leaf; each leaf merges its partials in a fixed
order (root first) - deterministic, no atomics. Two levers:
- `min_fanout`: a node with fewer leaves is folded into its children (they re-read its pages
  inside their own unit) - re-reading is cheaper than one more partial when little is shared;
  min_fanout=2 keeps every shared node, a huge value gives plain paged decode (one unit per row).
- `max_unit_pages`: long nodes are split into chunks (split-KV) to fill a GPU.
Built once per step on the host and reused by every layer.

`plan_chunked` is the batch-invariant planner (docs/kernels.md, "Batch invariance"): every row's
keys are cut at fixed positions (chunks of `chunk_pages` pages), a unit is one chunk's pages and
every row that holds exactly those pages, so shared chunks are still read once for all sharers, yet
each row's partials cover the same key ranges whatever else is in the batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .common import cdiv


@dataclass
class TreePlan:
    """Flat int32 CSR arrays (torch tensors on `device`), one entry set per unit / leaf.

    Unit u covers pages unit_pages[unit_page_ptr[u]:unit_page_ptr[u+1]] holding unit_len[u]
    tokens (every page full except maybe the last) and serves leaves
    unit_leaves[unit_leaf_ptr[u]:unit_leaf_ptr[u+1]]; the pair (u, i-th leaf) owns partial slot
    unit_leaf_ptr[u] + i. Leaf b merges partial slots leaf_parts[leaf_part_ptr[b]:leaf_part_ptr[b+1]]
    (root first). `unit_start[u]` is the token offset of the unit's first page in its leaves."""

    unit_page_ptr: torch.Tensor
    unit_pages: torch.Tensor
    unit_len: torch.Tensor
    unit_start: torch.Tensor
    unit_leaf_ptr: torch.Tensor
    unit_leaves: torch.Tensor
    leaf_part_ptr: torch.Tensor
    leaf_parts: torch.Tensor
    num_leaves: int
    max_unit_leaves: int
    max_unit_pages: int
    max_leaf_parts: int
    unique_tokens: int  # sum of unit_len: KV tokens read per head per layer
    path_tokens: int  # sum of kv_lens: what plain paged decode reads

    def to(self, device, non_blocking: bool = True) -> "TreePlan":
        """The same plan with its arrays on `device` (plan on the host, then one copy each)."""
        moved = {f: getattr(self, f).to(device, non_blocking=non_blocking) for f in _ARRAYS}
        return dataclasses.replace(self, **moved)

    @property
    def num_units(self) -> int:
        return self.unit_len.numel()

    @property
    def num_parts(self) -> int:
        return self.unit_leaves.numel()


_ARRAYS = ("unit_page_ptr", "unit_pages", "unit_len", "unit_start", "unit_leaf_ptr", "unit_leaves",
           "leaf_part_ptr", "leaf_parts")


def _flatten(units, leaf_units, kv_lens, device) -> TreePlan:
    """TreePlan from units [(pages, ntok, start, leaves)] and each leaf's unit ids (merged by start)."""
    unit_page_ptr, unit_pages, unit_len, unit_start, unit_leaf_ptr, unit_leaves = [0], [], [], [], [0], []
    for pages, ntok, start, leaves in units:
        unit_pages += pages
        unit_page_ptr.append(len(unit_pages))
        unit_len.append(ntok)
        unit_start.append(start)
        unit_leaves += leaves
        unit_leaf_ptr.append(len(unit_leaves))
    slot = {}
    for u, (_, _, _, leaves) in enumerate(units):
        for i, b in enumerate(leaves):
            slot[(u, b)] = unit_leaf_ptr[u] + i
    leaf_part_ptr, leaf_parts = [0], []
    for b, us in enumerate(leaf_units):
        us = sorted(us, key=lambda u: units[u][2])  # root first
        covered = sum(units[u][1] for u in us)
        assert covered == kv_lens[b], f"row {b}: units cover {covered} of {kv_lens[b]} tokens"
        leaf_parts += [slot[(u, b)] for u in us]
        leaf_part_ptr.append(len(leaf_parts))

    def t(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return TreePlan(t(unit_page_ptr), t(unit_pages), t(unit_len), t(unit_start), t(unit_leaf_ptr),
                    t(unit_leaves), t(leaf_part_ptr), t(leaf_parts), len(kv_lens),
                    max((len(u[3]) for u in units), default=0), max((len(u[0]) for u in units), default=0),
                    max((len(x) for x in leaf_units), default=0), sum(unit_len), sum(kv_lens))


def plan_chunked(block_tables: list[list[int]], kv_lens: list[int], page_size: int, chunk_pages: int,
                 device="cpu") -> TreePlan:
    """The batch-invariant plan: row b's keys [c*C, (c+1)*C), C = chunk_pages * page_size, form one
    partial per chunk c whatever the batch; the rows holding the same pages for a chunk share its
    unit (one read). With `tree_decode(..., fixed=True)` a row's output depends on its query and
    keys alone and equals `paged_extend(..., chunk=C)` bit for bit."""
    P, C = page_size, chunk_pages * page_size
    assert len(block_tables) == len(kv_lens) and chunk_pages >= 1
    units, by_pages = [], {}  # by_pages: a chunk's page ids -> its unit
    leaf_units: list[list[int]] = [[] for _ in kv_lens]
    for b, (table, L) in enumerate(zip(block_tables, kv_lens)):
        assert L >= 1, f"row {b} has kv_len {L}"
        n_pages = cdiv(L, P)
        assert len(table) >= n_pages, f"row {b}: {len(table)} pages for {L} tokens"
        for c in range(cdiv(L, C)):
            pages = tuple(table[c * chunk_pages:min((c + 1) * chunk_pages, n_pages)])
            ntok = min(C, L - c * C)
            u = by_pages.get(pages)
            if u is None:
                u = by_pages[pages] = len(units)
                units.append((list(pages), ntok, c * C, []))
            elif units[u][1] != ntok:
                raise ValueError(f"page {pages[-1]} is shared by rows with different fill ({units[u][1] % P or P} "
                                 f"vs {ntok % P or P} tokens): only full pages may be shared")
            units[u][3].append(b)
            leaf_units[b].append(u)
    return _flatten(units, leaf_units, kv_lens, device)


class _Node:
    __slots__ = ("pages", "ntok", "children", "leaves", "start")

    def __init__(self, start):
        self.pages, self.ntok, self.children, self.leaves, self.start = [], 0, {}, [], start


def plan_tree(block_tables: list[list[int]], kv_lens: list[int], page_size: int, min_fanout: int = 2,
              max_unit_pages: int | None = None, device="cpu") -> TreePlan:
    """Plan the decode of len(kv_lens) rows; row b holds kv_lens[b] tokens in block_tables[b]."""
    P = page_size
    assert len(block_tables) == len(kv_lens) and min_fanout >= 2
    # 1. trie over page ids; a page node remembers which rows pass through it
    root = _Node(0)
    for b, (table, L) in enumerate(zip(block_tables, kv_lens)):
        assert L >= 1, f"row {b} has kv_len {L}"
        n_pages = cdiv(L, P)
        assert len(table) >= n_pages, f"row {b}: {len(table)} pages for {L} tokens"
        node = root
        for i in range(n_pages):
            p = table[i]
            child = node.children.get(p)
            if child is None:
                child = node.children[p] = _Node(i * P)
                child.pages = [p]
                child.ntok = min(P, L - i * P)
            elif child.ntok != min(P, L - i * P):
                raise ValueError(f"page {p} is shared by rows with different fill ({child.ntok} vs "
                                 f"{min(P, L - i * P)} tokens): only full pages may be shared")
            child.leaves.append(b)
            node = child
    # 2. compress: merge a page into its parent when the leaf set is the same; fold nodes with
    #    fewer than min_fanout leaves into their descendants (a leaf's private chain is one unit)
    units = []  # (pages, ntok, start, leaves)
    leaf_units: list[list[int]] = [[] for _ in kv_lens]

    def emit(pages, ntok, start, leaves):
        chunk = max_unit_pages or len(pages)
        for c in range(0, len(pages), chunk):
            sub = pages[c:c + chunk]
            sub_tok = min(ntok - c * P, len(sub) * P)
            u = len(units)
            units.append((sub, sub_tok, start + c * P, leaves))
            for b in leaves:
                leaf_units[b].append(u)

    # iterative DFS; `carry` = pages of folded ancestors not yet emitted
    stack = [(child, [], 0, None) for child in reversed(list(root.children.values()))]
    while stack:
        node, carry, carry_tok, carry_start = stack.pop()
        pages, ntok = carry + node.pages, carry_tok + node.ntok
        start = node.start if carry_start is None else carry_start
        # extend the run down a chain of single children with the same leaf set
        while len(node.children) == 1:
            (only,) = node.children.values()
            if len(only.leaves) != len(node.leaves):
                break
            node = only
            pages, ntok = pages + node.pages, ntok + node.ntok
        if not node.children:  # a leaf row's end
            emit(pages, ntok, start, node.leaves)
        elif len(node.leaves) >= min_fanout:
            emit(pages, ntok, start, node.leaves)
            for child in reversed(list(node.children.values())):
                stack.append((child, [], 0, None))
            # rows that end exactly here (their last page is this node's last page)
            ended = set(node.leaves) - {b for c in node.children.values() for b in c.leaves}
            assert not ended or all(kv_lens[b] == ntok + start for b in ended)
        else:
            ended = set(node.leaves) - {b for c in node.children.values() for b in c.leaves}
            for b in ended:  # a row ending here with others continuing: its own unit
                emit(pages, ntok, start, [b])
            for child in reversed(list(node.children.values())):
                stack.append((child, pages, ntok, start))
    return _flatten(units, leaf_units, kv_lens, device)

"""The block plan of the training tree attention (treepo_kernels/tree_attention.py): which
(query block, key block) tiles of a packed micro-batch its kernels visit, built once per
micro-batch and shared by every layer, forward and backward (docs/kernels.md, "Tree attention for
training").

Key j of a packed micro-batch (treepo/train/batch.py) is visible to queries j .. visible_end[j] - 1.
The queries that see any key of a block of consecutive keys therefore form one contiguous range,
and the plan is built from those ranges with a few vectorised torch ops on the device where
visible_end lives, in memory linear in the number of tiles. For each query block: its key blocks
(for the forward and dQ), those that need no mask first; for each key block the transpose (for dK
and dV), cut into work items of at most `max_q_blocks` query blocks, whose partial gradients the
launcher sums in a fixed order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import cdiv

ROWS = 64  # query rows (tokens x packed heads) per program: the default tile (GPU tuning: bench_train_attention.py)
BLOCK_N = 64  # keys per tile
MAX_Q_BLOCKS = 64  # query blocks per dK/dV program before a key block's list is cut into chunks


@dataclass
class TreeAttentionPlan:
    """Block metadata of one micro-batch (int32 tensors on visible_end's device), shared by every
    layer. Query block b holds tokens b * block_q .. +block_q, key block c tokens c * block_n ..
    +block_n. A (query block, key block) tile is visited iff some query of the one sees some key of
    the other; it is *full* when every query sees every key (no mask to compute)."""

    tokens: int  # T
    block_q: int  # query tokens per block (a program's rows are block_q tokens x hpp heads)
    block_n: int  # keys per block
    visible_end: torch.Tensor  # [T] int32
    q_kv_ptr: torch.Tensor  # [nqb + 1]: query block b visits key blocks q_kv[q_kv_ptr[b]:q_kv_ptr[b + 1]]
    q_kv_full: torch.Tensor  # [nqb]: ... of which the first q_kv_full[b] are full
    q_kv: torch.Tensor  # [tiles] key block ids, ascending within the full and within the masked part
    kv_q_ptr: torch.Tensor  # [nkb + 1]: the transpose (key block c is seen by query blocks kv_q[...])
    kv_q_full: torch.Tensor  # [nkb]
    kv_q: torch.Tensor  # [tiles] query block ids
    item_kb: torch.Tensor  # [items] dK/dV work items: key block, ...
    item_start: torch.Tensor  # [items] ... the slice kv_q[item_start:item_end] of its query blocks,
    item_end: torch.Tensor  # [items]
    item_part: torch.Tensor  # [items] -1: write dK/dV directly; else the fp32 partial slot it writes
    split_kb: torch.Tensor  # [n_split] key blocks whose list was cut into chunks, ...
    split_parts: torch.Tensor  # [n_split, max_chunks] ... their partial slots (n_parts = padding)
    n_parts: int
    num_warps: int = 4  # launch parameters of the three kernels
    num_stages: int = 2

    @property
    def tiles(self) -> int:
        """Visited (query block, key block) tiles: the work of each kernel, in tiles."""
        return int(self.q_kv.shape[0])

    def to(self, device) -> "TreeAttentionPlan":
        return TreeAttentionPlan(**{f: (x.to(device) if isinstance(x, torch.Tensor) else x)
                                    for f, x in self.__dict__.items()})


def _lists(major: torch.Tensor, minor: torch.Tensor, full: torch.Tensor, n_major: int, n_minor: int):
    """CSR lists of (major, minor) tile pairs: per major block its minor blocks, full ones first,
    each part ascending. Returns (ptr [n_major + 1], n_full [n_major], idx [pairs]) int32."""
    order = torch.argsort(major * (2 * n_minor) + (~full).long() * n_minor + minor)
    ptr = torch.zeros(n_major + 1, dtype=torch.int64, device=major.device)
    ptr[1:] = torch.bincount(major, minlength=n_major).cumsum(0)
    n_full = torch.bincount(major[full], minlength=n_major)
    return ptr.int(), n_full.int(), minor[order].int()


def plan_tree_attention(visible_end: torch.Tensor, block_q: int = ROWS, block_n: int = BLOCK_N,
                        max_q_blocks: int = MAX_Q_BLOCKS, num_warps: int = 4,
                        num_stages: int = 2) -> TreeAttentionPlan:
    """The plan of `tree_attention` for one packed micro-batch: visible_end [T] int (a PackedBatch's,
    on the device the kernels run on). block_q: query tokens per block (`tile_for` picks it from the
    heads); block_n: keys per tile; max_q_blocks: the longest list of query blocks one dK/dV program
    walks (longer lists are cut into chunks reduced afterwards); num_warps, num_stages: the
    kernels' launch parameters.

    Key j is seen by the queries [j, visible_end[j]), so key block c is seen by exactly the query
    blocks that meet [c * block_n, max visible_end over c): a contiguous range. The tiles are built
    from those ranges, in memory linear in the number of tiles (no [query blocks, key blocks]
    matrix)."""
    if visible_end.dim() != 1 or visible_end.dtype.is_floating_point or visible_end.shape[0] == 0:
        raise ValueError(f"plan_tree_attention: visible_end must be a non-empty integer [T] tensor, got "
                         f"{visible_end.dtype} {tuple(visible_end.shape)}")
    for name, x in (("block_q", block_q), ("block_n", block_n)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"plan_tree_attention: {name}={x}; it must be a power of two >= 16")
    if max_q_blocks < 1:
        raise ValueError(f"plan_tree_attention: max_q_blocks={max_q_blocks}; it must be >= 1")
    T = visible_end.shape[0]
    dev = visible_end.device
    ve = visible_end.long()
    idx = torch.arange(T, device=dev)
    bad = (ve <= idx) | (ve > T)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise ValueError(f"plan_tree_attention: visible_end[{j}] = {int(ve[j])}; it must lie in ({j}, {T}]")
    nqb, nkb = cdiv(T, block_q), cdiv(T, block_n)
    ks = torch.arange(nkb, device=dev) * block_n
    ke = (ks + block_n).clamp(max=T)
    pad = nkb * block_n - T
    vmax = torch.nn.functional.pad(ve, (0, pad), value=0).view(nkb, block_n).max(1).values
    vmin = torch.nn.functional.pad(ve, (0, pad), value=T + 1).view(nkb, block_n).min(1).values
    lo = ks // block_q  # key block c is seen by query blocks lo[c] .. hi[c] - 1
    hi = (vmax + block_q - 1) // block_q
    counts = hi - lo  # >= 1: every key sees itself
    first = torch.zeros(nkb + 1, dtype=torch.int64, device=dev)
    first[1:] = counts.cumsum(0)
    kb = torch.arange(nkb, device=dev).repeat_interleave(counts)  # [tiles]
    qb = lo[kb] + torch.arange(kb.shape[0], device=dev) - first[kb]
    qs = qb * block_q
    qe = (qs + block_q).clamp(max=T)
    full = (ke[kb] - 1 <= qs) & (vmin[kb] >= qe) & (ke[kb] - ks[kb] == block_n) & (qe - qs == block_q)
    q_kv_ptr, q_kv_full, q_kv = _lists(qb, kb, full, nqb, nkb)
    kv_q_ptr, kv_q_full, kv_q = _lists(kb, qb, full, nkb, nqb)
    chunks = (counts + max_q_blocks - 1) // max_q_blocks  # [nkb]
    item_kb = torch.arange(nkb, device=dev).repeat_interleave(chunks)
    first_item = torch.zeros(nkb + 1, dtype=torch.int64, device=dev)
    first_item[1:] = chunks.cumsum(0)
    within = torch.arange(item_kb.shape[0], device=dev) - first_item[item_kb]  # chunk index
    item_start = kv_q_ptr.long()[item_kb] + within * max_q_blocks
    item_end = torch.minimum(item_start + max_q_blocks, kv_q_ptr.long()[item_kb + 1])
    split = chunks[item_kb] > 1
    n_parts = int(split.sum())
    item_part = torch.full_like(item_kb, -1)
    item_part[split] = torch.arange(n_parts, device=dev)
    split_kb = (chunks > 1).nonzero().flatten()
    max_chunks = int(chunks.max()) if n_parts else 1
    slot = first_item[split_kb][:, None] + torch.arange(max_chunks, device=dev)[None]  # item ids
    in_range = slot < first_item[split_kb + 1][:, None]
    split_parts = torch.where(in_range, item_part[slot.clamp(max=max(item_kb.shape[0] - 1, 0))], n_parts)
    i32 = torch.int32
    return TreeAttentionPlan(T, block_q, block_n, ve.to(i32), q_kv_ptr, q_kv_full, q_kv, kv_q_ptr, kv_q_full, kv_q,
                             item_kb.to(i32), item_start.to(i32), item_end.to(i32), item_part.to(i32),
                             split_kb.to(i32), split_parts.long(), n_parts, num_warps, num_stages)


def tile_for(num_q_heads: int, num_kv_heads: int, rows: int = ROWS) -> tuple[int, int]:
    """(hpp, block_q): query heads packed per program (the largest power of two dividing g, at most
    8) and query tokens per block, so a program holds `rows` rows (at least 16 tokens)."""
    g = num_q_heads // num_kv_heads
    hpp = 1
    while hpp < 8 and g % (2 * hpp) == 0:
        hpp *= 2
    return hpp, max(16, rows // hpp)

"""attention_backend="triton": the Triton kernels of treepo_kernels/ (the default on CUDA).

Per engine step `plan` runs once on the host: the tree planner over the decode rows' block tables
(shared pages become units read once for all their leaves) and the work items of both kernels,
copied to the device in one go; every layer then launches append + tree decode (two launches) +
extend with that plan. On a CPU the kernels run only under the Triton interpreter
(TRITON_INTERPRET=1, for tests).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from treepo_kernels.extend import ExtendPlan, plan_extend, tree_extend
from treepo_kernels.paged_kv import append_kv
from treepo_kernels.tree_decode import tile_for, tree_decode, work_items
from treepo_kernels.tree_plan import TreePlan, plan_tree
from treepo_kernels.triton_common import TRITON_ERROR

from ..kv_cache import PagedKVCache


@dataclass
class TritonPlan:
    """One step's plan on the device, shared by every layer. Decode (extend) fields are None when
    the step has no decode (extend) rows; a `*_tok` is also None when its rows are all the step's
    tokens (no gather)."""

    tree: TreePlan | None = None  # the decode rows' tree plan (leaf b = b-th decode row)
    items: tuple | None = None  # its work items: (unit, first partial slot) [items] int32 each
    decode_tok: torch.Tensor | None = None  # [B_d] int64: flat token index of each decode row
    extend: ExtendPlan | None = None  # the extend rows' tree-aware extend plan
    extend_tok: torch.Tensor | None = None  # [T_e] int64: flat token index of each extend token


class TritonBackend:
    name = "triton"
    auto_ok = True

    def __init__(self, min_fanout: int = 2, max_unit_pages: int = 64):
        # long nodes are split into chunks of max_unit_pages pages (split-KV) to fill the GPU
        self.min_fanout, self.max_unit_pages = min_fanout, max_unit_pages

    @staticmethod
    def available(device: torch.device) -> tuple[bool, str]:
        if TRITON_ERROR is not None:
            return False, f"not installed ({TRITON_ERROR})"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return True, "interpreter"
        return False, f"needs CUDA (or TRITON_INTERPRET=1 on a CPU), not {device.type}"

    def plan(self, meta, kv: PagedKVCache, num_q_heads: int) -> TritonPlan:
        dev = meta.block_tables.device
        g = num_q_heads // kv.num_kv_heads
        plan = TritonPlan()
        dec, tok = meta.rows(decode=True)
        if dec:
            # planned on the host, then copied once: no device-to-host sync in the step
            tree = plan_tree([meta.tables[b] for b in dec], [meta.kv_lens[b] for b in dec], kv.page_size,
                             min_fanout=self.min_fanout, max_unit_pages=self.max_unit_pages)
            items = work_items(tree, tile_for(tree, g)[1], "cpu")
            plan.tree = tree.to(dev)
            plan.items = tuple(t.to(dev, non_blocking=True) for t in items)
            plan.decode_tok = tok
        ext, tok = meta.rows(decode=False)
        if ext:  # tree-aware extend: a context shared by several rows is read once
            plan.extend = plan_extend([meta.tables[b] for b in ext], [meta.kv_lens[b] for b in ext],
                                      [meta.q_lens[b] for b in ext], kv.page_size, g, dev,
                                      min_fanout=self.min_fanout, max_unit_pages=self.max_unit_pages)
            plan.extend_tok = tok
        return plan

    def forward(self, layer: int, q, k, v, meta, kv: PagedKVCache, plan: TritonPlan):
        append_kv(kv.k[layer], kv.v[layer], k, v, meta.slot_pages, meta.slot_offsets)
        q = q.to(kv.k.dtype)
        k_cache, v_cache = kv.k[layer], kv.v[layer]
        both = plan.tree is not None and plan.extend is not None
        out = torch.empty_like(q) if both else None
        if plan.tree is not None:
            qd = q if plan.decode_tok is None else q[plan.decode_tok]
            o = tree_decode(qd.contiguous(), k_cache, v_cache, plan.tree, items=plan.items)[0]
            if out is None:
                return o
            out[plan.decode_tok] = o
        if plan.extend is not None:
            qe = q if plan.extend_tok is None else q[plan.extend_tok]
            o = tree_extend(qe.contiguous(), k_cache, v_cache, plan.extend)[0]
            if out is None:
                return o
            out[plan.extend_tok] = o
        return out

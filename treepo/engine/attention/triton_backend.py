"""attention_backend="triton": the Triton kernels of treepo_kernels/ (the default on CUDA).

Per engine step `plan` runs once on the host: the tree planner over the decode rows' block tables
(shared pages become units read once for all their leaves) and the work items of both kernels,
copied to the device in one go; every layer then launches append + tree decode (two launches) +
extend with that plan. On a CPU the kernels run only under the Triton interpreter
(TRITON_INTERPRET=1, for tests).
"""
from __future__ import annotations

import os

import torch

from treepo_kernels import triton_extend, triton_tree_decode
from treepo_kernels.tree_plan import plan_tree
from treepo_kernels.triton_extend import tree_extend
from treepo_kernels.triton_paged_kv import append_kv
from treepo_kernels.triton_tree_decode import tree_decode

from ..kv_cache import PagedKVCache


class TritonBackend:
    name = "triton"
    auto_ok = True

    def __init__(self, min_fanout: int = 2, max_unit_pages: int = 64):
        # long nodes are split into chunks of max_unit_pages pages (split-KV) to fill the GPU
        self.min_fanout, self.max_unit_pages = min_fanout, max_unit_pages

    @staticmethod
    def available(device: torch.device) -> tuple[bool, str]:
        # (without triton this module does not import: attention.backend_status reports that)
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return True, "interpreter"
        return False, f"needs CUDA (or TRITON_INTERPRET=1 on a CPU), not {device.type}"

    def plan(self, meta, kv: PagedKVCache, num_q_heads: int):
        dev = meta.block_tables.device
        g = num_q_heads // kv.num_kv_heads
        plan = {}
        dec, tok = meta.rows(decode=True)
        if dec:
            # planned on the host, then copied once: no device-to-host sync in the step
            tree = plan_tree([meta.tables[b] for b in dec], [meta.kv_lens[b] for b in dec], kv.page_size,
                             min_fanout=self.min_fanout, max_unit_pages=self.max_unit_pages)
            items = triton_tree_decode.work_items(tree, triton_tree_decode.tile_for(tree, g)[1], "cpu")
            tree = tree.to(dev)
            items = tuple(t.to(dev, non_blocking=True) for t in items)
            plan["decode"] = (tree, items, tok)
        ext, tok = meta.rows(decode=False)
        if ext:  # tree-aware extend: a context shared by several rows is read once
            xplan = triton_extend.plan_extend([meta.tables[b] for b in ext], [meta.kv_lens[b] for b in ext],
                                              [meta.q_lens[b] for b in ext], kv.page_size, g, dev,
                                              min_fanout=self.min_fanout, max_unit_pages=self.max_unit_pages)
            plan["extend"] = (xplan, tok)
        return plan

    def forward(self, layer: int, q, k, v, meta, kv: PagedKVCache, plan):
        append_kv(kv.k[layer], kv.v[layer], k, v, meta.slot_pages, meta.slot_offsets)
        q = q.to(kv.k.dtype)
        out = None if len(plan) == 1 else torch.empty_like(q)
        if "decode" in plan:
            tree, items, tok = plan["decode"]
            qd = q if tok is None else q[tok]
            o = tree_decode(qd.contiguous(), kv.k[layer], kv.v[layer], tree, items=items)[0]
            if out is None:
                return o
            out[tok] = o
        if "extend" in plan:
            xplan, tok = plan["extend"]
            qe = q if tok is None else q[tok]
            o = tree_extend(qe.contiguous(), kv.k[layer], kv.v[layer], xplan)[0]
            if out is None:
                return o
            out[tok] = o
        return out

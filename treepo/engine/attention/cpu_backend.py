"""attention_backend="cpu": the C++ kernels of csrc/ (tree-aware decode, paged extend, append).

Decode rows go through the tree planner (treepo_kernels/tree_plan.py) once per step: pages that
several rows share (the prompt, shared segments of a tree) are read and converted once per layer
for all those rows. Extend rows (prefill, recompute, fallback re-runs) use the paged extend kernel.
"""
from __future__ import annotations

import torch

from treepo_kernels import cpu as kernels
from treepo_kernels.tree_plan import plan_tree

from ..kv_cache import PagedKVCache


class CpuBackend:
    name = "cpu"
    auto_ok = True

    def __init__(self, min_fanout: int = 2):
        self.min_fanout = min_fanout

    @staticmethod
    def available(device: torch.device) -> tuple[bool, str]:
        if device.type != "cpu":
            return False, f"the C++ kernels run on the CPU, not {device.type}"
        return kernels.status()

    def plan(self, meta, kv: PagedKVCache, num_q_heads: int):
        plan = {}
        dec, tok = meta.rows(decode=True)
        if dec:
            tree = plan_tree([meta.tables[b] for b in dec], [meta.kv_lens[b] for b in dec], kv.page_size,
                             min_fanout=self.min_fanout)
            plan["decode"] = (tree, tok)
        ext, tok = meta.rows(decode=False)
        if ext:
            q_lens = torch.tensor([meta.q_lens[b] for b in ext])
            cu = torch.zeros(len(ext) + 1, dtype=torch.int64)
            cu[1:] = q_lens.cumsum(0)
            plan["extend"] = (meta.block_tables[ext].contiguous(), cu,
                              torch.tensor([meta.kv_lens[b] for b in ext], dtype=torch.int64), tok)
        return plan

    def forward(self, layer: int, q, k, v, meta, kv: PagedKVCache, plan):
        kernels.append_kv(kv.k[layer], kv.v[layer], k, v, meta.slot_pages, meta.slot_offsets)
        q = q.to(kv.k.dtype)
        if len(plan) == 1:  # one kind of row: no gather / scatter
            if "decode" in plan:
                return kernels.tree_decode(q, kv.k[layer], kv.v[layer], plan["decode"][0])[0]
            tables, cu, kv_lens, _ = plan["extend"]
            return kernels.paged_extend(q, kv.k[layer], kv.v[layer], tables, cu, kv_lens)[0]
        out = torch.empty_like(q)
        tree, tok = plan["decode"]
        out[tok] = kernels.tree_decode(q[tok], kv.k[layer], kv.v[layer], tree)[0]
        tables, cu, kv_lens, tok = plan["extend"]
        out[tok] = kernels.paged_extend(q[tok], kv.k[layer], kv.v[layer], tables, cu, kv_lens)[0]
        return out

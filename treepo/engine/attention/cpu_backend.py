"""attention_backend="cpu": the C++ kernels of csrc/ (tree-aware decode, paged extend, append).

Decode rows go through the tree planner (treepo_kernels/tree_plan.py) once per step: pages that
several rows share (the prompt, shared segments of a tree) are read and converted once per layer
for all those rows. Extend rows (prefill, recompute, fallback re-runs) use the paged extend kernel.

Batch-invariant mode (`CpuBackend(chunk_tokens=C)`, EngineConfig.batch_invariant): decode rows are
planned by `plan_chunked` (fixed C-token key chunks; rows holding the same pages in a chunk still
share its read) and run with `fixed=True`; extend rows cut their keys into the same chunks, so a
token's attention is the same bits decoded or recomputed, alone or batched (docs/kernels.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from treepo_kernels import cpu as kernels
from treepo_kernels.tree_plan import TreePlan, plan_chunked, plan_tree

from ..kv_cache import PagedKVCache

INVARIANT_CHUNK_TOKENS = 64  # batch-invariant mode's key chunk (rounded to whole pages, at least one)


@dataclass
class CpuPlan:
    """One step's plan, shared by every layer. Decode (extend) fields are None when the step has no
    decode (extend) rows; a `*_tok` is also None when its rows are all the step's tokens (no gather)."""

    tree: TreePlan | None = None  # the decode rows' tree plan (leaf b = b-th decode row)
    decode_tok: torch.Tensor | None = None  # [B_d] int64: flat token index of each decode row
    block_tables: torch.Tensor | None = None  # [B_e, max_pages] int32: the extend rows' pages
    cu_q: torch.Tensor | None = None  # [B_e + 1] int64: extend row b owns gathered tokens cu_q[b]:cu_q[b+1]
    kv_lens: torch.Tensor | None = None  # [B_e] int64: tokens per extend row, cached + new
    extend_tok: torch.Tensor | None = None  # [T_e] int64: flat token index of each extend token


class CpuBackend:
    name = "cpu"
    auto_ok = True

    def __init__(self, min_fanout: int = 2, chunk_tokens: int = 0):
        self.min_fanout = min_fanout
        self.chunk_tokens = chunk_tokens  # 0: the tree plan; > 0: batch-invariant fixed key chunks

    def chunk_for(self, page_size: int) -> int:
        """The invariant mode's chunk in tokens for a page size (a whole number of pages), 0 when off."""
        return max(1, self.chunk_tokens // page_size) * page_size if self.chunk_tokens else 0

    @staticmethod
    def available(device: torch.device) -> tuple[bool, str]:
        if device.type != "cpu":
            return False, f"the C++ kernels run on the CPU, not {device.type}"
        return kernels.status()

    def plan(self, meta, kv: PagedKVCache, num_q_heads: int) -> CpuPlan:
        plan = CpuPlan()
        dec, tok = meta.rows(decode=True)
        if dec:
            plan.decode_tok = tok
            tables, lens = [meta.tables[b] for b in dec], [meta.kv_lens[b] for b in dec]
            if self.chunk_tokens:
                plan.tree = plan_chunked(tables, lens, kv.page_size, self.chunk_for(kv.page_size) // kv.page_size)
            else:
                plan.tree = plan_tree(tables, lens, kv.page_size, min_fanout=self.min_fanout)
        ext, tok = meta.rows(decode=False)
        if ext:
            plan.extend_tok = tok
            q_lens = torch.tensor([meta.q_lens[b] for b in ext])
            plan.cu_q = torch.zeros(len(ext) + 1, dtype=torch.int64)
            plan.cu_q[1:] = q_lens.cumsum(0)
            plan.block_tables = meta.block_tables[ext].contiguous()
            plan.kv_lens = torch.tensor([meta.kv_lens[b] for b in ext], dtype=torch.int64)
        return plan

    def forward(self, layer: int, q, k, v, meta, kv: PagedKVCache, plan: CpuPlan):
        kernels.append_kv(kv.k[layer], kv.v[layer], k, v, meta.slot_pages, meta.slot_offsets)
        q = q.to(kv.k.dtype)
        k_cache, v_cache = kv.k[layer], kv.v[layer]
        fixed, chunk = self.chunk_tokens > 0, self.chunk_for(kv.page_size)

        def decode(q):
            return kernels.tree_decode(q, k_cache, v_cache, plan.tree, fixed=fixed)[0]

        def extend(q):
            return kernels.paged_extend(q, k_cache, v_cache, plan.block_tables, plan.cu_q, plan.kv_lens,
                                        chunk=chunk)[0]

        if plan.block_tables is None:  # decode rows only: no gather / scatter
            return decode(q)
        if plan.tree is None:  # extend rows only
            return extend(q)
        out = torch.empty_like(q)
        out[plan.decode_tok] = decode(q[plan.decode_tok])
        out[plan.extend_tok] = extend(q[plan.extend_tok])
        return out

"""One batched forward per engine step over all running sequences, prefill and decode mixed.

A Sequence holds its token ids and block table; tokens [num_cached, num_tokens) are "pending":
the next forward writes their KV into pages and returns the logits after the last one.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata, PagedAttention
from .kv_cache import PagedKVCache
from .model import CausalLM
from .sequence import Sequence


class Runner:
    """Owns the model, the KV pool and the attention backend; counts work done."""

    def __init__(self, model: CausalLM, kv: PagedKVCache, backend, device, packed=None):
        self.model, self.kv, self.backend, self.device = model, kv, backend, torch.device(device)
        self.packed = packed  # a PackedModel (CPU, prepacked bf16 GEMMs) or None
        self.counters = {"prefill_tokens": 0, "decode_tokens": 0, "forward_passes": 0}

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence]) -> torch.Tensor:
        """Process every sequence's pending tokens; return fp32 logits [B, V] after each's last.

        Pages for the pending tokens must already be allocated (kv.grow)."""
        ids, pos, q_lens, kv_lens, tables = [], [], [], [], []
        prefill = 0
        for s in seqs:
            n0, n1 = s.num_cached, s.num_tokens
            assert n1 > n0, f"{s} has no pending token"
            assert len(s.table) * self.kv.page_size >= n1, f"{s} has no pages for its pending tokens"
            ids += s.token_ids[n0:n1]
            pos += range(n0, n1)
            q_lens.append(n1 - n0)
            kv_lens.append(n1)
            tables.append(s.table)
            prefill += max(min(n1, s.num_prompt) - n0, 0)
        meta = AttentionMetadata.build(self.kv, tables, q_lens, kv_lens, self.device)
        attn = PagedAttention(self.backend, meta, self.kv, self.model.config.num_heads)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        last = meta.cu_q[1:] - 1
        net = self.model
        if self.packed is not None:  # same call, prepacked CPU GEMMs
            self.packed.refresh()
            net = self.packed
        hidden = net(input_ids, positions, attn=attn)  # [T, hidden]
        logits = net.logits(hidden[last.to(self.device)]).float()  # [B, V]
        for s in seqs:
            s.num_cached = s.num_tokens
        self.counters["prefill_tokens"] += prefill
        self.counters["decode_tokens"] += len(ids) - prefill
        self.counters["forward_passes"] += 1
        return logits

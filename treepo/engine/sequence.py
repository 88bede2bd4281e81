"""A sequence the engine runs: token ids, its KV block table, and the log-probs it sampled.

Tokens [num_cached, num_tokens) are "pending": the next forward writes their KV into pages and
returns the logits after the last one.
"""
from __future__ import annotations

import itertools

_ids = itertools.count()


class Sequence:
    __slots__ = ("seq_id", "token_ids", "num_prompt", "num_cached", "table", "logprobs",
                 "model_logprobs", "finish_reason", "tag")

    def __init__(self, token_ids: list[int], num_prompt: int | None = None, tag=None):
        self.seq_id = next(_ids)
        self.token_ids = list(token_ids)
        self.num_prompt = len(self.token_ids) if num_prompt is None else num_prompt
        self.num_cached = 0  # tokens whose KV is in the pages
        self.table: list[int] = []  # KV block table (page ids)
        self.logprobs: list[float] = []  # one per generated token
        self.model_logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.tag = tag  # caller's bookkeeping (request index, tree node, ...)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    def __repr__(self):
        return (f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, prompt={self.num_prompt}, "
                f"cached={self.num_cached}, pages={len(self.table)})")

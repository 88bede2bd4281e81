"""Which sequences run in each step of Engine.generate: admission, preemption, finishing.

As in nano-vllm's scheduler: prompts wait in order; each step first preempts the newest running
sequences until every other one can grow by a token (their pages are freed and they go back to
the front of the queue, to be recomputed later, so nothing is lost), then admits waiting work
while pages and the max_num_seqs / max_num_batched_tokens budgets allow. A new prompt is
prefilled once and forked into its n samples right after that forward, so its admission reserves
the pages of all n. A lone sequence that cannot fit the whole pool is a KVCacheExhausted error.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from .config import SamplingParams
from .kv_cache import KVCacheExhausted, PagedKVCache
from .sequence import Sequence


class SampleId(NamedTuple):
    """The tag of a generate() sequence: which completion it is, and its random stream
    (seed, prompt, sample, position)."""

    prompt: int  # index of the prompt in the generate() call
    sample: int  # which of the prompt's n samples (a new prompt's own sequence is sample 0)


@dataclass(slots=True)
class Step:
    """What one engine step runs: one forward over `seqs`, then one sampled token each."""

    seqs: list[Sequence]  # the running sequences, then the admitted ones (resumed or new prompts)
    new_prompts: set[int]  # seq_ids of the new prompts among them: fork into n samples after the forward


class Scheduler:
    """The queue of one generate() call over the engine's page pool.

    `schedule()` -> Step; after the forward and sampling, `postprocess(seqs, tokens)` marks the
    finished sequences (returned: the caller frees them) and keeps the rest running.
    `unfinished()` lists what still holds (or may hold) pages, for cleanup on an error."""

    def __init__(self, kv: PagedKVCache, prompts: list[list[int]], params: SamplingParams, stop_ids: set[int],
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.n, self.max_tokens, self.stop_ids = params.n, params.max_tokens, stop_ids
        self.max_model_len = max_model_len
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque(Sequence(p, tag=SampleId(i, 0)) for i, p in enumerate(prompts))
        self._new_prompts = {s.seq_id for s in self.waiting}  # not yet prefilled: admitted with n samples
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Step:
        """Preempt what cannot grow, admit what fits; raise KVCacheExhausted if nothing fits even alone."""
        self._preempt_to_fit()
        admitted = self._admit()
        if not self.running and not admitted:
            n_tok = self.waiting[0].num_tokens
            raise KVCacheExhausted(self.kv.pages_for(n_tok + 1), self.kv.num_free, self.kv.num_pages)
        new = {s.seq_id for s in admitted if s.seq_id in self._new_prompts}
        self._new_prompts -= new
        self.running += admitted
        return Step(list(self.running), new)

    def postprocess(self, seqs: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """Set finish reasons after each sequence's new token; return the finished sequences
        (the caller frees them); the others run in the next step."""
        finished, self.running = [], []
        for s, token in zip(seqs, tokens):
            if token in self.stop_ids:
                s.finish_reason = "stop"
            elif s.num_tokens - s.num_prompt >= self.max_tokens or s.num_tokens >= self.max_model_len:
                s.finish_reason = "length"
            (finished if s.finish_reason else self.running).append(s)
        return finished

    def unfinished(self) -> list[Sequence]:
        return self.running + list(self.waiting)

    # ------------------------------------------------------------------ internals
    def _growth(self, seqs: list[Sequence]) -> int:
        """Pages the sequences need for their pending tokens."""
        return sum(self.kv.growth_needed(s.table, s.num_tokens) for s in seqs)

    def _preempt_to_fit(self):
        """Free the newest running sequences until every other one can grow by a token."""
        while self.running:
            if self._growth(self.running) <= self.kv.num_free or len(self.running) == 1:
                return
            victim = self.running.pop()
            self.kv.free(victim.table)
            victim.num_cached = 0
            self.waiting.appendleft(victim)
            self.num_preemptions += 1

    def _admit(self) -> list[Sequence]:
        """Move waiting prompts / preempted sequences into this step while pages and budgets allow.

        A new prompt reserves its pages, the tail copies of its n-1 forks, and one page of growth
        per sample, so forking right after its prefill cannot fail."""
        admitted: list[Sequence] = []
        free = self.kv.num_free - self._growth(self.running)
        n_seqs = n_tokens = len(self.running)
        while self.waiting:
            seq = self.waiting[0]
            new = seq.seq_id in self._new_prompts
            n_tok = seq.num_tokens
            samples = self.n if new else 1
            pages = self.kv.pages_for(n_tok) + samples
            if new and self.n > 1 and n_tok % self.kv.page_size:
                pages += self.n - 1
            fits = pages <= free and n_seqs + samples <= self.max_num_seqs
            if admitted or self.running:
                fits = fits and n_tokens + n_tok <= self.max_num_batched_tokens
            elif pages > free:  # alone on an empty engine: start it if it fits at all
                fits = self.kv.pages_for(n_tok + 1) <= free
            if not fits:
                break
            admitted.append(self.waiting.popleft())
            free -= pages
            n_seqs += samples
            n_tokens += n_tok
        return admitted

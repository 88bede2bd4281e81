"""Which sequences run in each step of Engine.generate: admission, preemption, finishing.

As in nano-vllm's scheduler: prompts wait in order; each step first preempts the newest running
sequences until every other one can grow by a token (their pages are freed and they go back to
the front of the queue, to be recomputed later, so nothing is lost), then admits waiting work
while pages and the max_num_seqs / max_num_batched_tokens budgets allow.

A prompt and its n samples are a PromptGroup: the prompt is prefilled once and forked into as many
samples as the slots (max_num_seqs) and pages allow right after that forward. If some samples do
not fit, the prompt's sequence is parked - it keeps the prompt's pages and its next-token logits
row - and the rest are forked from it in later steps, as slots free up, before any new work is
admitted (vLLM likewise runs a request's n samples as n sequences under max_num_seqs). Every
sample draws its first token from that same row and then its own random stream, so seeded results
are those of an unconstrained run. A parked prompt is the first thing preempted (it is re-prefilled
when admitted again). A lone sequence that cannot fit the whole pool is a KVCacheExhausted error.
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
    sample: int  # which of the prompt's n samples


class PromptGroup:
    """The samples of one prompt that are not running yet: ids `next` .. `next + left - 1`.

    `seq` is the prompt's sequence. Once prefilled and parked it holds the prompt's pages and
    `row`, its next-token logits [V] (set by the engine); the group's last sample continues `seq`
    itself."""

    __slots__ = ("seq", "next", "left", "row")

    def __init__(self, seq: Sequence, first: int, count: int):
        self.seq, self.next, self.left, self.row = seq, first, count, None


@dataclass(slots=True)
class Fork:
    """Samples `first` .. `first + count - 1` of a group, forked from its sequence this step."""

    group: PromptGroup
    first: int
    count: int
    last: bool  # the group's last samples: its own sequence is the first of them


@dataclass(slots=True)
class Step:
    """What one engine step runs: one forward over `seqs`, then one sampled token for each of
    them except the prompts just prefilled, and for each sample of `forks` (from its prompt's row)."""

    seqs: list[Sequence]  # running sequences, then admitted ones (resumed samples, prompts to prefill)
    forks: list[Fork]  # samples to start after the forward (a prompt prefilled now, or a parked one)


class Scheduler:
    """The queue of one generate() call over the engine's page pool.

    `schedule()` -> Step; after the forward and sampling, `postprocess(seqs, tokens)` marks the
    finished sequences (returned: the caller frees them) and keeps the rest running."""

    def __init__(self, kv: PagedKVCache, prompts: list[list[int]], params: SamplingParams, stop_ids: set[int],
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_tokens, self.stop_ids = params.max_tokens, stop_ids
        self.max_model_len = max_model_len
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        # a PromptGroup (not prefilled) or a preempted sample (recomputed when resumed)
        self.waiting: deque[PromptGroup | Sequence] = deque(
            PromptGroup(Sequence(p, tag=SampleId(i, 0)), 0, params.n) for i, p in enumerate(prompts))
        self.parked: list[PromptGroup] = []  # prefilled, samples left to fork, oldest first
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running and not self.parked

    def schedule(self) -> Step:
        """Preempt what cannot grow, admit what fits; raise KVCacheExhausted if nothing fits even alone."""
        self._preempt_to_fit()
        admitted, forks = self._admit()
        while not (self.running or admitted or forks) and self.parked:
            self._unpark(self.parked.pop())  # parked prompts crowd out the only work left
            admitted, forks = self._admit()
        if not (self.running or admitted or forks):
            n_tok = _seq(self.waiting[0]).num_tokens
            raise KVCacheExhausted(self.kv.pages_for(n_tok + 1), self.kv.num_free, self.kv.num_pages)
        self.running += admitted
        return Step(list(self.running), forks)

    def postprocess(self, seqs: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """Set finish reasons after each sequence's new token; return the finished sequences
        (the caller frees them); the others run in the next step."""
        finished, running = [], []
        for s, token in zip(seqs, tokens):
            if token in self.stop_ids:
                s.finish_reason = "stop"
            elif s.num_tokens - s.num_prompt >= self.max_tokens or s.num_tokens >= self.max_model_len:
                s.finish_reason = "length"
            (finished if s.finish_reason else running).append(s)
        self.running = running
        return finished

    # ------------------------------------------------------------------ internals
    def _growth(self, seqs: list[Sequence]) -> int:
        """Pages the sequences need for their pending tokens."""
        return sum(self.kv.growth_needed(s.table, s.num_tokens) for s in seqs)

    def _preempt_to_fit(self):
        """Unpark prompts, then free the newest running sequences, until every other one can grow."""
        while self.running and self._growth(self.running) > self.kv.num_free:
            if self.parked:
                self._unpark(self.parked.pop())
            elif len(self.running) > 1:
                victim = self.running.pop()
                self.kv.free(victim.table)
                victim.num_cached = 0
                self.waiting.appendleft(victim)
                self.num_preemptions += 1
            else:
                return

    def _unpark(self, g: PromptGroup):
        """Free a parked prompt's pages and row; it waits (first) to be prefilled again."""
        self.kv.free(g.seq.table)
        g.seq.num_cached, g.row = 0, None
        self.waiting.appendleft(g)
        self.num_preemptions += 1

    def _pages(self, g: PromptGroup, k: int, prefill: bool) -> int:
        """Pages k samples of a group take: the prompt's (if prefilled now), one page of growth per
        sample, and a copy of the partial tail page per fork (the last sample is `seq` itself)."""
        n_tok = g.seq.num_tokens
        tails = (k - (k == g.left)) if n_tok % self.kv.page_size else 0
        return (self.kv.pages_for(n_tok) if prefill else 0) + k + tails

    def _samples_that_fit(self, g: PromptGroup, slots: int, free: int, prefill: bool) -> int:
        """Most samples of a group (<= slots) whose pages fit in `free`; 0 if not even one."""
        k = min(g.left, slots)
        if k > 0 and self._pages(g, k, prefill) > free:
            per = 2 if g.seq.num_tokens % self.kv.page_size else 1
            k = min(k, max(free - self._pages(g, 0, prefill), 0) // per)
        return k

    def _take(self, g: PromptGroup, k: int) -> Fork:
        fork = Fork(g, g.next, k, k == g.left)
        g.next, g.left = g.next + k, g.left - k
        return fork

    def _admit(self) -> tuple[list[Sequence], list[Fork]]:
        """Fork samples of parked prompts, then move waiting work into this step while pages and
        budgets allow (in order: the first that does not fit stops admission).

        Pages are reserved for everything a step does before its next one: the prefill, the tail
        copies of the forks and one page of growth per sample, so forking after the forward
        cannot fail."""
        admitted: list[Sequence] = []
        forks: list[Fork] = []
        free = self.kv.num_free - self._growth(self.running)
        n_seqs = n_tokens = len(self.running)
        for g in list(self.parked):  # no forward needed: their first token comes from g.row
            k = self._samples_that_fit(g, self.max_num_seqs - n_seqs, free, prefill=False)
            if not k:
                return admitted, forks
            free -= self._pages(g, k, prefill=False)
            n_seqs += k
            forks.append(self._take(g, k))
            if not g.left:
                self.parked.remove(g)
        while self.waiting:
            item = self.waiting[0]
            n_tok = _seq(item).num_tokens
            alone = not (admitted or forks or self.running)
            if not alone and n_tokens + n_tok > self.max_num_batched_tokens:
                break
            if isinstance(item, PromptGroup):
                k = self._samples_that_fit(item, self.max_num_seqs - n_seqs, free, prefill=True)
                if not k and alone and self.kv.pages_for(n_tok + 1) <= free:
                    k = 1  # start it if its first sample fits at all; the others are prefilled again later
                    if item.left > 1:
                        rest = PromptGroup(Sequence(item.seq.token_ids, tag=item.seq.tag), item.next + 1,
                                           item.left - 1)
                        item.left = 1
                        self.waiting.insert(1, rest)
                if not k:
                    break
                pages = self._pages(item, k, prefill=True)
                forks.append(self._take(item, k))
                if item.left:
                    self.parked.append(item)
                n_seqs += k
            else:  # a preempted sample, recomputed
                pages = self.kv.pages_for(n_tok) + 1
                fits = n_seqs < self.max_num_seqs and pages <= free
                if not fits and not (alone and self.kv.pages_for(n_tok + 1) <= free):
                    break
                n_seqs += 1
            self.waiting.popleft()
            admitted.append(_seq(item))
            free -= pages
            n_tokens += n_tok
        return admitted, forks


def _seq(item: PromptGroup | Sequence) -> Sequence:
    return item.seq if isinstance(item, PromptGroup) else item

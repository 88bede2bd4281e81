"""The public Engine: load a checkpoint, generate completions over the paged KV cache.

`generate` prefills each prompt once, forks it n ways (shared prompt pages) and decodes every
running sequence of every prompt in one batched forward per step. When the page pool runs short
the newest sequences are preempted (pages freed, recomputed later), so nothing is lost; a single
sequence that cannot fit the whole pool is a clear KVCacheExhausted error. The lower-level API
(new_sequence / fork / forward / sample / free) is what the TreePO tree sampler drives.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .attention import make_backend
from .config import SamplingParams
from .kv_cache import KVCacheExhausted, PagedKVCache
from .loader import load_model, load_state
from .model import CausalLM
from .runner import Runner
from .sequence import Sequence
from .tokenizer import load_tokenizer
from .sampling import mix_seed, sample


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each token under the sampling distribution
    finish_reason: str  # "stop" (EOS or a stop id) | "length" (max_tokens or max_model_len)
    model_logprobs: list[float] | None = None  # under the unmodified model (if requested)
    text: str | None = None  # decoded text when the engine has a tokenizer


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    decode_tokens: int = 0
    forward_passes: int = 0
    preemptions: int = 0
    peak_kv_pages: int = 0
    kv_pages_total: int = 0
    wall_time: float = 0.0
    extra: dict = field(default_factory=dict)


DEFAULT_KV_MEMORY_CPU = 2 << 30


class Engine:
    def __init__(self, model: CausalLM, tokenizer=None, device=None, attention_backend: str = "auto",
                 kv_cache_memory: int | None = None, num_pages: int | None = None, page_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, max_model_len: int | None = None,
                 packed_weights: bool | None = None):
        cfg = model.config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.config = cfg
        self.tokenizer = tokenizer
        self.dtype = next(model.parameters()).dtype
        self.max_model_len = min(max_model_len or cfg.max_model_len, cfg.max_model_len)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        kv_args = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        if num_pages is not None:
            self.kv = PagedKVCache(*kv_args, num_pages, page_size, self.dtype, self.device)
        else:
            if kv_cache_memory is None:
                kv_cache_memory = DEFAULT_KV_MEMORY_CPU
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    kv_cache_memory = int(free * 0.6)
            self.kv = PagedKVCache.from_memory(kv_cache_memory, *kv_args, page_size, self.dtype, self.device)
        self.backend = make_backend(attention_backend, self.device)
        self.runner = Runner(self.model, self.kv, self.backend, self.device, self._packed(packed_weights))
        self.eos_token_ids = set(cfg.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.stats = EngineStats(kv_pages_total=self.kv.num_pages)

    # ------------------------------------------------------------------ construction
    def _packed(self, want: bool | None):
        """The prepacked-GEMM forward (treepo/packed_model.py): None (auto) uses it where it works
        (CPU, bf16, extension built with AVX512-BF16); True insists; False never."""
        if want is False:
            return None
        from .packed_model import PackedModel, packed_status

        ok, why = packed_status(self.model, self.device)
        if not ok:
            if want:
                raise ValueError(f"packed_weights=True but the packed CPU GEMMs cannot run: {why}")
            return None
        return PackedModel(self.model)

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, attention_backend: str = "auto", **kw):
        model = load_model(path, dtype=dtype, device=device)
        return cls(model, load_tokenizer(path), device=device, attention_backend=attention_backend, **kw)

    @classmethod
    def from_model(cls, model, tokenizer=None, **kw):
        """Wrap our CausalLM (weights shared) or a transformers causal LM (weights shared: our
        modules are given the same tensors)."""
        if not isinstance(model, CausalLM):
            from .config import ModelConfig
            hf_cfg = model.config.to_dict()
            cfg = ModelConfig.from_hf(hf_cfg)
            with torch.device("meta"):
                ours = CausalLM(cfg)
            load_state(ours, dict(model.state_dict()), source=type(model).__name__)
            ours.hf_config = hf_cfg
            device = next(model.parameters()).device
            model = ours.to(device)
        return cls(model, tokenizer, **kw)

    # ------------------------------------------------------------------ validation
    def check_prompt(self, ids, what: str = "prompt") -> list[int]:
        if hasattr(ids, "keys") and "input_ids" in ids:  # a tokenizer's BatchEncoding
            ids = ids["input_ids"]
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if not ids:
            raise ValueError(f"{what} is empty; give at least one token id")
        V = self.config.vocab_size
        for i, t in enumerate(ids):
            if not isinstance(t, int) or not 0 <= t < V:
                raise ValueError(f"{what} token {i} is {t!r}; token ids must be ints in [0, {V})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{what} has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                             "(the prompt plus at least one new token must fit)")
        return ids

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        stop = set(params.stop_token_ids)
        return stop if params.ignore_eos else stop | self.eos_token_ids

    # ------------------------------------------------------------------ low-level API
    def new_sequence(self, prompt_ids, tag=None) -> Sequence:
        return Sequence(self.check_prompt(prompt_ids), tag=tag)

    def fork(self, seq: Sequence, n: int, num_tokens: int | None = None) -> list[Sequence]:
        """n new sequences continuing `seq`: its cached KV is shared, pending tokens are copied.

        With num_tokens, the children continue the first num_tokens tokens of `seq` instead (an
        earlier point of its history: a TreePO fallback); that prefix must be cached (its KV is
        append-only, so it is still intact) and its last token is re-run to give the children
        their next-token logits."""
        if num_tokens is None:
            tokens, cached = seq.token_ids, seq.num_cached
        else:
            if not 1 <= num_tokens <= seq.num_cached + 1 or num_tokens > seq.num_tokens:
                raise ValueError(f"fork at {num_tokens} tokens: {seq} has {seq.num_cached} cached")
            tokens, cached = seq.token_ids[:num_tokens], num_tokens - 1
        tables = self.kv.fork(seq.table, cached, n)
        children = []
        for t in tables:
            c = Sequence(tokens, min(seq.num_prompt, len(tokens)), tag=seq.tag)
            c.num_cached, c.table = cached, t
            n_out = len(tokens) - c.num_prompt
            c.logprobs, c.model_logprobs = seq.logprobs[:n_out], seq.model_logprobs[:n_out]
            children.append(c)
        return children

    def reserve(self, seqs: list[Sequence]) -> None:
        """Allocate the pages every sequence's pending tokens need, all or nothing."""
        need = sum(self.kv.growth_needed(s.table, s.num_tokens) for s in seqs)
        if need > self.kv.num_free:
            raise KVCacheExhausted(need, self.kv.num_free, self.kv.num_pages)
        for s in seqs:
            self.kv.grow(s.table, s.num_tokens)

    def forward(self, seqs: list[Sequence]) -> torch.Tensor:
        """Allocate pages, run one forward over all pending tokens, return fp32 logits [B, V]."""
        self.reserve(seqs)
        logits = self.runner.forward(seqs)
        self.stats.peak_kv_pages = max(self.stats.peak_kv_pages, self.kv.peak_used)
        return logits

    def sample_into(self, seqs: list[Sequence], logits: torch.Tensor, params: SamplingParams,
                    stream_keys: list[tuple] | None = None) -> list[int]:
        """Sample one token per sequence from its logits row and append it (and its log-probs).

        With params.seed, sequence i draws from the stream (seed, *stream_keys[i], position), so
        its tokens do not depend on what else is in the batch."""
        seeds = None
        if params.seed is not None:
            seeds = [mix_seed(params.seed, *key, s.num_tokens) for s, key in zip(seqs, stream_keys)]
        tokens, lps, mlps = sample(logits, params, seeds)
        tokens, lps = tokens.tolist(), lps.tolist()
        mlps = mlps.tolist() if mlps is not None else None
        for k, s in enumerate(seqs):
            s.token_ids.append(tokens[k])
            s.logprobs.append(lps[k])
            if mlps is not None:
                s.model_logprobs.append(mlps[k])
        return tokens

    def free(self, seq: Sequence) -> None:
        self.kv.free(seq.table)
        seq.num_cached = 0

    def sync_counters(self):
        for k, v in self.runner.counters.items():
            setattr(self.stats, k, v)
        self.stats.peak_kv_pages = max(self.stats.peak_kv_pages, self.kv.peak_used)
        return self.stats

    # ------------------------------------------------------------------ generate
    def generate(self, prompt_token_ids, params: SamplingParams | None = None) -> list[list[Completion]]:
        """n Completions per prompt. `prompt_token_ids`: a list of prompts (lists of ints), or one."""
        params = params or SamplingParams()
        single = prompt_token_ids and isinstance(prompt_token_ids[0], int)
        prompts = [self.check_prompt(p, f"prompt {i}")
                   for i, p in enumerate([prompt_token_ids] if single else prompt_token_ids)]
        stop_ids = self._stop_ids(params)
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        waiting = deque((i, None) for i in range(len(prompts)))  # (prompt index, preempted seq or None)
        running: list[Sequence] = []
        t0 = time.perf_counter()
        try:
            while waiting or running:
                self._preempt_to_fit(running, waiting)
                admitted = self._admit(waiting, running, prompts, params)
                batch = running + admitted
                if not batch:  # nothing fits even alone
                    i, seq = waiting[0]
                    n_tok = seq.num_tokens if seq else len(prompts[i])
                    raise KVCacheExhausted(self.kv.pages_for(n_tok + 1), self.kv.num_free, self.kv.num_pages)
                logits = self.forward(batch)
                rows, seqs = [], []
                for r, s in enumerate(batch):
                    if s.tag[1] is None:  # a new prompt: fork its samples off the prefilled parent
                        kids = [s] + self.fork(s, params.n - 1) if params.n > 1 else [s]
                        for j, c in enumerate(kids):
                            c.tag = (s.tag[0], j)
                            rows.append(r)
                            seqs.append(c)
                    else:
                        rows.append(r)
                        seqs.append(s)
                logits = logits[torch.tensor(rows, device=logits.device)] if len(rows) != len(batch) else logits
                tokens = self.sample_into(seqs, logits, params, [s.tag for s in seqs])
                running = []
                for k, s in enumerate(seqs):
                    n_out = s.num_tokens - s.num_prompt
                    if tokens[k] in stop_ids:
                        s.finish_reason = "stop"
                    elif n_out >= params.max_tokens or s.num_tokens >= self.max_model_len:
                        s.finish_reason = "length"
                    if s.finish_reason:
                        self.free(s)
                        results[s.tag[0]][s.tag[1]] = self._completion(s, params)
                    else:
                        running.append(s)
        finally:
            for s in running:
                self.free(s)
            for _, s in waiting:
                if s is not None:
                    self.free(s)
            self.stats.wall_time += time.perf_counter() - t0
            self.sync_counters()
        return results

    def _completion(self, s: Sequence, params: SamplingParams) -> Completion:
        out = s.output_ids
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(out, skip_special_tokens=True)
        return Completion(out, list(s.logprobs), s.finish_reason,
                          list(s.model_logprobs) if params.return_model_logprobs else None, text)

    def _preempt_to_fit(self, running: list[Sequence], waiting: deque):
        """Free the newest running sequences until every other one can grow by a token."""
        while running:
            need = sum(self.kv.growth_needed(s.table, s.num_tokens) for s in running)
            if need <= self.kv.num_free or len(running) == 1:
                return
            victim = running.pop()
            self.free(victim)
            waiting.appendleft((victim.tag[0], victim))
            self.stats.preemptions += 1

    def _admit(self, waiting: deque, running: list[Sequence], prompts, params) -> list[Sequence]:
        """Move waiting prompts / preempted sequences into this step while pages and budgets allow.

        A new prompt reserves its pages, the tail copies of its n-1 forks, and one page of growth
        per sample, so forking right after its prefill cannot fail."""
        admitted: list[Sequence] = []
        free = self.kv.num_free - sum(self.kv.growth_needed(s.table, s.num_tokens) for s in running)
        n_seqs, n_tokens = len(running), len(running)
        while waiting:
            i, seq = waiting[0]
            n_tok = seq.num_tokens if seq is not None else len(prompts[i])
            samples = 1 if seq is not None else params.n
            pages = self.kv.pages_for(n_tok) + samples
            if seq is None and params.n > 1 and n_tok % self.kv.page_size:
                pages += params.n - 1
            fits = pages <= free and n_seqs + samples <= self.max_num_seqs
            if admitted or running:
                fits = fits and n_tokens + n_tok <= self.max_num_batched_tokens
            elif pages > free:  # alone on an empty engine: start it if it fits at all
                fits = self.kv.pages_for(n_tok + 1) <= free
            if not fits:
                break
            waiting.popleft()
            if seq is None:
                seq = Sequence(prompts[i], tag=(i, None))
            admitted.append(seq)
            free -= pages
            n_seqs += samples
            n_tokens += n_tok
        return admitted

"""The public Engine: load a checkpoint, generate completions over the paged KV cache.

Settings are an EngineConfig (config.py). `generate` prefills each prompt once, forks it n ways
(shared prompt pages) and decodes every running sequence of every prompt in one batched forward
per step; the Scheduler (scheduler.py) decides what runs each step (a prompt's samples beyond
max_num_seqs are forked from it as slots free up) and preempts the newest sequences when the page
pool runs short (pages freed, recomputed later), so nothing is lost. The lower-level API
(new_sequence / fork / forward / sample_into / free, with stop_token_ids, counters, kv_usage and
reset_peak_kv) is what the TreePO tree sampler drives.

A call that raises - bad input found late, KVCacheExhausted, a KeyboardInterrupt anywhere in
prefill, forking or sampling - gives every page it took back: generate() and the tree sampler
run inside `transaction()`, which restores the pool's accounting as it was when the call began
(kv_cache.py says why step-by-step cleanup cannot be exact). The engine stays usable, and a
later call returns what it would on a fresh engine.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..progress import Rate
from ..progress import progress as progress_bar
from .attention import make_backend
from .config import EngineConfig, SamplingParams
from .kv_cache import KVCacheExhausted, PagedKVCache
from .loader import load_model, load_state
from .model import CausalLM
from .runner import Runner
from .sampling import mix_seed, sample
from .scheduler import SampleId, Scheduler, Step
from .sequence import Sequence
from .tokenizer import load_tokenizer


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


@dataclass(frozen=True)
class KVUsage:
    """The page pool at one moment."""

    page_size: int  # tokens per page
    num_pages: int  # pages in the pool
    num_free: int  # pages free now
    peak_used: int  # most pages in use at once since the engine was made or reset_peak_kv()


DEFAULT_KV_MEMORY_CPU = 2 << 30


class Engine:
    """`Engine(model, tokenizer=None, config=None, **settings)`: settings are EngineConfig fields
    (device, attention_backend, kv_cache_memory, num_pages, page_size, max_num_seqs,
    max_num_batched_tokens, max_model_len, packed_weights, batch_invariant), given as keywords or as a config
    (keywords override its fields)."""

    def __init__(self, model: CausalLM, tokenizer=None, config: EngineConfig | None = None, **settings):
        ecfg = self.engine_config = EngineConfig.build(config, **settings)
        cfg = model.config
        self.device = torch.device(ecfg.device) if ecfg.device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.config = cfg  # the model's ModelConfig
        self.tokenizer = tokenizer
        self.dtype = next(model.parameters()).dtype
        self.max_model_len = min(ecfg.max_model_len or cfg.max_model_len, cfg.max_model_len)
        self.kv = self._make_kv_cache(ecfg)
        self.backend = self._make_backend(ecfg)
        packed = self._packed(ecfg.packed_weights, ecfg.batch_invariant)
        self.runner = Runner(self.model, self.kv, self.backend, self.device, packed)
        self.eos_token_ids = set(cfg.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.stats = EngineStats(kv_pages_total=self.kv.num_pages)
        self._made: list[list[Sequence]] = []  # sequences made in each open transaction()

    # ------------------------------------------------------------------ construction
    def _make_kv_cache(self, ecfg: EngineConfig) -> PagedKVCache:
        """num_pages pages, or as many as kv_cache_memory bytes hold (default: 2 GiB on a CPU,
        60% of the free memory on CUDA)."""
        cfg = self.config
        kv_args = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        if ecfg.num_pages is not None:
            return PagedKVCache(*kv_args, ecfg.num_pages, ecfg.page_size, self.dtype, self.device)
        memory = ecfg.kv_cache_memory
        if memory is None:
            memory = DEFAULT_KV_MEMORY_CPU
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                memory = int(free * 0.6)
        return PagedKVCache.from_memory(memory, *kv_args, ecfg.page_size, self.dtype, self.device)

    def _make_backend(self, ecfg: EngineConfig):
        """The attention backend; batch_invariant: the C++ one with fixed key chunks (only it is invariant)."""
        if not ecfg.batch_invariant:
            return make_backend(ecfg.attention_backend, self.device)
        from .attention import backend_status
        from .attention.cpu_backend import INVARIANT_CHUNK_TOKENS, CpuBackend

        why = None
        if self.device.type != "cpu":
            why = f"runs on the CPU only, not on {self.device} (the triton and torch backends are not batch-invariant)"
        elif ecfg.attention_backend not in ("auto", "cpu"):
            why = (f"needs attention_backend 'cpu' or 'auto', not {ecfg.attention_backend!r} (only the C++ kernels "
                   "are batch-invariant)")
        elif not backend_status("cpu", self.device)[0]:
            why = f"needs the C++ kernels: {backend_status('cpu', self.device)[1]}"
        elif self.dtype != torch.bfloat16:
            why = f"needs a bf16 model, not {self.dtype} (torch's fp32 / fp16 GEMMs depend on the row count)"
        if why:
            raise ValueError(f"batch_invariant=True {why}")
        return CpuBackend(chunk_tokens=INVARIANT_CHUNK_TOKENS)

    def _packed(self, want: bool | None, invariant: bool = False):
        """The prepacked-GEMM forward (treepo/engine/packed_model.py): None (auto) uses it where it works
        (CPU, bf16, extension built with AVX512-BF16); True insists; False never. batch_invariant takes
        it with either GEMM build (the portable loop is slower, but its rows are invariant too)."""
        if want is False:
            return None
        from .packed_model import PackedModel, packed_status

        ok, why = packed_status(self.model, self.device, portable_ok=invariant)
        if not ok:
            if want or invariant:
                flag = "batch_invariant=True" if invariant else "packed_weights=True"
                raise ValueError(f"{flag} but the packed CPU GEMMs cannot run: {why}")
            return None
        return PackedModel(self.model, invariant=invariant)

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, attention_backend: str = "auto", **settings):
        """Load a Hugging Face checkpoint directory and its tokenizer; `settings` as for Engine()."""
        model = load_model(path, dtype=dtype, device=device)
        return cls(model, load_tokenizer(path), device=device, attention_backend=attention_backend, **settings)

    @classmethod
    def from_model(cls, model, tokenizer=None, **settings):
        """Wrap our CausalLM (weights shared) or a transformers causal LM (weights shared: our
        modules are given the same tensors); `settings` as for Engine()."""
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
        return cls(model, tokenizer, **settings)

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

    def stop_token_ids(self, params: SamplingParams) -> set[int]:
        """Token ids that end a sequence under params: its stop ids, and EOS unless ignore_eos."""
        stop = set(params.stop_token_ids)
        return stop if params.ignore_eos else stop | self.eos_token_ids

    # ------------------------------------------------------------------ low-level API
    def new_sequence(self, prompt_ids, tag=None) -> Sequence:
        return self._track(Sequence(self.check_prompt(prompt_ids), tag=tag))

    def _track(self, seq: Sequence) -> Sequence:
        if self._made:
            self._made[-1].append(seq)
        return seq

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
            children.append(self._track(c))
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

    @contextmanager
    def transaction(self):
        """All or nothing for the page pool: if the block raises (a KeyboardInterrupt included,
        wherever it lands), every page taken inside is free again - the pool's accounting is
        restored as it was at entry, free list order included - and the sequences that
        new_sequence / fork made inside are emptied (no pages, nothing cached). Sequences made
        before the block must not be grown, forked into or freed inside it. Costs one copy of
        the accounting (O(num_pages)) per block; blocks may nest."""
        snap = self.kv.snapshot()
        made: list[Sequence] = []
        depth = len(self._made)
        self._made.append(made)
        ok = False
        try:
            yield
            ok = True
        finally:
            del self._made[depth:]
            if not ok:
                self.kv.restore(snap)
                for s in made:
                    s.table, s.num_cached = [], 0
            elif self._made:
                self._made[-1] += made

    # ------------------------------------------------------------------ accounting
    def counters(self) -> dict[str, int]:
        """A snapshot of the work done since the engine was made: prefill_tokens, decode_tokens,
        forward_passes."""
        return dict(self.runner.counters)

    def kv_usage(self) -> KVUsage:
        kv = self.kv
        return KVUsage(kv.page_size, kv.num_pages, kv.num_free, kv.peak_used)

    def reset_peak_kv(self) -> None:
        """Start measuring KVUsage.peak_used afresh (from the pages in use now)."""
        self.kv.reset_peak()

    def sync_counters(self) -> EngineStats:
        """Copy the work counters and the KV peak into self.stats, and return it."""
        for k, v in self.runner.counters.items():
            setattr(self.stats, k, v)
        self.stats.peak_kv_pages = max(self.stats.peak_kv_pages, self.kv.peak_used)
        return self.stats

    # ------------------------------------------------------------------ generate
    def generate(self, prompt_token_ids, params: SamplingParams | None = None,
                 stream_ids: list[int] | None = None, progress: str | None = None) -> list[list[Completion]]:
        """n Completions per prompt. `prompt_token_ids`: a list of prompts (lists of ints), or one.

        With params.seed, sample j of prompt i draws from the random stream (seed, stream_ids[i], j,
        position); stream_ids defaults to the prompts' indices in this call. Give each prompt a
        global id (e.g. its index in a dataset) to get the same samples however the prompts are
        split across calls or processes. progress: a label for a progress bar of completions
        finished (treepo/progress.py: shown on a terminal only)."""
        params = params or SamplingParams()
        single = prompt_token_ids and isinstance(prompt_token_ids[0], int)
        prompts = [self.check_prompt(p, f"prompt {i}")
                   for i, p in enumerate([prompt_token_ids] if single else prompt_token_ids)]
        if stream_ids is not None and len(stream_ids) != len(prompts):
            raise ValueError(f"stream_ids has {len(stream_ids)} entries for {len(prompts)} prompts; "
                             "give one per prompt")
        key = (lambda tag: tag) if stream_ids is None else (lambda tag: (int(stream_ids[tag.prompt]), tag.sample))
        ecfg = self.engine_config
        sched = Scheduler(self.kv, prompts, params, self.stop_token_ids(params), self.max_model_len,
                          ecfg.max_num_seqs, ecfg.max_num_batched_tokens)
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        t0 = time.perf_counter()
        rate, generated = Rate(), 0
        try:
            # an error or interrupt anywhere: every page comes back
            with self.transaction(), progress_bar(progress, len(prompts) * params.n, "seq") as bar:
                while not sched.done:
                    step = sched.schedule()
                    logits = self.forward(step.seqs) if step.seqs else None
                    seqs, logits = self._start_samples(step, logits)
                    tokens = self.sample_into(seqs, logits, params, [key(s.tag) for s in seqs])
                    generated += len(seqs)
                    for s in sched.postprocess(seqs, tokens):
                        self.free(s)
                        results[s.tag.prompt][s.tag.sample] = self._completion(s, params)
                        bar.update()
                    bar.set_postfix_str(rate(generated), refresh=False)
        finally:
            self.stats.preemptions += sched.num_preemptions
            self.stats.wall_time += time.perf_counter() - t0
            self.sync_counters()
        return results

    def _start_samples(self, step: Step, logits: torch.Tensor | None) -> tuple[list[Sequence], torch.Tensor]:
        """The sequences to sample this step and their logits rows: every forwarded sequence but
        the prompts just prefilled, then the samples of each fork (sharing their prompt's pages),
        which all draw their first token from their prompt's row - this forward's, or the one
        kept since it was prefilled (so a sample started late draws from the same logits)."""
        if not step.forks:
            return step.seqs, logits
        prefilled = {f.group.seq.seq_id for f in step.forks if f.group.row is None}
        where = {s.seq_id: r for r, s in enumerate(step.seqs)}
        keep = [r for r, s in enumerate(step.seqs) if s.seq_id not in prefilled]
        seqs = [step.seqs[r] for r in keep]
        rows = [logits[torch.tensor(keep, device=logits.device)]] if keep else []
        for f in step.forks:
            g = f.group
            row = g.row if g.row is not None else logits[where[g.seq.seq_id]]
            samples = self.fork(g.seq, f.count - f.last)
            if f.last:  # the prompt's own sequence is its last sample to start
                samples.insert(0, g.seq)
                g.row = None
            elif g.row is None:
                g.row = row.clone()  # parked: later forks draw from it
            for j, c in enumerate(samples):
                c.tag = SampleId(g.seq.tag.prompt, f.first + j)
            seqs += samples
            rows.append(row.expand(len(samples), -1))
        return seqs, torch.cat(rows)

    def _completion(self, s: Sequence, params: SamplingParams) -> Completion:
        out = s.output_ids
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(out, skip_special_tokens=True)
        return Completion(out, list(s.logprobs), s.finish_reason,
                          list(s.model_logprobs) if params.return_model_logprobs else None, text)

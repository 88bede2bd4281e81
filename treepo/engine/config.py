"""Small self-checking configuration dataclasses: the model shape read from a Hugging Face
config.json, the sampling parameters of a request, and the engine's resource settings."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# ModelConfig field -> its config.json key, where they differ (errors name the key the user wrote)
HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads"}


@dataclass(slots=True)
class ModelConfig:
    """Shape of a decoder-only model, read from a Hugging Face config.json (transformers 4 or 5 keys)."""

    family: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None (default rope) or {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2: q/k/v have bias; llama attention_bias: q/k/v/o have bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # attention window; the engine caps max_model_len to it
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{HF_KEYS.get(name, name)}={v!r} must be a positive integer")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a finite number > 0")
            setattr(self, name, float(v))
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window={self.sliding_window!r} must be a positive integer or null")
        for name, ids in (("eos_token_id", self.eos_token_ids),
                          ("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,))):
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
                raise ValueError(f"{name}={list(ids) if name == 'eos_token_id' else ids[0]!r} must be token ids "
                                 "(integers >= 0)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("default", "llama3"):
            raise ValueError(f"rope scaling {self.rope_scaling.get('rope_type')!r} is not supported; "
                             "supported: default, llama3")

    @property
    def max_model_len(self) -> int:
        """Longest sequence the engine runs exactly (a sliding window caps it: no token is ever masked)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a config.json's dict; a missing, non-integer or negative size is a ValueError naming the
        key (load_model adds the file)."""
        if not isinstance(cfg, dict):
            raise ValueError(f"expected a JSON object of model settings, got {type(cfg).__name__}")

        def need(key):
            if cfg.get(key) is None:
                raise ValueError(f"{key!r} is missing; a {family} config.json needs vocab_size, hidden_size, "
                                 "intermediate_size, num_hidden_layers and num_attention_heads")
            return cfg[key]

        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None and model_type in SUPPORTED_ARCHITECTURES.values():
            family = model_type
        if family is None:
            raise ValueError(f"unsupported architecture {archs or model_type!r}; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only silu)")
        heads, hidden = need("num_attention_heads"), need("hidden_size")
        kv_heads = cfg.get("num_key_value_heads")
        head_dim = cfg.get("head_dim")
        if head_dim is None:  # HF's default; only computed from sizes that are valid (else __post_init__ says which)
            head_dim = hidden // heads if all(type(v) is int and v > 0 for v in (hidden, heads)) else hidden
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or None
        if rope and rope.get("rope_type", "default") != "default":
            scaling = dict(rope)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        window = None
        if family == "mistral" or (family in ("qwen2", "qwen3") and cfg.get("use_sliding_window")):
            window = cfg.get("sliding_window") or None
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else kv_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=window,
            eos_token_ids=eos,
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request: n completions per prompt of at most max_tokens new tokens."""

    n: int = 1  # completions per prompt; the prompt is prefilled once and forked n ways
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = -1  # keep the k most likely tokens; -1 (or 0) keeps all
    max_tokens: int = 256  # new tokens per completion
    seed: int | None = None  # None: nondeterministic; an int makes generate() reproducible
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids besides the model's EOS
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    return_model_logprobs: bool = False  # also return log-probs under the unmodified model distribution

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k} must be -1 (off) or >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class EngineConfig:
    """Resources of one Engine: device, attention backend, KV page pool and batch limits.

    `Engine(model, tokenizer, **fields)` builds one from keywords (as vLLM's `LLM(**kwargs)` builds
    its EngineArgs); `Engine(model, tokenizer, config=EngineConfig(...), **fields)` overrides some
    fields of a given one."""

    device: str | torch.device | None = None
    """torch device (or its name) to run on; None: the model's own device."""
    attention_backend: str = "auto"
    """One of "auto", "torch", "cpu", "triton" (treepo/engine/attention checks the name; see README)."""
    kv_cache_memory: int | float | None = None
    """Bytes for the K and V page pools; None: 2 GiB on CPU, 60% of free memory on CUDA."""
    num_pages: int | None = None
    """Exact number of KV pages (instead of kv_cache_memory)."""
    page_size: int = 16
    """Tokens per KV page."""
    max_num_seqs: int = 256
    """Most sequences in one generate() step (each of a prompt's n samples counts; n may exceed
    it: the samples then start in turn, forked from the prompt's prefill as slots free up)."""
    max_num_batched_tokens: int = 8192
    """Most tokens in one generate() step once something runs (a lone prompt may exceed it)."""
    max_model_len: int | None = None
    """Longest prompt + completion; None, or more than the model supports: the model's limit."""
    packed_weights: bool | None = None
    """Prepacked CPU GEMMs (treepo/engine/packed_model.py): None uses them where they work, True
    insists (an error where they cannot run), False never."""
    batch_invariant: bool = False
    """Bit-identical results for a sequence whatever else is in the batch and whether it was
    preempted and recomputed (docs/kernels.md, "Batch invariance"): attention over fixed 64-token
    key chunks merged in a fixed order (shared chunks still read once), row-invariant packed GEMMs.
    Needs a bf16 model on a CPU with the C++ extension (attention_backend "cpu" or "auto"); costs
    some speed (measured in docs/kernels.md)."""

    def __post_init__(self):
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; it must be an int >= 1")
        for name, low in (("num_pages", 1), ("max_model_len", 2)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name}={value!r}; it must be None or an int >= {low}")
        mem = self.kv_cache_memory
        if mem is not None and (not isinstance(mem, (int, float)) or not mem > 0):
            raise ValueError(f"kv_cache_memory={mem!r}; it must be None or a number of bytes > 0")
        if self.kv_cache_memory is not None and self.num_pages is not None:
            raise ValueError(f"kv_cache_memory={self.kv_cache_memory} and num_pages={self.num_pages} "
                             "both size the KV pool; give one of them")
        if not isinstance(self.attention_backend, str):
            raise ValueError(f"attention_backend={self.attention_backend!r}; it must be a name such as "
                             "'auto', 'torch', 'cpu' or 'triton'")
        if self.packed_weights not in (None, True, False):
            raise ValueError(f"packed_weights={self.packed_weights!r}; it must be None (auto), True or False")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant={self.batch_invariant!r}; it must be True or False")
        if self.batch_invariant and self.packed_weights is False:
            raise ValueError("batch_invariant=True needs the packed GEMMs (their rows do not depend on the batch); "
                             "packed_weights=False turns them off")

    @classmethod
    def build(cls, config: EngineConfig | None = None, **overrides) -> EngineConfig:
        """`config` (default: all defaults) with the given fields replaced; an unknown keyword is
        a TypeError that lists the valid fields."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be an EngineConfig, not {type(config).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"unknown engine setting(s) {', '.join(unknown)}; EngineConfig fields are: "
                            f"{', '.join(names)}")
        return dataclasses.replace(config, **overrides) if config is not None else cls(**overrides)

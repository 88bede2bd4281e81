"""The inference engine: our own decoder over a refcounted paged KV cache with forks.

config (engine, model and sampling settings) -> model / packed_model (the decoder; prepacked CPU
GEMMs) -> kv_cache (page pool, forks) -> attention (backends over the kernels in treepo_kernels)
-> sequence + runner (one batched forward per step) -> sampling -> scheduler (admission and
preemption) -> engine (the public Engine).
"""
from .config import EngineConfig, SamplingParams
from .engine import Completion, Engine
from .kv_cache import KVCacheExhausted

__all__ = ["Engine", "EngineConfig", "SamplingParams", "Completion", "KVCacheExhausted"]

"""The inference engine: our own decoder over a refcounted paged KV cache with forks.

config (model and sampling settings) -> model / packed_model (the decoder; prepacked CPU GEMMs)
-> kv_cache (page pool, forks) -> attention (backends over the kernels in treepo_kernels)
-> runner (one batched forward per step) -> sampling -> engine (the public Engine).
"""
from .config import SamplingParams
from .engine import Completion, Engine
from .kv_cache import KVCacheExhausted

__all__ = ["Engine", "SamplingParams", "Completion", "KVCacheExhausted"]

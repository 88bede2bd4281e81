"""treepo: TreePO tree-structured rollouts over a shared paged KV cache, and the RL trainer."""
from .config import SamplingParams
from .engine import Completion, Engine
from .kv_cache import KVCacheExhausted

__all__ = ["Engine", "SamplingParams", "Completion", "KVCacheExhausted"]
__version__ = "0.1.0"

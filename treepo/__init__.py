"""treepo: TreePO tree-structured rollouts over a shared paged KV cache, and the RL trainer."""
from .config import SamplingParams
from .engine import Completion, Engine
from .kv_cache import KVCacheExhausted
from .tree import Leaf, Node, Tree, TreeConfig, trees_to_batch
from .tree_sampler import TreeSampler

__all__ = ["Engine", "SamplingParams", "Completion", "KVCacheExhausted", "TreeConfig", "TreeSampler",
           "Tree", "Leaf", "Node", "trees_to_batch"]
__version__ = "0.1.0"

"""treepo: TreePO tree-structured rollouts over a shared paged KV cache, and the RL trainer."""
from treepo.engine.config import EngineConfig, SamplingParams
from treepo.engine.engine import Completion, Engine
from treepo.engine.kv_cache import KVCacheExhausted
from treepo.rollout.sampler import TreeSampler
from treepo.rollout.tree import Leaf, Node, Tree, TreeConfig, trees_to_batch
from treepo.train.batch import PackedBatch, pack_trees
from treepo.tree_generate import TreeGeneration, tree_generate

__all__ = ["Engine", "EngineConfig", "SamplingParams", "Completion", "KVCacheExhausted", "TreeConfig",
           "TreeSampler", "Tree", "Leaf", "Node", "trees_to_batch",
           "pack_trees", "PackedBatch", "tree_generate", "TreeGeneration"]
__version__ = "0.1.0"

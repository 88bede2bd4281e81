"""TreePO rollouts on the engine: the segment-level tree sampler and the trees it returns.

tree (TreeConfig, Node, Leaf, Tree, FINISH_REASONS) -> branching (budget and children allocation,
pure functions) -> sampler (the level-synchronous TreePO loop) with text_rules (boxed answers,
repetition) -> viz (outline and a readable HTML page of trees).
"""
from .sampler import TreeSampler
from .tree import FINISH_REASONS, Leaf, Node, Tree, TreeConfig

__all__ = ["TreeSampler", "TreeConfig", "Tree", "Leaf", "Node", "FINISH_REASONS"]

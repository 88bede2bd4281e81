"""Tree-attention kernels over a paged KV cache, each op with its plain-PyTorch reference.

Layout shared by every op (docs/kernels.md, "KV layout"): per layer K and V pools [num_pages,
num_kv_heads, page_size, head_dim]; sequences address pages through int32 block tables. One op per
file, each read top to bottom (reference, Triton kernel, launcher): paged_kv.py (append),
tree_decode.py (tree decode + LSE merge, plain paged decode), extend.py (paged extend, tree
extend); tree_plan.py is the host planner of tree decode, cpu.py the launchers of the C++ kernels
(csrc/). Triton is needed only to launch a Triton kernel (see triton_common.py).
"""
from .extend import paged_attention_ref
from .paged_kv import append_kv_ref
from .tree_decode import tree_decode_ref
from .tree_plan import TreePlan, plan_tree

__all__ = ["append_kv_ref", "paged_attention_ref", "tree_decode_ref", "plan_tree", "TreePlan"]

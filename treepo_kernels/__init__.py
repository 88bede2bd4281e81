"""Tree-attention kernels over a paged KV cache, each op with its plain-PyTorch reference.

Layout shared by every op (KERNELS.md): per layer K and V pools [num_pages, num_kv_heads,
page_size, head_dim]; sequences address pages through int32 block tables.
"""
from .paged_kv import append_kv_ref
from .paged_attention import paged_attention_ref

__all__ = ["append_kv_ref", "paged_attention_ref"]

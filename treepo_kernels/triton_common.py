"""What the Triton kernels share: Triton (an optional import), log2(e), page gathers, the online softmax.

The op files (paged_kv.py, tree_decode.py, extend.py) hold each op's plain-PyTorch reference beside
its Triton kernel; the references serve CPU-only users and the torch / cpu attention backends, so the
op files must import without Triton. Here `triton` and `tl` are the real modules when Triton is
installed; otherwise stand-ins under which `@triton.jit` still defines the kernels and launching one
(or calling any other Triton helper) raises ImportError naming the cause. `TRITON_ERROR` says why
Triton is missing (None when it is installed).

The K/V tile gather through a page list and the online softmax (docs/kernels.md, "Triton kernels")
are written once, for the tree-decode partials and the extend kernel. Scores arrive multiplied by
log2(e) * scale (`LOG2E` folded into the scale on the host) so the kernels use exp2 / log2; the LSE
leaves a kernel in natural log, like the references'.
"""
from __future__ import annotations

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)

try:
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
except ImportError as e:
    TRITON_ERROR = f"{type(e).__name__}: {e}"

    class _NoTriton:
        """Stands in for `triton` and `triton.language` when Triton is not installed."""

        constexpr = None  # kernel annotations `NAME: tl.constexpr`

        def jit(self, fn):
            return self  # a "kernel" that raises when launched

        def __getitem__(self, grid):
            raise ImportError(f"the Triton kernels need triton, which is not installed ({TRITON_ERROR})")

        def __getattr__(self, name):
            raise ImportError(f"triton.{name} needs triton, which is not installed ({TRITON_ERROR})")

    triton = tl = _NoTriton()


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, pages_ptr, t, t_ok, h, d, d_ok, page_size,
                 stride_cache_page, stride_cache_head, stride_cache_tok):
    """K and V [BLOCK_N, BLOCK_D] of KV head h at tokens t [BLOCK_N] of the run of pages whose ids
    start at pages_ptr (token t lies in page pages_ptr[t // page_size] at offset t % page_size);
    0 where t_ok [BLOCK_N] or d_ok [BLOCK_D] is false."""
    page = tl.load(pages_ptr + t // page_size, mask=t_ok, other=0).to(tl.int64)
    off = (page[:, None] * stride_cache_page + h * stride_cache_head + (t % page_size)[:, None] * stride_cache_tok
           + d[None, :])
    mask = t_ok[:, None] & d_ok[None, :]
    return tl.load(k_cache_ptr + off, mask=mask, other=0.0), tl.load(v_cache_ptr + off, mask=mask, other=0.0)


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, v, PREC: tl.constexpr):
    """Fold one KV tile into a running softmax (base 2); returns the new (m_i, l_i, acc).

    s [M, N] fp32: scores times log2(e) * scale, -inf where a key is not visible to a row;
    v [N, BLOCK_D]: the tile's values; m_i [M] running max, l_i [M] running sum of exp2(s - m_i),
    acc [M, BLOCK_D] fp32 unnormalised output. A row that has seen no visible key yet keeps
    m_i = -inf, l_i = 0, acc = 0 (its max is taken as 0, so no -inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def online_softmax_finish(m_i, l_i, acc):
    """(out [M, BLOCK_D] fp32 = acc / l_i, lse [M] fp32 in natural log) of a finished running
    softmax; a row that saw no key gets out 0 and lse -inf (it contributes nothing to a merge)."""
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # * ln(2)
    return acc / l_safe[:, None], lse


def block_d_for(D: int) -> int:
    """Head-dim tile: a power of two (masked past D) and >= 16, the smallest K of a `tl.dot`
    (fp16 / bf16 dots with K < 16 do not compile for a GPU; head_dim 8 exists in tiny models)."""
    return max(16, triton.next_power_of_2(D))

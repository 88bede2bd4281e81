"""Attention over packed trees (treepo/train/batch.py): the model's `attn` for a training forward.

`pack_trees` lays every unique token of a micro-batch's trees out once in one flat sequence; key j
is visible to query i iff j <= i < visible_end[j] (see batch.py's module doc). `TreeAttention`
is what `CausalLM.forward(input_ids [T], positions [T], attn=TreeAttention.from_batch(batch), ...)` calls in
every layer; it is differentiable (training forward and backward) and every impl equals
`tree_attention_ref`, one SDPA over the whole sequence with the dense [T, T] mask.

Impls (`IMPLS`):
- "auto" (default): "triton" when the micro-batch is on a CUDA device and Triton is installed,
  else "gathered".
- "triton": treepo_kernels/tree_attention.py, the Triton forward (online softmax, LSE saved) and
  FlashAttention-2-style backward over the packed layout's block plan (a query block visits only
  the key blocks of its ancestors and its own node; built once per micro-batch, shared by every
  layer). Runs on a GPU, and on a CPU only through the Triton interpreter (tests). Under autocast
  q, k and v are cast to the autocast dtype (RoPE leaves q and k in fp32), like SDPA under autocast.
- "gathered" (the CPU default): the queries in blocks of GATHER_BLOCK = 64 consecutive packed tokens; each
  block gathers only the keys some query of it can see (its ancestors' segments and its own
  node's prefix, `gather_plan`), padded to the longest such list K, and one batched SDPA runs
  over all blocks with the exact mask re-indexed to [64, K]. Work is T x K (K ~ 240 for the
  trees below) instead of a tree's n^2 - the tree's sparsity, not only its block diagonal.
- "per_tree": one SDPA per tree with its own [n, n] slice of the mask. Attention never crosses
  `seq_offsets` (visible_end[j] never passes the end of j's tree), so the dense mask is block
  diagonal and S trees of n tokens cost S n^2 instead of (S n)^2.
- "dense": the reference's one SDPA over the micro-batch with the [T, T] mask.
- "per_tree_bf16": "per_tree" with q, k, v rounded to bf16 (output back in q's dtype).
- "flex": FlexAttention (torch.nn.attention.flex_attention, compiled once with dynamic shapes, so a
  new micro-batch length does not recompile) with a block mask built from visible_end once per
  micro-batch, so fully masked tiles are skipped; `flex_options` passes kernel_options (tuned tile
  sizes, e.g. {"BLOCK_M": 128, "BLOCK_N": 64}) and `flex_block` sets the block mask's tile.
  torch 2.13 has no FlexAttention backward on a CPU (its forward compiles through inductor's C++
  template): on a CPU it serves no-grad forwards only (e.g. recomputing the old policy's
  log-probs) and raises otherwise. On a GPU it is the baseline the Triton kernel is measured
  against (bench/bench_train_attention.py, bench/test_bench_train_attention.py).

Why "gathered" is the default - measured on the 2-core AMD EPYC without AVX512
(bench/bench_tree_attention.py; bench/results/2026-12-02_cpu2_noavx512_bench_tree_attention.txt),
one layer of SmolLM2-135M heads (H_q 9, H_kv 3, d 64), fp32, fwd + bwd, ms:

    micro-batch                                      gathered  per_tree  dense  per_tree_bf16
    5 trees (60 + 4 x 32 tokens, 8 leaves), T 3820      356      1060     2640      3507
    3 groups (60 + 8 x 128 tokens), T 3252              272       907     1819      3920

gathered is 3-4x faster than per_tree and 7x faster than dense, with the same fp32 numerics
(max |diff| to the reference ~7e-7). Its plan (gather_plan) takes ~0.1 s per micro-batch, shared
by all layers. bf16 is slower on this CPU (no native bf16 path for the masked SDPA backward) and
rounds the inputs. Compiled flex, forward only: 215 / 176 ms (gathered: 94 / 67), after 29 s of
compiling (8.8 s again for each new T).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

IMPLS = ("auto", "triton", "gathered", "per_tree", "dense", "per_tree_bf16", "flex")
DEFAULT_IMPL = "auto"  # "triton" on CUDA (when Triton is installed), "gathered" elsewhere
GATHER_BLOCK = 64  # queries per block of "gathered" (32 and 128 were slower on the 2-core CPU)
FLEX_BLOCK = 128  # FlexAttention's tile (tokens) on both axes


def tree_mask(visible_end: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """[n, n] bool, mask[a, b] = query start + a sees key start + b, for packed indices start..end."""
    end = visible_end.shape[0] if end is None else end
    i = torch.arange(start, end, device=visible_end.device)
    return (i[None, :] <= i[:, None]) & (i[:, None] < visible_end[None, start:end])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [n, Hq, D], k/v [n, Hkv, D], mask [n, n] bool -> [n, Hq, D] (GQA when Hkv < Hq)."""
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n, D]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


def gather_plan(visible_end: torch.Tensor, block: int = GATHER_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """For "gathered": (keys [nb, K] packed key indices, mask [nb, 1, block, K] bool) of nb = ceil(T /
    block) consecutive query blocks. Block b's keys are every j that some query of it may see
    (j < its end and visible_end[j] > its start), ascending, padded to the longest list K with
    index 0 masked out; mask is the exact visibility test. Query rows past T (the last block's
    padding) see one key, so no row of the SDPA is empty (their output is dropped)."""
    T = visible_end.shape[0]
    dev = visible_end.device
    nb = -(-T // block)
    s = torch.arange(nb, device=dev) * block  # [nb] block starts
    e = (s + block).clamp(max=T)
    j = torch.arange(T, device=dev)
    cand = (j[None] < e[:, None]) & (visible_end[None] > s[:, None])  # [nb, T]
    K = int(cand.sum(1).max())
    keys = torch.where(cand, j[None], T).sort(1).values[:, :K]  # [nb, K], T = padding
    real = keys < T
    keys = keys.clamp(max=T - 1)
    qi = s[:, None] + torch.arange(block, device=dev)[None]  # [nb, block] query indices
    mask = (keys[:, None, :] <= qi[:, :, None]) & (qi[:, :, None] < visible_end[keys][:, None, :]) \
        & real[:, None, :]  # [nb, block, K]
    mask[:, :, 0] |= qi >= T
    return keys, mask[:, None]


def _gathered(q, k, v, keys, mask):
    """q [T, Hq, D], k/v [T, Hkv, D], (keys, mask) from gather_plan -> [T, Hq, D]: one batched SDPA
    over the query blocks, each against its gathered keys."""
    T, H, D = q.shape
    nb, _, block, _ = mask.shape
    qb = F.pad(q, (0, 0, 0, 0, 0, nb * block - T)).view(nb, block, H, D).transpose(1, 2)  # [nb, Hq, block, D]
    kb, vb = (t[keys].transpose(1, 2) for t in (k, v))  # [nb, Hkv, K, D]
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=H != k.shape[1])
    return o.transpose(1, 2).reshape(nb * block, H, D)[:T]


def _triton_error() -> str | None:
    """Why the Triton kernels cannot run here (None when Triton is installed)."""
    from treepo_kernels.triton_common import TRITON_ERROR

    return TRITON_ERROR


def check_attention(impl: str, device: torch.device) -> None:
    """Refuse a training attention that cannot run a forward + backward on `device` (the trainer
    calls this before loading the model)."""
    dev = torch.device(device).type
    if impl == "flex" and dev == "cpu":
        raise ValueError(f"attention='flex' has no backward on a CPU in torch {torch.__version__}; "
                         "take attention='auto' (gathered) there")
    if impl == "triton" and _triton_error() is not None:
        raise ValueError(f"attention='triton' needs Triton, which is missing ({_triton_error()}); take 'auto'")
    if impl == "triton" and dev != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention='triton' runs on CUDA (here: {dev}; on a CPU only through the Triton "
                         "interpreter, TRITON_INTERPRET=1, for tests); take 'auto'")


def _check_qkv(q, k, v, T: int, who: str):
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != T or k.shape[0] != T \
            or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"{who}: need q [T, Hq, D], k and v [T, Hkv, D] with T = {T} packed tokens and "
                         f"Hkv dividing Hq; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def tree_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible_end: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference: q [T, Hq, D], k/v [T, Hkv, D], visible_end [T] -> [T, Hq, D], one SDPA
    with the dense [T, T] mask (key j visible to query i iff j <= i < visible_end[j])."""
    _check_qkv(q, k, v, visible_end.shape[0], "tree_attention_ref")
    return _sdpa(q, k, v, tree_mask(visible_end))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


class TreeAttention:
    """The model's `attn(layer_idx, q, k, v)` for a flat packed forward: q [T, Hq, D], k/v [T, Hkv, D]
    -> [T, Hq, D]. Build once per micro-batch (the masks are shared by every layer):
    `TreeAttention.from_batch(batch)` or `TreeAttention(visible_end [T], seq_offsets [S + 1])`, on
    the device the forward runs on. seq_offsets None means one tree spanning all T tokens."""

    def __init__(self, visible_end: torch.Tensor, seq_offsets: torch.Tensor | None = None,
                 impl: str = DEFAULT_IMPL, flex_options: dict | None = None, flex_block: int = FLEX_BLOCK):
        if impl not in IMPLS:
            raise ValueError(f"TreeAttention: impl={impl!r}; valid: {', '.join(IMPLS)}")
        if visible_end.dim() != 1 or visible_end.dtype.is_floating_point or visible_end.shape[0] == 0:
            raise ValueError(f"TreeAttention: visible_end must be a non-empty integer [T] tensor, got "
                             f"{visible_end.dtype} {tuple(visible_end.shape)}")
        T = visible_end.shape[0]
        if seq_offsets is None:
            seq_offsets = torch.tensor([0, T])
        offs = [int(x) for x in seq_offsets.tolist()]
        if len(offs) < 2 or offs[0] != 0 or offs[-1] != T or any(b <= a for a, b in zip(offs, offs[1:])):
            raise ValueError(f"TreeAttention: seq_offsets {offs[:8]}{'...' if len(offs) > 8 else ''} must rise "
                             f"strictly from 0 to T = {T}")
        idx = torch.arange(T, device=visible_end.device)
        tree_end = torch.tensor(offs[1:], device=visible_end.device).repeat_interleave(
            torch.tensor([b - a for a, b in zip(offs, offs[1:])], device=visible_end.device))
        bad = (visible_end <= idx) | (visible_end > tree_end)
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(f"TreeAttention: visible_end[{j}] = {int(visible_end[j])}; it must lie in "
                             f"({j}, {int(tree_end[j])}] (past the key itself, within its tree)")
        if impl == "auto":
            impl = "triton" if visible_end.device.type == "cuda" and _triton_error() is None else "gathered"
        if impl == "triton" and _triton_error() is not None:
            raise ValueError(f"TreeAttention impl='triton' needs Triton ({_triton_error()}); take impl='gathered'")
        self.visible_end, self.offsets, self.impl, self.tokens = visible_end, offs, impl, T
        self.flex_options = flex_options
        self.plans: dict = {}  # impl "triton": block plans by query-block size (built at the first layer)
        if impl == "triton":
            pass
        elif impl == "gathered":
            self.keys, self.mask = gather_plan(visible_end)
        elif impl in ("per_tree", "per_tree_bf16"):
            self.masks = [tree_mask(visible_end, a, b) for a, b in zip(offs, offs[1:])]
        elif impl == "dense":
            self.mask = tree_mask(visible_end)
        else:
            from torch.nn.attention.flex_attention import create_block_mask

            ve = visible_end

            def visible(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx < ve[kv_idx])

            self.block_mask = create_block_mask(visible, None, None, T, T, device=ve.device,
                                                BLOCK_SIZE=flex_block)

    @classmethod
    def from_batch(cls, batch, impl: str = DEFAULT_IMPL, **kw) -> "TreeAttention":
        """From a PackedBatch (already on the forward's device)."""
        return cls(batch.visible_end, batch.seq_offsets, impl, **kw)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _check_qkv(q, k, v, self.tokens, "TreeAttention")
        if self.impl == "triton":
            return self._triton(q, k, v)
        if self.impl == "gathered":
            return _gathered(q, k, v, self.keys, self.mask)
        if self.impl == "dense":
            return _sdpa(q, k, v, self.mask)
        if self.impl == "flex":
            return self._flex(q, k, v)
        cast = torch.bfloat16 if self.impl == "per_tree_bf16" else q.dtype
        sizes = [b - a for a, b in zip(self.offsets, self.offsets[1:])]
        parts = zip(*(t.to(cast).split(sizes) for t in (q, k, v)))  # split's backward is one cat
        outs = [_sdpa(qs, ks, vs, m) for (qs, ks, vs), m in zip(parts, self.masks)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(q.dtype)

    def _triton(self, q, k, v):
        from treepo_kernels.tree_attention import plan_tree_attention, tile_for, tree_attention

        dt = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
        block_q = tile_for(q.shape[1], k.shape[1])[1]
        if block_q not in self.plans:  # once per micro-batch: every layer has the same heads
            self.plans[block_q] = plan_tree_attention(self.visible_end, block_q)
        return tree_attention(q.to(dt), k.to(dt), v.to(dt), self.plans[block_q])[0]

    def _flex(self, q, k, v):
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("TreeAttention impl='flex' has no backward on a CPU in this torch "
                             f"({torch.__version__}); use it under torch.no_grad() or take impl='gathered'")
        if q.device.type == "cpu":  # flex refuses inputs that require grad there, even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, D]
        o = _compiled_flex()(q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1],
                             kernel_options=self.flex_options)
        return o[0].transpose(0, 1)

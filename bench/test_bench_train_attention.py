"""Training tree attention (treepo/train/tree_attention.py): one layer over a packed micro-batch.

Providers: the impls of `TreeAttention` - triton (treepo_kernels/tree_attention.py), gathered (the
CPU default), per_tree, dense (the reference's one SDPA with the [T, T] mask), per_tree_bf16 and
flex (compiled FlexAttention with a block mask) - and two baselines without tree packing, over one
row per leaf (prompt + its whole path, as packing "none" computes; inputs gathered into rows
outside the timed part): rows_sdpa (padded rows, causal SDPA) and rows_flash_attn (flash-attn's
`flash_attn_varlen_func` over the unpadded rows, CUDA, when installed). A row's output at a token
equals the packed output of that token, and weighting each row's output gradient by 1 / (rows
holding the token) makes the rows' input gradients, summed back onto the packed tokens, equal the
packed gradients: both are checked. Two benchmarks per shape: a no-grad forward
(`train_attention_fwd:<shape>`, e.g. the old policy's log-probs) and forward + backward
(`train_attention_fwd_bwd:<shape>`). The TreeAttention (masks, plans) is built once per
micro-batch outside the timed part (`setup_ms`); triton builds its plan at the first call, the
check. Inputs in `suite.torch_dtype` (fp32 on a CPU without native bf16, as the trainer's
autocast "auto"; bf16 on CUDA).

Skipped: FlexAttention's backward on a CPU (torch has none); flex on a CPU on the tiny shapes
(its first compile takes ~30 s); on CUDA, an impl whose estimated working memory (dense / per-tree
scores, gathered K/V copies) exceeds MEMORY_LIMIT (the paper shape runs triton, flex and the rows
baselines).

Shapes: micro-batches of `make_tree` trees (bench_tree_attention.py's builder) planned as its
`micro_batch` does (as many trees as fit in `budget` tokens): cpu = its two cases (SmolLM2 heads),
gpu = the same trees with 32 / 8 / 128 heads, larger trees and the paper's 16-leaf tree of
97,792 packed tokens. extra_info: trees, T (unique tokens), leaf_tokens (what per-leaf rows
compute), visible (query, key) pairs of the packed layout, TFLOP/s on that unique work for every
provider (forward 4 D H_q pairs; forward + backward 3.5x that, the FlashAttention convention).
Reference: `reference` below, the contract of `tree_attention_ref` in fp32, query block by block
(its backward by hand), so it fits the paper shape.
"""
import math
import time

import pytest
import torch
from bench_tree_attention import make_tree
from suite import check, need_module, need_triton, slug, torch_dtype

PROVIDERS = ["triton", "gathered", "per_tree", "dense", "per_tree_bf16", "flex", "rows_sdpa", "rows_flash_attn"]
MEMORY_LIMIT = 16 * 2**30  # bytes of an impl's largest intermediates (CUDA)


def _shapes(*specs):
    return [(slug(s[0].split(":")[0]), s) for s in specs]


# (id, (name, (H_q, H_kv, d), prompt, segment, branching per level, trees made, budget tokens))
SHAPES = {
    "tiny": _shapes(("tiny: 2 x (12 + 2 levels of 8)", (4, 2, 16), 12, 8, [2, 2], 2, 256)),
    "cpu": _shapes(("tree: 5 x (60 + 4 levels of 32, 8 leaves)", (9, 3, 64), 60, 32, [2, 2, 2, 1], 16, 4096),
                   ("seq: 3 x (60 + 8 x 128)", (9, 3, 64), 60, 128, [8], 16, 4096)),
    "gpu": _shapes(("tree: 5 x (60 + 4 levels of 32, 8 leaves)", (32, 8, 128), 60, 32, [2, 2, 2, 1], 16, 4096),
                   ("tree512: 2 x (512 + 4 levels of 256)", (32, 8, 128), 512, 256, [2, 2, 2, 1], 4, 16384),
                   ("paper: 512 + 16 leaves x 14 x 512", (32, 8, 128), 512, 512, [2, 2, 2, 2] + [1] * 10, 1, 10**6)),
}


def reference(q, k, v, visible_end, do, rows=128):
    """(out [T, H_q, D], dq, dk, dv) fp32: `tree_attention_ref` and its gradients for the output
    gradient do, `rows` queries at a time against the keys before them (softmax backward by hand)."""
    T, Hq, D = q.shape
    g = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D)
    qf, dof = (x.float().transpose(0, 1) for x in (q, do))  # [H_q, T, D]
    kf, vf = (x.float().repeat_interleave(g, 1).transpose(0, 1) for x in (k, v))  # [H_q, T, D]
    out, dq = torch.empty_like(qf), torch.empty_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    j = torch.arange(T, device=q.device)
    for s in range(0, T, rows):
        e = min(s + rows, T)
        i = j[s:e, None]
        mask = (j[None, :e] <= i) & (i < visible_end[None, :e])  # [n, e]: query i sees key j
        p = (qf[:, s:e] @ kf[:, :e].transpose(1, 2) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
        o = p @ vf[:, :e]  # [H_q, n, D]
        out[:, s:e] = o
        dob = dof[:, s:e]
        ds = p * (dob @ vf[:, :e].transpose(1, 2) - (dob * o).sum(-1, keepdim=True))  # dL/dscores
        dq[:, s:e] = ds @ kf[:, :e] * scale
        dk[:, :e] += ds.transpose(1, 2) @ qf[:, s:e] * scale
        dv[:, :e] += p.transpose(1, 2) @ dob
    per_kv = [x.transpose(0, 1).unflatten(1, (-1, g)).sum(2) for x in (dk, dv)]  # [T, H_kv, D]
    return out.transpose(0, 1), dq.transpose(0, 1), *per_kv


def leaf_rows(batch, trees):
    """Packed indices of each leaf's row (its tree's prompt, then its path's tokens): pos [n_leaves,
    L_max] int64 (0 past a row's end) and valid [n_leaves, L_max] bool."""
    W = int(batch.pair_pos.max()) + 1
    resp = torch.full((batch.n_leaves, W), -1, dtype=torch.long)
    resp[batch.pair_row, batch.pair_pos] = batch.target_index[batch.pair_unique]
    rows = []
    for tree, start in zip(trees, batch.seq_offsets.tolist()):
        prompt = torch.arange(start, start + len(tree.prompt_token_ids))
        for _ in tree.leaves:
            r = resp[len(rows)]
            rows.append(torch.cat([prompt, r[r >= 0]]))
    L = max(len(r) for r in rows)
    pos = torch.zeros(len(rows), L, dtype=torch.long)
    valid = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        pos[i, :len(r)] = r
        valid[i, :len(r)] = True
    return pos, valid


@pytest.fixture(scope="module")
def case(shape, device):
    """The packed micro-batch, inputs, output gradient and fp32 reference of one shape."""
    from treepo.train.batch import pack_trees, packed_size, plan_micro_batches

    name, (Hq, Hkv, D), prompt, seg, branching, n_trees, budget = shape[1]
    g = torch.Generator().manual_seed(0)
    trees = [make_tree(g, prompt, seg, branching) for _ in range(n_trees)]
    first = plan_micro_batches([packed_size(t) for t in trees], budget)[0]
    trees = [trees[i] for i in first]
    batch = pack_trees(trees, "tree")
    pos, valid = (x.to(device) for x in leaf_rows(batch, trees))
    batch = batch.to(device)
    T = batch.tokens
    dtype = torch_dtype(device)
    q = torch.randn(T, Hq, D, generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn(T, Hkv, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    go = torch.randn(T, Hq, D, generator=g).to(device, dtype)
    ref = reference(q.detach(), k.detach(), v.detach(), batch.visible_end, go)
    pairs = int((batch.visible_end - torch.arange(T, device=device)).sum())
    info = dict(trees=len(trees), T=T, leaf_tokens=batch.leaf_tokens, pairs=pairs, dtype=str(dtype))
    c = dict(batch=batch, q=q, k=k, v=v, go=go, ref=ref, info=info, flops=4 * D * Hq * pairs, pos=pos, valid=valid)
    yield c
    c.clear()  # free this shape's tensors before the next shape's are built
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _memory(impl, c) -> int:
    """Bytes of an impl's largest intermediates (an estimate, to skip what cannot fit)."""
    from treepo.train.tree_attention import GATHER_BLOCK, gather_plan

    batch, q, k = c["batch"], c["q"], c["k"]
    T, Hq, D = q.shape
    if impl == "dense":
        return Hq * T * T * 4
    if impl in ("per_tree", "per_tree_bf16"):
        return Hq * int((batch.seq_offsets[1:] - batch.seq_offsets[:-1]).max()) ** 2 * 4
    if impl == "gathered":
        K = gather_plan(batch.visible_end)[0].shape[1]
        nb = -(-T // GATHER_BLOCK)
        return nb * K * (2 * k.shape[1] * D * q.element_size() + GATHER_BLOCK * Hq * 4)
    return 0  # triton, flex, the rows baselines (causal SDPA: flash kernels on CUDA): O(T) memory


def _attention(provider, c, device, shape_set, backward, extra):
    """The provider's TreeAttention, built (skips when it cannot run here)."""
    from treepo.train.tree_attention import TreeAttention

    if provider == "triton":
        extra["interpreted"] = need_triton(device, shape_set)
    if provider == "flex" and device.type == "cpu":
        if backward:
            pytest.skip(f"FlexAttention has no backward on a CPU in torch {torch.__version__}")
        if shape_set == "tiny":
            pytest.skip("FlexAttention's first compile on a CPU takes ~30 s: not on the tiny shapes")
    t0 = time.perf_counter()
    attn = TreeAttention.from_batch(c["batch"], provider)
    extra["setup_ms"] = (time.perf_counter() - t0) * 1e3
    return attn


def _rows(provider, c, device):
    """(inputs, attend): the leaves' rows of q, k, v (leaf tensors; [n, H, L_max, D] padded for
    rows_sdpa, [R, H, D] unpadded for rows_flash_attn) and attend(q, k, v) -> output in that layout."""
    pos, valid = c["pos"], c["valid"]
    if provider == "rows_sdpa":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        inputs = [x.detach()[pos].transpose(1, 2).contiguous().requires_grad_() for x in (c["q"], c["k"], c["v"])]
        # right padding: a valid query's causal keys are all valid
        return inputs, lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True)
    fa = need_module("flash_attn", device)
    lens = valid.sum(1)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=device)
    cu[1:] = lens.cumsum(0)
    L = int(lens.max())
    inputs = [x.detach()[pos[valid]].requires_grad_() for x in (c["q"], c["k"], c["v"])]  # [R, H, D]
    return inputs, lambda q, k, v: fa.flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True)


def _from_rows(provider, c, x):
    """A rows-layout tensor's valid tokens, [R, H, D] in row order (pos[valid] gives their packed index)."""
    return x.transpose(1, 2)[c["valid"]] if provider == "rows_sdpa" else x


def _to_packed(provider, c, x):
    """Row gradients summed onto the packed tokens they were gathered from: [T, H, D]."""
    x = _from_rows(provider, c, x)
    out = torch.zeros(c["q"].shape[0], *x.shape[1:], dtype=torch.float32, device=x.device)
    return out.index_add_(0, c["pos"][c["valid"]], x.float())


def _tol_dtype(provider, q):
    return torch.bfloat16 if provider == "per_tree_bf16" else q.dtype


def _skip_if_too_big(provider, c, device):
    if device.type == "cuda" and _memory(provider, c) > MEMORY_LIMIT:
        pytest.skip(f"{provider} needs ~{_memory(provider, c) / 2**30:.0f} GiB of intermediates at T={c['q'].shape[0]}")


def test_train_attention_fwd(case, provider, shape, device, shape_set, timed):
    _skip_if_too_big(provider, case, device)
    q, k, v = case["q"], case["k"], case["v"]
    ref = case["ref"][0]
    if provider.startswith("rows_"):
        (qr, kr, vr), attend = _rows(provider, case, device)

        def fn():
            with torch.no_grad():
                return attend(qr, kr, vr)
        out, ref = _from_rows(provider, case, fn()), ref[case["pos"][case["valid"]]]
    else:
        attn = _attention(provider, case, device, shape_set, False, timed.extra_info)

        def fn():
            with torch.no_grad():
                return attn(0, q, k, v)
        out = fn()
    err = check(provider, out, ref, _tol_dtype(provider, q))
    s = timed(fn, f"train_attention_fwd:{shape[0]}", **case["info"], rel_err=err)
    if s:
        timed.extra_info["TFLOPs"] = case["flops"] / s / 1e12


def test_train_attention_fwd_bwd(case, provider, shape, device, shape_set, timed):
    _skip_if_too_big(provider, case, device)
    q, k, v, go = case["q"], case["k"], case["v"], case["go"]
    if provider.startswith("rows_"):
        inputs, attend = _rows(provider, case, device)
        pos, valid = case["pos"], case["valid"]
        holders = torch.bincount(pos[valid], minlength=q.shape[0]).clamp_min(1)  # rows holding each token
        go_rows = (go.float() / holders[:, None, None]).to(go.dtype)
        go_rows = go_rows[pos].transpose(1, 2) * valid[:, None, :, None] if provider == "rows_sdpa" \
            else go_rows[pos[valid]]

        def fn():
            return torch.autograd.grad(attend(*inputs), inputs, go_rows)
        grads = [_to_packed(provider, case, x) for x in fn()]
    else:
        attn = _attention(provider, case, device, shape_set, True, timed.extra_info)

        def fn():
            return torch.autograd.grad(attn(0, q, k, v), (q, k, v), go)
        grads = fn()
    tol = _tol_dtype(provider, q)
    errs = [check(f"{provider} d{n}", x, r, tol) for n, x, r in zip("qkv", grads, case["ref"][1:])]
    s = timed(fn, f"train_attention_fwd_bwd:{shape[0]}", **case["info"], rel_err=max(errs))
    if s:
        timed.extra_info["TFLOPs"] = 3.5 * case["flops"] / s / 1e12

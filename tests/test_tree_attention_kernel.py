"""The Triton tree attention for training (treepo_kernels/tree_attention.py) against its dense-mask
reference: output, LSE and dq / dk / dv over packed trees of every shape the sampler makes (chains,
stars, deep thin trees, fallback leaves, zero-length and 1-token nodes, several trees per
micro-batch, lengths that are not a multiple of the tile), GQA ratios 1 / 3 / 4, head dims
64 / 80 / 128, fp32 and fp16 (on a CPU through the Triton interpreter: tests/conftest.py sets
TRITON_INTERPRET=1; its bf16 dot is unreliable, bf16 is in the GPU tests). Also: the block plan
against a brute-force one, the chunked dK/dV reduction, determinism, a finite-difference check,
launcher errors, and GPU-only checks (bf16 on the paper's tree shape, a packed training step)."""
import itertools
import random

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close  # noqa: E402
from tree_cases import KINDS, random_tree  # noqa: E402

from treepo.train.batch import pack_trees  # noqa: E402
from treepo_kernels.tree_attention import (  # noqa: E402
    plan_tree_attention,
    tile_for,
    tree_attention,
    tree_attention_fwd,
    tree_attention_ref,
)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
HEADS = [(4, 4, 64), (9, 3, 80), (8, 2, 128)]  # g = 1, 3, 4; head dims 64, 80 (odd), 128
DTYPES = [torch.float32, torch.float16]
# atol of (out, lse, grads) relative to max(1, |reference|): fp32 kernels are exact up to summation
# order; fp16 rounds P and dS to fp16 before their matrix products (as FlashAttention does)
TOL = {torch.float32: (2e-5, 2e-5, 5e-5), torch.float16: (4e-3, 2e-3, 2e-2)}


def packed(kind: str, seed: int, n_trees: int = 3, **kw):
    """A micro-batch of n_trees random trees of one kind; long prompts make full (unmasked) tiles."""
    rng = random.Random(seed)
    kw = {"max_prompt": 40, "seg": 20, **kw}
    return pack_trees([random_tree(rng, kind, **kw) for _ in range(n_trees)])


def qkv(T, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    do = torch.randn(T, Hq, D, generator=g)
    return [t.to(DEV, dtype).requires_grad_() for t in (q, k, v)] + [do.to(DEV, dtype)]


def check_against_reference(visible_end, heads, dtype, block_q=16, block_n=16, max_q_blocks=3, what=""):
    """Kernel vs reference: out, lse, dq, dk, dv (the reference in fp32 on the same inputs)."""
    T = visible_end.shape[0]
    q, k, v, do = qkv(T, *heads, dtype)
    plan = plan_tree_attention(visible_end.to(DEV), block_q, block_n, max_q_blocks)
    out, lse = tree_attention(q, k, v, plan)
    grads = torch.autograd.grad(out, (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, ref_lse = tree_attention_ref(qf, kf, vf, visible_end.to(DEV))
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    t_out, t_lse, t_grad = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:2]
    scale = lambda r: max(1.0, float(r.detach().abs().max()))  # noqa: E731
    assert_close(out, ref, t_out * scale(ref), what=f"{what} out")
    assert_close(lse, ref_lse, t_lse * scale(ref_lse), what=f"{what} lse")
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert a.dtype == dtype
        assert_close(a, b, t_grad * scale(b), what=f"{what} {name}")
    return plan


CASES = [(kind, HEADS[i % 3], DTYPES[i % 2]) for i, kind in enumerate(KINDS)]  # each kind once, heads rotating


@pytest.mark.parametrize("kind,heads,dtype", CASES, ids=[f"{c[0]}-g{c[1][0] // c[1][1]}-d{c[1][2]}-{str(c[2])[6:]}"
                                                         for c in CASES])
def test_matches_reference(kind, heads, dtype):
    batch = packed(kind, seed=KINDS.index(kind), n_trees=2, **({"seg": 12} if kind == "deep" else {}))
    check_against_reference(batch.visible_end, heads, dtype, what=kind)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("heads", HEADS, ids=["g1d64", "g3d80", "g4d128"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_full_grid(kind, heads, dtype):
    batch = packed(kind, seed=100 + KINDS.index(kind))
    check_against_reference(batch.visible_end, heads, dtype, what=kind)


def test_default_tiles_and_full_blocks():
    """The launch the trainer makes (tile_for's block_q, 64-key tiles) on trees with long prompts:
    most of a prompt's tiles are full, and the last tiles are partial."""
    batch = packed("random", seed=7, n_trees=2, max_prompt=150, seg=40)
    hpp, block_q = tile_for(8, 2)
    assert (hpp, block_q) == (4, 16)
    plan = check_against_reference(batch.visible_end, (8, 2, 64), torch.float32, block_q, 64, 64, what="default")
    assert int(plan.q_kv_full.sum()) > 0 and batch.tokens % 64 != 0


def test_mha_wide_rows_and_gqa8():
    """hpp = 1 with 64-token query blocks, and g = 8 (all 8 heads of a KV head in one program)."""
    batch = packed("deep", seed=11, n_trees=2)
    check_against_reference(batch.visible_end, (2, 2, 64), torch.float32, 64, 32, what="mha")
    check_against_reference(batch.visible_end, (8, 1, 32), torch.float32, 16, 32, what="gqa8")


def brute_force_plan(ve: torch.Tensor, block_q: int, block_n: int):
    """Per query block: {key block: full?} from the dense mask."""
    T = ve.shape[0]
    i = torch.arange(T)
    mask = (i[None, :] <= i[:, None]) & (i[:, None] < ve[None, :])
    out = []
    for a in range(0, T, block_q):
        row = {}
        for b in range(0, T, block_n):
            tile = mask[a:a + block_q, b:b + block_n]
            if tile.any():
                row[b // block_n] = bool(tile.all()) and tile.shape == (block_q, block_n)
        out.append(row)
    return out


@pytest.mark.parametrize("kind,bq,bn", [("random", 16, 16), ("deep", 16, 32), ("star", 32, 16), ("tiny", 16, 64),
                                         ("fallbackk", 64, 16)])
def test_plan_is_the_mask_in_blocks(kind, bq, bn):
    """Each query block visits exactly the key blocks holding a key it can see, full ones (no mask
    needed) first, ascending; the transpose and the dK/dV chunks cover the same tiles."""
    batch = packed(kind, seed=3, max_prompt=70)
    ve = batch.visible_end
    plan = plan_tree_attention(ve, bq, bn, max_q_blocks=2)
    want = brute_force_plan(ve, bq, bn)
    ptr, nfull, idx = plan.q_kv_ptr.tolist(), plan.q_kv_full.tolist(), plan.q_kv.tolist()
    n_full_total = 0
    for b, row in enumerate(want):
        got = idx[ptr[b]:ptr[b + 1]]
        full, masked = got[:nfull[b]], got[nfull[b]:]
        assert full == sorted(c for c, f in row.items() if f) and masked == sorted(c for c, f in row.items() if not f)
        n_full_total += len(full)
    assert n_full_total > 0 or kind == "tiny", "the grid should include full tiles"
    tiles = {(b, c) for b, row in enumerate(want) for c in row}
    kptr, kidx = plan.kv_q_ptr.tolist(), plan.kv_q.tolist()
    assert {(b, c) for c in range(len(kptr) - 1) for b in kidx[kptr[c]:kptr[c + 1]]} == tiles
    items = sorted(zip(plan.item_kb.tolist(), plan.item_start.tolist(), plan.item_end.tolist()))
    covered = [(kidx[e], c) for c, s, t in items for e in range(s, t)]
    assert sorted(covered) == sorted(tiles) and all(t - s <= 2 for _, s, t in items)
    parts = plan.split_parts.tolist()
    assert sorted(p for row in parts for p in row if p < plan.n_parts) == list(range(plan.n_parts))


def test_chunked_dkdv_equals_one_program_per_key_block():
    """Cutting a prompt's long list of query blocks into chunks (fp32 partials summed afterwards)
    gives the same gradients as one program walking the whole list."""
    batch = packed("star", seed=5, n_trees=1, max_prompt=60, seg=30)
    q, k, v, do = qkv(batch.tokens, 4, 2, 32, torch.float32)
    grads = []
    for mq in (1, 2, 10**6):
        plan = plan_tree_attention(batch.visible_end.to(DEV), 16, 16, mq)
        assert (plan.n_parts > 0) == (mq < 10**6)
        out, _ = tree_attention(q, k, v, plan)
        grads.append(torch.autograd.grad(out, (q, k, v), do))
    for g in grads[:2]:
        for name, a, b in zip(("dq", "dk", "dv"), g, grads[2]):
            assert_close(a, b, 1e-5, what=f"chunked {name}")


def test_deterministic():
    """Two runs give bit-identical outputs and gradients (no atomics, fixed orders)."""
    batch = packed("random", seed=9, n_trees=1)
    q, k, v, do = qkv(batch.tokens, 4, 2, 32, torch.float16)
    plan = plan_tree_attention(batch.visible_end.to(DEV), 16, 16, 2)
    runs = []
    for _ in range(2):
        out, lse = tree_attention(q, k, v, plan)
        runs.append((out, lse, *torch.autograd.grad(out, (q, k, v), do)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_finite_differences():
    """Gradients against central differences of the kernel itself, fp32, along random directions."""
    batch = packed("fallback0", seed=2, n_trees=2, max_prompt=20, seg=8)
    q, k, v, do = qkv(batch.tokens, 4, 2, 16, torch.float32)
    plan = plan_tree_attention(batch.visible_end.to(DEV), 16, 16, 2)
    out, _ = tree_attention(q, k, v, plan)
    grads = torch.autograd.grad(out, (q, k, v), do)
    f = lambda a, b, c: float((tree_attention(a, b, c, plan)[0].double() * do.double()).sum())  # noqa: E731
    g = torch.Generator().manual_seed(1)
    eps = 1e-2
    for which in range(3):
        for _ in range(2):
            u = torch.randn(q.shape if which == 0 else k.shape, generator=g).to(DEV)
            args = [t.detach() for t in (q, k, v)]
            plus = [a + eps * u if n == which else a for n, a in enumerate(args)]
            minus = [a - eps * u if n == which else a for n, a in enumerate(args)]
            fd = (f(*plus) - f(*minus)) / (2 * eps)
            an = float((grads[which].double() * u.double()).sum())
            assert abs(fd - an) <= 2e-3 * max(1.0, abs(an)), f"d{'qkv'[which]}: finite difference {fd}, grad {an}"


def test_errors_name_the_input():
    batch = packed("chain", seed=1, n_trees=1)
    T = batch.tokens
    plan = plan_tree_attention(batch.visible_end.to(DEV), 16, 16)
    q, k, v, _ = qkv(T, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="H_kv dividing H_q"):
        tree_attention(q, k[:, :1].expand(T, 3, 16), v[:, :1].expand(T, 3, 16), plan)
    with pytest.raises(ValueError, match=f"plan was built for T = {T}"):
        tree_attention(q[:-1], k[:-1], v[:-1], plan)
    with pytest.raises(ValueError, match="one dtype"):
        tree_attention(q, k.half(), v.half(), plan)
    with pytest.raises(ValueError, match="one dtype"):
        tree_attention_fwd(q.double(), k.double(), v.double(), plan)
    ve = batch.visible_end.clone()
    ve[3] = 3
    with pytest.raises(ValueError, match=r"visible_end\[3\] = 3"):
        plan_tree_attention(ve)
    with pytest.raises(ValueError, match="block_n=48"):
        plan_tree_attention(batch.visible_end, 16, 48)
    with pytest.raises(ValueError, match="non-empty integer"):
        plan_tree_attention(batch.visible_end.float())


def test_noncontiguous_inputs():
    """q, k, v as the model makes them (views of a fused projection) give the same result."""
    batch = packed("star", seed=4, n_trees=2)
    T, D = batch.tokens, 32
    fused = torch.randn(T, (4 + 2 + 2) * D, device=DEV)
    q, k, v = fused.split([4 * D, 2 * D, 2 * D], 1)
    q, k, v = q.view(T, 4, D), k.view(T, 2, D), v.view(T, 2, D)
    plan = plan_tree_attention(batch.visible_end.to(DEV), 16, 16)
    out, _ = tree_attention(q, k, v, plan)
    ref, _ = tree_attention_ref(q, k, v, batch.visible_end.to(DEV))
    assert_close(out, ref, 2e-5, what="non-contiguous")


# ------------------------------------------------------------------------------------ GPU only

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def full_tree_visible_end(prompt: int, seg: int, branching: list[int]) -> torch.Tensor:
    """visible_end of one packed full tree (depth first), without building token lists."""
    ends = []

    def visit(depth, start):  # returns the end of this subtree; appends its nodes' ranges
        n_children = branching[depth] if depth < len(branching) else 0
        pos = start + seg
        idx = len(ends)
        ends.append([start, seg, None])
        for _ in range(n_children):
            pos = visit(depth + 1, pos)
        ends[idx][2] = pos
        return pos

    ends.append([0, prompt, None])
    end = prompt
    for _ in range(branching[0]):
        end = visit(1, end)
    ends[0][2] = end
    ve = torch.empty(end, dtype=torch.int64)
    for s, n, e in ends:
        ve[s:s + n] = e
    return ve


def chunked_reference(q, k, v, ve, do, chunk=1024):
    """fp32 out, lse, dq, dk, dv of the tree attention without a [H, T, T] tensor: query rows in
    chunks against every key of the chunk's past (the formulas of the backward, explicitly)."""
    T, Hq, D = q.shape
    g = Hq // k.shape[1]
    scale = D ** -0.5
    qf, kf, vf, dof = (t.float() for t in (q, k, v, do))
    kf, vf = kf.repeat_interleave(g, 1), vf.repeat_interleave(g, 1)
    out, lse, dq = torch.empty_like(qf), torch.empty(T, Hq, device=q.device), torch.empty_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    j = torch.arange(T, device=q.device)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        i = torch.arange(a, b, device=q.device)
        mask = (j[None, :b] <= i[:, None]) & (i[:, None] < ve[None, :b])  # [n, b]
        s = torch.einsum("ihd,jhd->hij", qf[a:b], kf[:b]) * scale
        s = s.masked_fill(~mask, float("-inf"))
        ls = torch.logsumexp(s, -1)  # [H, n]
        p = torch.exp(s - ls[..., None])
        o = torch.einsum("hij,jhd->ihd", p, vf[:b])
        out[a:b], lse[a:b] = o, ls.T
        dp = torch.einsum("ihd,jhd->hij", dof[a:b], vf[:b])
        ds = p * (dp - (dof[a:b] * o).sum(-1).T[..., None])
        dq[a:b] = torch.einsum("hij,jhd->ihd", ds, kf[:b]) * scale
        dk[:b] += torch.einsum("hij,ihd->jhd", ds, qf[a:b]) * scale
        dv[:b] += torch.einsum("hij,ihd->jhd", p, dof[a:b])
    fold = lambda t: t.view(T, -1, g, D).sum(2)  # noqa: E731
    return out, lse, dq, fold(dk), fold(dv)


def test_chunked_reference_is_the_reference():
    """The GPU test's memory-light reference equals the dense one (so it can stand in for it)."""
    ve = full_tree_visible_end(20, 9, [2, 2, 1])
    q, k, v, do = qkv(ve.shape[0], 6, 2, 16, torch.float32)
    q, k, v = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    ref, ref_lse = tree_attention_ref(q, k, v, ve)
    want = (ref, ref_lse, *torch.autograd.grad(ref, (q, k, v), do.cpu()))
    got = chunked_reference(q.detach(), k.detach(), v.detach(), ve, do.cpu(), chunk=16)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert_close(a, b, 1e-5, what=f"chunked reference {name}")


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)])
def test_gpu_bf16_paper_shape(heads):
    """TreePO's shape: a 512-token prompt, 16 leaves (branching 2, 2, 2, 2), 14 segments of 512
    tokens per path (97,792 packed tokens); bf16 kernel vs an fp32 reference on the same bf16
    inputs, within bf16 tolerance (relative Frobenius error)."""
    ve = full_tree_visible_end(512, 512, [2, 2, 2, 2] + [1] * 10).cuda()
    T = ve.shape[0]
    q, k, v, do = qkv(T, *heads, torch.bfloat16)
    plan = plan_tree_attention(ve, tile_for(heads[0], heads[1])[1])
    out, lse = tree_attention(q, k, v, plan)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = chunked_reference(q.detach(), k.detach(), v.detach(), ve, do, chunk=512)  # ~25 GB at H_q 32
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref):
        assert rel_err(a, b) < 1.5e-2, f"{name}: relative error {rel_err(a, b):.3g}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_grid(dtype):
    """The CPU grid's trees on the device in bf16 / fp16 (compiled kernels, not the interpreter)."""
    for kind, heads in itertools.product(KINDS, HEADS):
        batch = packed(kind, seed=KINDS.index(kind))
        T = batch.tokens
        q, k, v, do = qkv(T, *heads, dtype)
        plan = plan_tree_attention(batch.visible_end.cuda(), tile_for(heads[0], heads[1])[1])
        out, lse = tree_attention(q, k, v, plan)
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref = chunked_reference(q.detach(), k.detach(), v.detach(), batch.visible_end.cuda(), do)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref):
            assert rel_err(a, b) < 2e-2, f"{kind} {heads} {name}: relative error {rel_err(a, b):.3g}"

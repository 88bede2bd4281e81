"""Packed-tree attention: every impl vs the dense-mask reference, and the packed forward's log-probs
vs a plain dense forward of each leaf (prompt + response) on tiny models of every family."""
import functools
import random

import pytest
import torch
from helpers import FAMILIES, assert_close, tiny_hf_model
from tree_cases import KINDS, random_tree

from treepo.engine.config import ModelConfig
from treepo.engine.loader import load_state
from treepo.engine.model import CausalLM
from treepo.train.batch import pack_trees
from treepo.train.tree_attention import IMPLS, TreeAttention, gather_plan, tree_attention_ref

GRAD_IMPLS = [i for i in IMPLS if i not in ("flex", "triton")]  # no FlexAttention backward on a CPU; the
# Triton kernel's grid is tests/test_tree_attention_kernel.py (here: in the model, below)
TOL = {"per_tree_bf16": 3e-2}  # the rest are fp32


def _packed(kind: str, seed: int, n_trees: int = 3, share: str = "tree", **kw):
    rng = random.Random(seed)
    return pack_trees([random_tree(rng, kind, **kw) for _ in range(n_trees)], share)


def _qkv(T, Hq, Hkv, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, Hq, D, generator=g).requires_grad_(), torch.randn(T, Hkv, D, generator=g).requires_grad_(),
            torch.randn(T, Hkv, D, generator=g).requires_grad_(), torch.randn(T, Hq, D, generator=g))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("impl", GRAD_IMPLS)
def test_impl_matches_reference(kind, heads, impl):
    """Outputs and q/k/v gradients; seg=40 makes trees longer than one 64-query block of "gathered"."""
    batch = _packed(kind, seed=hash((kind, impl)) % 1000, seg=40 if kind in ("chain", "random") else 6)
    q, k, v, go = _qkv(batch.tokens, *heads)
    ref = tree_attention_ref(q, k, v, batch.visible_end)
    out = TreeAttention.from_batch(batch, impl)(0, q, k, v)
    tol = TOL.get(impl, 1e-5)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, atol=tol, what=f"{impl} {kind} output")
    got = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, atol=tol * 3, what=f"{impl} {kind} d{name}")


def test_reference_is_the_mask_and_never_crosses_trees():
    batch = _packed("random", seed=3, n_trees=4)
    m = batch.mask()
    offs = batch.seq_offsets.tolist()
    for a, b in zip(offs, offs[1:]):
        assert not m[a:b, :a].any() and not m[a:b, b:].any()
    keys, mask = gather_plan(batch.visible_end, block=8)
    for blk in range(keys.shape[0]):  # the gathered mask is the dense mask, re-indexed
        for r in range(8):
            i = blk * 8 + r
            if i < batch.tokens:
                seen = set(keys[blk][mask[blk, 0, r]].tolist())
                assert seen == set(m[i].nonzero()[:, 0].tolist())


@pytest.mark.slow
def test_flex_forward_matches_reference():
    """Compiled FlexAttention (forward only on a CPU; ~20 s of compiling): one GQA case, a T not a
    multiple of its tile."""
    batch = _packed("random", seed=5, n_trees=3, seg=40)
    q, k, v, _ = _qkv(batch.tokens, 6, 2)
    with torch.no_grad():
        out = TreeAttention.from_batch(batch, "flex")(0, q, k, v)
        ref = tree_attention_ref(q, k, v, batch.visible_end)
    assert batch.tokens % 128
    assert_close(out, ref, atol=1e-5, what="flex output")


def test_flex_forward_only_on_cpu_says_so():
    batch = _packed("star", seed=0, n_trees=1)
    q, k, v, _ = _qkv(batch.tokens, 4, 2)
    with pytest.raises(ValueError, match="impl='flex' has no backward on a CPU"):
        TreeAttention.from_batch(batch, "flex")(0, q, k, v)


def test_errors_name_the_input():
    ve = torch.tensor([3, 3, 3, 5, 5])
    with pytest.raises(ValueError, match="impl='fast'; valid: auto, triton, gathered, per_tree"):
        TreeAttention(ve, impl="fast")
    with pytest.raises(ValueError, match=r"visible_end\[1\] = 1; it must lie in \(1, 5\]"):
        TreeAttention(torch.tensor([3, 1, 3, 5, 5]))
    with pytest.raises(ValueError, match=r"visible_end\[2\] = 4; it must lie in \(2, 3\]"):
        TreeAttention(torch.tensor([3, 3, 4, 5, 5]), torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match=r"seq_offsets \[0, 3, 4\] must rise strictly from 0 to T = 5"):
        TreeAttention(ve, torch.tensor([0, 3, 4]))
    with pytest.raises(ValueError, match="must be a non-empty integer"):
        TreeAttention(ve.float())
    q, k, v, _ = _qkv(4, 4, 2)
    with pytest.raises(ValueError, match=r"T = 5 packed tokens.*got q \(4, 4, 8\)"):
        TreeAttention(ve)(0, q, k, v)


# ---------------------------------------------------------------------------- the model, packed vs dense

@functools.lru_cache(maxsize=None)
def _model(family: str) -> CausalLM:
    hf = tiny_hf_model(family)
    with torch.device("meta"):
        ours = CausalLM(ModelConfig.from_hf(hf.config.to_dict()))
    load_state(ours, dict(hf.state_dict()), source=family)
    return ours.eval()


def _trees(seed: int):
    rng = random.Random(seed)
    return [random_tree(rng, kind) for kind in KINDS]


def _dense_leaves(model, trees):
    """A plain dense forward of every leaf's prompt + response (one right-padded [n_leaves, L] batch)
    and the full log-softmax: per leaf (logp [L], entropy [L]) of its response, with grad."""
    rows = [(t.prompt_token_ids, list(leaf.token_ids)) for t in trees for leaf in t.leaves]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), 2)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
    lsm = torch.log_softmax(model.logits(model(ids, attention_mask=mask)).float(), -1)  # [n, width, V]
    out = []
    for i, (p, r) in enumerate(rows):
        x = lsm[i, len(p) - 1:len(p) - 1 + len(r)]
        out.append((x.gather(-1, torch.tensor(r)[:, None])[:, 0], -(x.exp() * x).sum(-1)))
    return out


def _packed_scores(model, batch, impl="gathered"):
    return model(batch.input_ids, batch.position_ids, attn=TreeAttention.from_batch(batch, impl),
                 labels=batch.labels, label_positions=batch.pred_index)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("share", ["tree", "prompt"])
def test_packed_forward_equals_dense_per_leaf(family, share):
    """THE key test: every response token of every leaf, one tree of every kind in one packed batch."""
    model = _model(family)
    for seed in (0, 1):
        trees = _trees(seed)
        batch = pack_trees(trees, share)
        with torch.no_grad():
            logp, ent = _packed_scores(model, batch)
            dense = _dense_leaves(model, trees)
        assert logp.shape == ent.shape == batch.labels.shape
        width = max(len(lf.token_ids) for t in trees for lf in t.leaves)
        lp_rows, ent_rows = batch.scatter(logp, width), batch.scatter(ent, width)
        assert len(dense) == batch.n_leaves
        for r, (lp, en) in enumerate(dense):
            L = lp.shape[0]
            assert_close(lp_rows[r, :L], lp, atol=1e-5, what=f"{family} {share} seed {seed} leaf {r} logp")
            assert_close(ent_rows[r, :L], en, atol=1e-5, what=f"{family} {share} seed {seed} leaf {r} entropy")
            assert (lp_rows[r, L:] == 0).all()


def test_training_attention_that_cannot_run_here_is_refused(monkeypatch):
    from treepo.train.tree_attention import check_attention

    with pytest.raises(ValueError, match="attention='flex' has no backward on a CPU"):
        check_attention("flex", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention='triton' runs on CUDA \\(here: cpu"):
        check_attention("triton", "cpu")
    for impl in ("auto", "gathered", "per_tree"):
        check_attention(impl, "cpu")


def test_auto_is_triton_on_cuda_only():
    batch = _packed("star", seed=0, n_trees=1)
    assert TreeAttention.from_batch(batch).impl == ("triton" if torch.cuda.is_available() else "gathered")


@pytest.mark.parametrize("impl", ["per_tree", "dense", "triton"])
def test_other_impls_in_the_model(impl):
    model = _model("qwen3_norms_gqa4")
    batch = pack_trees(_trees(2), "tree")
    with torch.no_grad():
        want, _ = _packed_scores(model, batch, "gathered")
        got, _ = _packed_scores(model, batch, impl)
    assert_close(got, want, atol=1e-5, what=impl)


@pytest.mark.parametrize("family,impl", [("llama_mha_tied", "gathered"), ("qwen2_bias_gqa3", "gathered"),
                                         ("qwen3_norms_gqa4", "triton")])
def test_packed_gradient_equals_dense(family, impl):
    """sum over (leaf, token) pairs of logp: the packed backward gives the padded per-leaf one's
    parameter gradients (a shared token's gradient is the sum over the leaves that hold it); with
    the Triton kernel (interpreted on a CPU) as with the CPU default."""
    model = _model(family)
    trees = _trees(3)
    batch = pack_trees(trees, "tree")
    model.zero_grad()
    logp, _ = _packed_scores(model, batch, impl)
    w = torch.randn(batch.n_leaves, 64, generator=torch.Generator().manual_seed(0))
    (batch.scatter(logp, 64) * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(((lp * w[r, :lp.shape[0]]).sum() for r, (lp, _) in enumerate(_dense_leaves(model, trees)))).backward()
    for n, p in model.named_parameters():
        assert_close(got[n], p.grad, atol=1e-4, what=f"{family} d{n}")
    model.zero_grad()


def test_packed_mode_errors():
    model = _model("llama_mha_tied")
    batch = pack_trees(_trees(0)[:2], "tree")
    attn = TreeAttention.from_batch(batch)
    with pytest.raises(ValueError, match="packed scoring takes flat input_ids"):
        model(batch.input_ids, batch.position_ids, attn=attn, labels=batch.labels, label_positions=batch.pred_index[1:])
    with pytest.raises(ValueError, match="dense scoring takes labels"):
        model(batch.input_ids[None], labels=batch.labels[None])

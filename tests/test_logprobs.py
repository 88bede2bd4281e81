"""linear_logprobs (the LM head fused into the log-prob, chunked over rows) vs the full computation."""
import pytest
import torch
from helpers import assert_close

from treepo.logprobs import linear_logprobs, linear_logprobs_ref

# (rows R, hidden H, vocab V, chunk): R = 1, R not a multiple of chunk, chunk > R, chunk = 1, V odd
SHAPES = [(1, 8, 17, 4), (13, 8, 33, 5), (7, 16, 31, 64), (9, 4, 10, 1), (32, 12, 97, 8), (5, 3, 1, 2)]


def _case(R, H, V, seed=0, dtype=torch.float32, ignore=(2,)):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(R, H, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (R,), generator=g)
    for i in ignore:
        if i < R:
            labels[i] = -100
    return hidden, weight, labels


def _grads(logp, hidden, weight, seed=1):
    w = torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((logp * w).sum(), (hidden, weight))


@pytest.mark.parametrize("R, H, V, chunk", SHAPES)
def test_matches_full_log_softmax(R, H, V, chunk):
    hidden, weight, labels = _case(R, H, V)
    logp, ent = linear_logprobs(hidden, weight, labels, chunk=chunk)
    ref, ref_ent = linear_logprobs_ref(hidden, weight, labels)
    assert logp.dtype == torch.float32 and logp.shape == (R,) and ent.shape == (R,)
    assert not ent.requires_grad
    assert_close(logp, ref, atol=1e-5, what="logp")
    assert_close(ent, ref_ent, atol=1e-5, what="entropy")
    gh, gw = _grads(logp, hidden, weight)
    rh, rw = _grads(ref, hidden, weight)
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    assert_close(gh, rh, atol=1e-5, what="dlogp/dhidden")
    assert_close(gw, rw, atol=1e-5, what="dlogp/dweight")
    if R > 2:
        assert logp[2] == 0 and gh[2].abs().sum() == 0  # ignored label: 0, no gradient


def test_entropy_against_softmax_definition():
    hidden, weight, labels = _case(6, 8, 21)
    _, ent = linear_logprobs(hidden, weight, labels, chunk=4)
    p = torch.softmax((hidden @ weight.T).float(), -1)
    assert_close(ent, -(p * p.log()).sum(-1), atol=1e-5, what="entropy")
    assert_close(linear_logprobs(torch.zeros(1, 4), torch.randn(8, 4), torch.tensor([3]))[1],
                 torch.tensor([8.0]).log(), atol=1e-6, what="uniform entropy")


def test_all_labels_ignored():
    hidden, weight, labels = _case(5, 4, 11, ignore=range(5))
    logp, ent = linear_logprobs(hidden, weight, labels, chunk=2)
    assert (logp == 0).all() and (ent > 0).all()
    gh, gw = _grads(logp, hidden, weight)
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_leading_dims_and_no_rows():
    hidden, weight, labels = _case(12, 8, 19)
    logp, ent = linear_logprobs(hidden.view(3, 4, 8), weight, labels.view(3, 4), chunk=5)
    ref, ref_ent = linear_logprobs_ref(hidden, weight, labels)
    assert logp.shape == (3, 4)
    assert_close(logp.reshape(-1), ref, atol=1e-5)
    empty, _ = linear_logprobs(hidden[:0], weight, labels[:0])
    assert empty.shape == (0,)
    empty.sum().backward()
    assert weight.grad.abs().sum() == 0


def test_tied_embedding_weight_gets_both_gradients():
    """weight shared with an embedding: its gradient is the embedding's plus the head's."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(23, 8)
    ids = torch.randint(0, 23, (9,))
    labels = torch.randint(0, 23, (9,))
    grads = []
    for fused in (True, False):
        emb.weight.grad = None
        h = torch.tanh(emb(ids))
        lp = linear_logprobs(h, emb.weight, labels, chunk=4)[0] if fused else \
            linear_logprobs_ref(h, emb.weight, labels)[0]
        lp.sum().backward()
        grads.append(emb.weight.grad.clone())
    assert_close(grads[0], grads[1], atol=1e-5, what="tied weight grad")


@pytest.mark.parametrize("chunk", [3, 1024])
def test_bf16_autocast_fp32_master_weights(chunk):
    hidden, weight, labels = _case(11, 16, 41)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = linear_logprobs(hidden, weight, labels, chunk=chunk)
        ref, ref_ent = linear_logprobs_ref(hidden, weight, labels)  # autocast's bf16 matmul, fp32 after
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert_close(logp, ref, atol=2e-2, rtol=1e-2, what="bf16 logp")
    assert_close(ent, ref_ent, atol=2e-2, rtol=1e-2, what="bf16 entropy")
    full, _ = linear_logprobs_ref(hidden, weight, labels)  # fp32: bf16 rounding of the inputs only
    assert_close(logp, full, atol=0.3, rtol=0.02, what="bf16 vs fp32 logp")
    gh, gw = _grads(logp, hidden, weight)
    rh, rw = _grads(full, hidden, weight)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32  # each input's own dtype
    scale_h, scale_w = rh.abs().max(), rw.abs().max()
    assert_close(gh / scale_h, rh / scale_h, atol=3e-2, what="bf16 dhidden (relative)")
    assert_close(gw / scale_w, rw / scale_w, atol=3e-2, what="bf16 dweight (relative)")


def test_bf16_inputs_give_bf16_grads():
    hidden, weight, labels = _case(7, 8, 13, dtype=torch.bfloat16)
    logp, _ = linear_logprobs(hidden, weight, labels, chunk=3)
    ref, _ = linear_logprobs_ref(hidden, weight, labels)
    assert_close(logp, ref, atol=2e-2, rtol=1e-2, what="bf16 logp")
    gh, gw = _grads(logp, hidden, weight)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16


def test_errors_name_the_input():
    hidden, weight, labels = _case(4, 8, 11)
    with pytest.raises(ValueError, match=r"labels \(5,\) must match hidden \(4, 8\)"):
        linear_logprobs(hidden, weight, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be integer token ids, got torch.float32"):
        linear_logprobs(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="chunk=0 must be an integer >= 1"):
        linear_logprobs(hidden, weight, labels, chunk=0)
    with pytest.raises(ValueError, match=r"weight \(11, 7\) must be \[V, H\] with H = hidden's last dim 8"):
        linear_logprobs(hidden, torch.randn(11, 7), labels)

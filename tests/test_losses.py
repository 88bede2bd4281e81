"""DAPO policy loss (docs/algorithm.md section 3): values and gradients against hand-computed
numbers for every clip branch, token-mean normalisation over micro-batches, KL terms, and the
chunked log-prob / entropy helpers against plain PyTorch."""
import math

import pytest
import torch
from helpers import assert_close

from treepo.losses import entropy_from_logits, policy_loss, selective_logprobs, token_count_for_step

# --------------------------------------------------------------------------- hand-worked tokens
# eps_low 0.2, eps_high 0.28, dual clip c = 10.  logp_old = 0, so r = exp(logp).
#  tok  A    r       -A r   -A clip(r)   max     dual (A<0)   l       dl/dlogp      branch
#  0   +1   1.5     -1.5   -1.28        -1.28   -            -1.28   0             clip-high (clipfrac)
#  1   +1   1.1     -1.1   -1.1         -1.1    -            -1.1    -A r = -1.1   unclipped
#  2   -1   0.5      0.5    0.8          0.8    min(.8,10)    0.8    0             clip-low (clipfrac)
#  3   -1   20       20     1.28         20     min(20,10)    10     0             dual clip (clipfrac_lower)
#  4   -2   1.2      2.4    2.4          2.4    min(2.4,20)   2.4    -A r = 2.4    unclipped, inside
#  5   +1   e^30->e^20 (log-ratio clamped)                    -1.28   0             clip-high (clipfrac)
#  6   +3   0.9 but masked out                                  -      0
# valid tokens: 0..5 (6); sum l = -1.28 - 1.1 + 0.8 + 10 + 2.4 - 1.28 = 9.54; loss = 9.54 / 6 = 1.59
R = [1.5, 1.1, 0.5, 20.0, 1.2, None, 0.9]
A = [1.0, 1.0, -1.0, -1.0, -2.0, 1.0, 3.0]
MASK = [1, 1, 1, 1, 1, 1, 0]
L = [-1.28, -1.1, 0.8, 10.0, 2.4, -1.28]
DL = [0.0, -1.1, 0.0, 0.0, 2.4, 0.0, 0.0]


def _case():
    logp = torch.tensor([[math.log(r) if r else 30.0 for r in R]], requires_grad=True)
    return logp, torch.zeros(1, 7), torch.tensor([A]), torch.tensor([MASK])


def test_policy_loss_value_and_gradient_hand_computed():
    logp, old, adv, mask = _case()
    loss, m = policy_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(sum(L) / 6, abs=1e-6)
    assert loss.item() == pytest.approx(1.59, abs=1e-6)
    loss.backward()
    assert_close(logp.grad, torch.tensor([DL]) / 6, atol=1e-6, what="dloss/dlogp")
    assert m["pg_loss"].item() == pytest.approx(1.59, abs=1e-6)
    assert m["pg_clipfrac"].item() == pytest.approx(3 / 6)  # tokens 0, 2, 5
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 6)  # token 3
    # ppo_kl = mean(logp_old - logp) over valid tokens, log-ratio clamped at 20 for token 5
    kl = -(math.log(1.5) + math.log(1.1) + math.log(0.5) + math.log(20) + math.log(1.2) + 20) / 6
    assert m["ppo_kl"].item() == pytest.approx(kl, abs=1e-6)
    assert set(m) == {"pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in m.values())


@pytest.mark.parametrize("tok, loss, grad", [
    (0, -1.28, 0.0),  # A > 0, r > 1 + eps_high: clipped, no gradient
    (1, -1.1, -1.1),  # inside the trust region: -A r, gradient -A r
    (2, 0.8, 0.0),  # A < 0, r < 1 - eps_low: clipped at -A (1 - eps_low)
    (3, 10.0, 0.0),  # A < 0, r > c: dual clip -c A
    (4, 2.4, 2.4),
])
def test_policy_loss_each_branch_alone(tok, loss, grad):
    logp = torch.tensor([[math.log(R[tok])]], requires_grad=True)
    out, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([[A[tok]]]), torch.ones(1, 1))
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert logp.grad.item() == pytest.approx(grad, abs=1e-6)


def test_dual_clip_off_and_other_clip_ranges():
    logp = torch.tensor([[math.log(20.0)]], requires_grad=True)
    out, m = policy_loss(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), dual_clip=None)
    out.backward()
    assert out.item() == pytest.approx(20.0) and logp.grad.item() == pytest.approx(20.0)  # -A r, unbounded
    assert m["pg_clipfrac_lower"].item() == 0.0
    # symmetric PPO clip 0.1: r = 1.15, A = 1 -> -1.1
    out, m = policy_loss(torch.tensor([[math.log(1.15)]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
                         eps_low=0.1, eps_high=0.1)
    assert out.item() == pytest.approx(-1.1) and m["pg_clipfrac"].item() == 1.0


def test_per_sequence_advantages_broadcast():
    logp, old, _, mask = _case()
    a2d, _ = policy_loss(logp, old, torch.full((1, 7), -1.0), mask)
    a1d, _ = policy_loss(logp, old, torch.tensor([-1.0]), mask)
    assert a1d.item() == a2d.item()


# --------------------------------------------------------------------------- token-mean normalisation

def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    logp = (torch.randn(B, T, generator=g) * 0.3 - 1.0).requires_grad_()
    old = logp.detach() + torch.randn(B, T, generator=g) * 0.3  # ratios on both sides of the clip
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()
    lengths = torch.tensor([7, 1, 4, 6, 2, 5])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logp, old, adv, mask


def test_token_mean_same_for_one_and_two_micro_batches():
    logp, old, adv, mask = _batch()
    full, _ = policy_loss(logp, old, adv, mask)
    full.backward()
    g_full = logp.grad.clone()
    logp.grad = None
    parts = [slice(0, 2), slice(2, 6)]  # uneven: 8 and 17 valid tokens
    n = token_count_for_step([mask[s] for s in parts])
    assert n == int(mask.sum()) == 25
    total = 0.0
    for s in parts:
        loss, _ = policy_loss(logp[s], old[s], adv[s], mask[s], token_count=n)
        loss.backward()  # gradients accumulate, as over micro-batches
        total += loss.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    assert_close(logp.grad, g_full, atol=1e-7, what="accumulated gradient")
    # without the global count each micro-batch would be its own mean: a different (biased) loss
    own = sum(policy_loss(logp[s], old[s], adv[s], mask[s])[0].item() for s in parts)
    assert abs(own - full.item()) > 1e-3


def test_kl_terms_hand_computed():
    # A = 0 leaves only the KL term. d = logp_ref - logp = [-0.5, 1.0]
    # k3 = e^d - d - 1 = [e^-0.5 - 0.5, e - 2] = [0.1065307, 0.7182818]; dk3/dlogp = 1 - e^d
    # k1 = logp - logp_ref = [0.5, -1.0]; dk1/dlogp = 1
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    zeros = torch.zeros(1, 3)
    loss, m = policy_loss(logp, logp.detach(), zeros, mask, logp_ref=ref, kl_coef=0.1, kl_type="k3")
    k3 = [math.exp(-0.5) - 0.5, math.e - 2]
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, abs=1e-7)
    assert m["kl"].item() == pytest.approx(sum(k3) / 2, abs=1e-6)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.1 * (1 - math.exp(-0.5)) / 2, 0.1 * (1 - math.e) / 2, 0.0]]), atol=1e-7)
    logp.grad = None
    loss, m = policy_loss(logp, logp.detach(), zeros, mask, logp_ref=ref, kl_coef=0.1, kl_type="k1", token_count=4)
    assert loss.item() == pytest.approx(0.1 * (0.5 - 1.0) / 4, abs=1e-7)  # same normalisation as the pg term
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.1 / 4, 0.1 / 4, 0.0]]), atol=1e-7)
    assert m["kl"].item() == pytest.approx(-0.25)
    # logged, not added, when kl_coef is 0
    loss, m = policy_loss(logp, logp.detach(), zeros, mask, logp_ref=ref)
    assert loss.item() == 0.0 and "kl" in m


def test_entropy_metric_and_errors():
    logp, old, adv, mask = _case()
    ent = torch.arange(7.0)[None]
    _, m = policy_loss(logp, old, adv, mask, entropy=ent)
    assert m["entropy"].item() == pytest.approx(sum(range(6)) / 6)
    with pytest.raises(ValueError, match=r"mask has shape \(1, 6\); logp has \(1, 7\)"):
        policy_loss(logp, old, adv, mask[:, :6])
    with pytest.raises(ValueError, match="kl_type='k2'"):
        policy_loss(logp, old, adv, mask, kl_type="k2")
    with pytest.raises(ValueError, match="kl_coef=0.1 needs logp_ref"):
        policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip=1.0"):
        policy_loss(logp, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="token_count=0"):
        policy_loss(logp, old, adv, mask, token_count=0)


def test_empty_micro_batch_keeps_the_graph():
    """A rank with nothing to train still runs backward (FSDP collectives): loss 0, gradient 0."""
    logp = torch.randn(1, 4, requires_grad=True)
    loss, m = policy_loss(logp, logp.detach(), torch.zeros(1, 4), torch.zeros(1, 4), token_count=10)
    loss.backward()
    assert loss.item() == 0.0 and logp.grad.abs().sum() == 0 and m["pg_clipfrac"].item() == 0.0


# --------------------------------------------------------------------------- log-probs, entropy

@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_selective_logprobs_match_log_softmax(dtype, atol, chunk):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 37  # 21 rows: chunk 5 leaves a remainder
    logits = (torch.randn(B, T, V, generator=g) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 2] = -100  # ignored
    out = selective_logprobs(logits, labels, chunk=chunk)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref = ref.masked_fill(labels < 0, 0.0)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    assert_close(out, ref, atol=atol, what="logp")
    w = torch.randn(B, T, generator=g)
    (gl,) = torch.autograd.grad((out * w).sum(), logits)
    (gr,) = torch.autograd.grad((ref * w).sum(), logits)
    assert gl.dtype == dtype
    assert_close(gl, gr, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, what="dlogp/dlogits")
    assert gl[1, 2].abs().sum() == 0  # ignored label: no gradient


def test_selective_logprobs_non_contiguous_and_errors():
    logits = torch.randn(2, 9, 11).transpose(0, 1)[2:7]  # [5, 2, 11] view, not contiguous
    labels = torch.randint(0, 11, (5, 2))
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert_close(selective_logprobs(logits, labels, chunk=3), ref, atol=1e-6)
    with pytest.raises(ValueError, match=r"labels \(5, 3\) must match logits \(5, 2, 11\)"):
        selective_logprobs(logits, torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be integer"):
        selective_logprobs(logits, labels.float())


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_entropy_from_logits(chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 13, generator=g) * 3).to(torch.bfloat16)
    p = torch.softmax(logits.float(), -1)
    ref = -(p * torch.log_softmax(logits.float(), -1)).sum(-1)
    out = entropy_from_logits(logits, chunk=chunk)
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    assert_close(out, ref, atol=1e-5)
    uniform = entropy_from_logits(torch.zeros(1, 1, 8))
    assert uniform.item() == pytest.approx(math.log(8), abs=1e-6)


def test_token_count_for_step_local():
    masks = [torch.tensor([[1, 1, 0]]), torch.tensor([[True, False, False], [True, True, True]])]
    assert token_count_for_step(masks) == 6
    assert token_count_for_step([]) == 0

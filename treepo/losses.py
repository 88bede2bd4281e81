"""DAPO-family policy loss (docs/algorithm.md section 3); the log-prob helpers it needs live in
treepo/logprobs.py and are re-exported here.

TreePO (arXiv 2508.17445) trains with the DAPO objective (arXiv 2503.14476): PPO's clipped
surrogate with decoupled clip ranges ("clip-higher", eps_low 0.2 / eps_high 0.28), the dual clip
of arXiv 1912.09729 for negative advantages, no KL by default, and a token-level mean over every
valid token of the optimizer step. The caller passes that token count (summed over micro-batches
and all-reduced over ranks, token_count_for_step), so how a step is split into micro-batches or
ranks does not change its gradient (verl #5625 was this bug). Metric names follow verl.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from treepo.logprobs import entropy_from_logits, selective_logprobs

__all__ = ["policy_loss", "selective_logprobs", "entropy_from_logits", "token_count_for_step"]

KL_TYPES = ("k1", "k3")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float | None = 10.0,
                token_count: int | float | torch.Tensor | None = None, logp_ref: torch.Tensor | None = None,
                kl_coef: float = 0.0, kl_type: str = "k3",
                entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss (DAPO; docs/algorithm.md section 3), token-mean over the optimizer step.

    logp:       [B, T] log-probs of the taken tokens under the policy being trained (has grad).
    logp_old:   [B, T] the same under the policy that sampled them (recomputed by the trainer).
    advantages: [B, T] per-token advantages (or [B], broadcast over T).
    mask:       [B, T] 1 (or True) on valid response tokens.
    logp_ref:   [B, T] reference-model log-probs, for the optional KL term; entropy: [B, T]
                per-token entropy, logged only (entropy coefficient 0).
    token_count: valid tokens of the whole optimizer step over all micro-batches and ranks
                (token_count_for_step); default mask.sum(), i.e. this call is the whole step.

    Per token, r = exp(clamp(logp - logp_old, -20, 20)),
      l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), and for A < 0 (dual clip, c = dual_clip
      > 1; None disables) l = min(l, -c A).
    loss = sum(l * mask) / token_count  [+ kl_coef * sum(kl * mask) / token_count], with
      kl = logp - logp_ref ("k1") or exp(d) - d - 1, d = clamp(logp_ref - logp, -20, 20) ("k3",
      Schulman's unbiased, non-negative estimator of KL(pi || pi_ref)).

    Returns (loss: 0-dim tensor with grad, metrics). Metrics are detached 0-dim float32 tensors
    (call float() to log; that syncs a GPU), each a mean over THIS call's valid tokens, so a
    token-weighted average over micro-batches gives the step's value:
      pg_loss            mean of l;
      pg_clipfrac        share of tokens where the clipped surrogate is strictly the larger term,
                         i.e. the clip binds: A > 0 and r > 1 + eps_high, or A < 0 and
                         r < 1 - eps_low (verl's pg_clipfrac);
      pg_clipfrac_lower  share of tokens with A < 0 where the dual clip binds (max(...) > -c A,
                         roughly r > c) (verl's pg_clipfrac_lower);
      ppo_kl             mean of logp_old - logp (clamped log-ratio; verl's ppo_kl);
      entropy            mean entropy, when `entropy` is given;
      kl                 mean kl, when logp_ref is given (added to the loss only if kl_coef != 0).
    """
    shape = tuple(logp.shape)
    if logp.dim() != 2:
        raise ValueError(f"policy_loss: logp must be [B, T], got {shape}")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages[:, None].expand(shape)
    for name, t in (("logp_old", logp_old), ("advantages", advantages), ("mask", mask),
                    ("logp_ref", logp_ref), ("entropy", entropy)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}; logp has {shape}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"policy_loss: need 0 <= eps_low < 1 and eps_high >= 0; got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"policy_loss: dual_clip={dual_clip} must be > 1 (or None to disable)")
    if kl_type not in KL_TYPES:
        raise ValueError(f"policy_loss: kl_type={kl_type!r}; valid: {', '.join(KL_TYPES)}")
    if kl_coef != 0 and logp_ref is None:
        raise ValueError(f"policy_loss: kl_coef={kl_coef} needs logp_ref (the reference model's log-probs)")
    dt = torch.promote_types(logp.dtype, torch.float32)
    m = mask.to(dt)
    if token_count is None:
        count = m.sum().clamp(min=1)
    else:
        if not isinstance(token_count, torch.Tensor) and not token_count > 0:
            raise ValueError(f"policy_loss: token_count={token_count} must be > 0 (valid tokens of the step)")
        count = torch.as_tensor(token_count, dtype=dt, device=logp.device)
    A = advantages.to(dt)

    log_ratio = torch.clamp(logp.to(dt) - logp_old.to(dt), -20.0, 20.0)  # [B, T]
    ratio = torch.exp(log_ratio)
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clip_max = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg3 = -A * dual_clip
        per_tok = torch.where(A < 0, torch.minimum(clip_max, pg3), clip_max)
    else:
        per_tok = clip_max
    loss = (per_tok * m).sum() / count

    with torch.no_grad():
        metrics = {
            "pg_loss": _masked_mean(per_tok, m),
            "pg_clipfrac": _masked_mean((pg2 > pg1).to(dt), m),
            "pg_clipfrac_lower": _masked_mean(((A < 0) & (clip_max > pg3)).to(dt), m) if dual_clip is not None
            else torch.zeros((), dtype=dt, device=logp.device),
            "ppo_kl": _masked_mean(-log_ratio, m),
        }
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy.to(dt), m)

    if logp_ref is not None:
        if kl_type == "k1":
            kl = logp.to(dt) - logp_ref.to(dt)
        else:
            d = torch.clamp(logp_ref.to(dt) - logp.to(dt), -20.0, 20.0)
            kl = torch.exp(d) - d - 1.0
        if kl_coef != 0:
            loss = loss + kl_coef * (kl * m).sum() / count
        metrics["kl"] = _masked_mean(kl.detach(), m)
    return loss, {k: v.detach().float() for k, v in metrics.items()}


# ---------------------------------------------------------------------------- token count

def token_count_for_step(masks: list[torch.Tensor], process_group=None) -> int:
    """Valid tokens of one optimizer step: the sum of every micro-batch mask ([b, T] each) on this
    rank, all-reduced (SUM) over `process_group` when torch.distributed is initialised - a
    collective: every rank calls it, even with no micro-batches. Pass it to policy_loss as
    token_count."""
    if masks:
        dev = masks[0].device
        local = torch.stack([m.sum().to(device=dev, dtype=torch.int64) for m in masks]).sum()
    else:
        dev = torch.device("cpu")
        if dist.is_available() and dist.is_initialized() and dist.get_backend(process_group) == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        local = torch.zeros((), dtype=torch.int64, device=dev)
    if dist.is_available() and dist.is_initialized():
        local = local.clone()
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
    return int(local)

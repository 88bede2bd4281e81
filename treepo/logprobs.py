"""Log-probs of chosen tokens, and the entropy of the distribution they came from, without a full
fp32 log-softmax over the vocabulary (docs/training.md section 4; TRL #3678).

Two entry points:
- `selective_logprobs(logits, labels)`: the logits already exist ([B, T, V] in the model's dtype);
  rows go through fp32 `chunk` at a time, forward and backward.
- `linear_logprobs(hidden, weight, labels)`: the LM head is fused in, so the [R, V] logits exist
  only one chunk of rows at a time, in both passes (backward recomputes each chunk's logits from
  the saved hidden states and weight, as Liger-Kernel's fused linear cross-entropy and Apple's Cut
  Cross-Entropy, arXiv 2411.09009, do). For R = 4096 scored tokens and SmolLM2's V = 49152 that
  is 0.8 GB of fp32 logits (and as much again of their gradient) not held.

Labels < 0 are ignored: log-prob 0 and no gradient. Everything after the matmuls is fp32.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["selective_logprobs", "entropy_from_logits", "linear_logprobs", "linear_logprobs_ref"]


# ---------------------------------------------------------------------------- from logits

class _SelectiveLogProbs(torch.autograd.Function):
    """log_softmax(logits)[label] per row, fp32, in chunks; backward recomputes softmax per chunk,
    so neither pass holds a full [rows, V] fp32 tensor (only logits themselves are kept)."""

    @staticmethod
    def forward(ctx, logits, labels, chunk):
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        lab = labels.reshape(-1)
        valid = lab >= 0
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, flat.shape[0], chunk):
            x = flat[s:s + chunk].float()  # [c, V]
            lse[s:s + chunk] = torch.logsumexp(x, -1)
            out[s:s + chunk] = x.gather(1, safe[s:s + chunk, None])[:, 0] - lse[s:s + chunk]
        out = torch.where(valid, out, torch.zeros_like(out))
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk = chunk
        return out.view(labels.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, safe, valid, lse = ctx.saved_tensors
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        g = torch.where(valid, grad_out.reshape(-1).float(), torch.zeros_like(lse))  # [rows]
        grad = torch.empty(flat.shape, dtype=logits.dtype, device=logits.device)
        for s in range(0, flat.shape[0], ctx.chunk):
            e = s + ctx.chunk
            p = torch.exp(flat[s:e].float() - lse[s:e, None])  # softmax [c, V]
            gc = -p * g[s:e, None]
            gc.scatter_add_(1, safe[s:e, None], g[s:e, None])  # d/dx_j (x_y - lse) = [j = y] - p_j
            grad[s:e] = gc.to(logits.dtype)
        return grad.view(logits.shape), None, None


def selective_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Log-prob of each label: log_softmax(logits.float(), -1).gather(-1, labels), without a full
    log-softmax (docs/training.md section 4; TRL #3678).

    logits [B, T, V] (any float dtype; any leading dims), labels [B, T] integer in [0, V) or
    negative (ignored: log-prob 0, no gradient) -> [B, T] float32. Rows (B*T) are processed
    `chunk` at a time in fp32, forward and backward (a custom autograd function recomputes the
    softmax per chunk), so peak extra memory is O(chunk * V) beyond the logits and their grad.
    """
    if logits.dim() < 2 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"selective_logprobs: labels {tuple(labels.shape)} must match logits "
                         f"{tuple(logits.shape)} without its last (vocab) dim")
    if labels.dtype.is_floating_point:
        raise ValueError(f"selective_logprobs: labels must be integer token ids, got {labels.dtype}")
    if chunk < 1:
        raise ValueError(f"selective_logprobs: chunk={chunk} must be >= 1")
    return _SelectiveLogProbs.apply(logits, labels.long(), chunk)


def entropy_from_logits(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) per position, fp32, computed `chunk` rows at a time.

    logits [B, T, V] (any leading dims) -> [B, T] float32: H = logsumexp(x) - sum softmax(x) x.
    Differentiable; for logging call it under torch.no_grad() (then nothing is kept per chunk).
    """
    if logits.dim() < 1:
        raise ValueError(f"entropy_from_logits: logits must have a vocab dim, got {tuple(logits.shape)}")
    if chunk < 1:
        raise ValueError(f"entropy_from_logits: chunk={chunk} must be >= 1")
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for s in range(0, flat.shape[0], chunk):
        x = flat[s:s + chunk].float()
        parts.append(torch.logsumexp(x, -1) - (torch.softmax(x, -1) * x).sum(-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.view(logits.shape[:-1])




# ---------------------------------------------------------------------------- fused LM head

def linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of `linear_logprobs`: the full [R, V] fp32 logits at once."""
    logits = (hidden @ weight.T).float()  # [R, V]
    lsm = torch.log_softmax(logits, -1)
    logp = lsm.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(labels < 0, 0.0)
    entropy = -(lsm.exp() * lsm).sum(-1)
    return logp, entropy.detach()


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's on hidden's device, else the wider of the two inputs'."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearLogProbs(torch.autograd.Function):
    """logp[r] = log_softmax(hidden[r] @ weight.T)[labels[r]] and its entropy, `chunk` rows at a time.

    Saves hidden, weight (references, no copies), labels and lse [R] only; backward recomputes
    each chunk's logits. `cdt` is the matmul dtype (autocast's, or the inputs'); autocast is off
    inside both passes, and every cast is explicit."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, cdt):
        R = hidden.shape[0]
        dev = hidden.device
        valid = labels >= 0
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        logp = torch.empty(R, dtype=torch.float32, device=dev)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp)
        with torch.autocast(dev.type, enabled=False):
            w = weight.to(cdt)  # [V, H]
            for s in range(0, R, chunk):
                e = min(s + chunk, R)
                x = (hidden[s:e].to(cdt) @ w.T).float()  # [c, V] logits
                m = torch.logsumexp(x, -1)  # [c]
                lse[s:e] = m
                logp[s:e] = x.gather(1, safe[s:e, None])[:, 0] - m
                lsm = x - m[:, None]  # log-softmax [c, V]
                entropy[s:e] = -(lsm.exp() * lsm).sum(-1)  # not lse - sum p x: that cancels
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.chunk, ctx.cdt = chunk, cdt
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        R, cdt, dev = hidden.shape[0], ctx.cdt, hidden.device
        g = torch.where(valid, grad_logp.float(), torch.zeros_like(lse))  # [R]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
        with torch.autocast(dev.type, enabled=False):
            w = weight.to(cdt)
            for s in range(0, R, ctx.chunk):
                e = min(s + ctx.chunk, R)
                h = hidden[s:e].to(cdt)  # [c, H]
                p = torch.exp((h @ w.T).float() - lse[s:e, None])  # softmax [c, V]
                d = -p * g[s:e, None]
                d.scatter_add_(1, safe[s:e, None], g[s:e, None])  # g * (onehot - p)
                d = d.to(cdt)
                if need_h:
                    grad_h[s:e] = (d @ w).to(hidden.dtype)  # [c, H]
                if need_w:
                    grad_w += (d.T @ h).float()  # [V, H]
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label under the LM head, and the entropy of that distribution.

    hidden [R, H] (any leading dims, labels has the same), weight [V, H] (the LM head; the
    embedding matrix when tied), labels [R] integer in [0, V) or negative (ignored: log-prob 0,
    no gradient) -> (logp [R] fp32, differentiable w.r.t. hidden and weight; entropy [R] fp32,
    detached, of every row whether its label is ignored or not).

    Equals log_softmax(hidden @ weight.T).gather(labels) (`linear_logprobs_ref`) but never holds
    more than one [chunk, V] block of logits. Under torch.autocast the matmuls run in autocast's
    dtype and the rest in fp32; gradients come back in each input's own dtype (fp32 master
    weights get fp32 gradients, accumulated in fp32 over the chunks).
    """
    if hidden.dim() < 1 or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"linear_logprobs: labels {tuple(labels.shape)} must match hidden "
                         f"{tuple(hidden.shape)} without its last (hidden) dim")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"linear_logprobs: labels must be integer token ids, got {labels.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_logprobs: weight {tuple(weight.shape)} must be [V, H] with "
                         f"H = hidden's last dim {hidden.shape[-1]}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"linear_logprobs: chunk={chunk!r} must be an integer >= 1 (rows per block)")
    if not (hidden.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"linear_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) must be float")
    lead = labels.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    cdt = _compute_dtype(hidden, weight)
    logp, entropy = _LinearLogProbs.apply(flat_h, weight, labels.reshape(-1).long(), chunk, cdt)
    return logp.view(lead), entropy.view(lead)

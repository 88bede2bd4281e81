"""Token sampling from a batch of logits: temperature, top-k, top-p, greedy, seeded.

Every sampled token carries its log-prob under the distribution it was drawn from (after
temperature, top-k and top-p) - what an RL trainer needs as the behaviour policy - and, on request,
under the unmodified model distribution (temperature 1, nothing truncated). Greedy decoding
(temperature 0) is a point mass; its reported log-prob is the model distribution's.
"""
from __future__ import annotations

import torch

from .config import SamplingParams


def truncate_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[B, V] fp32 logits -> logits of the sampling distribution (temperature; -inf outside top-k/p)."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    V = logits.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first is always kept)
        drop = probs.cumsum(-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[B, V] fp32 logits -> the log-probs of the sampling distribution (-inf outside it)."""
    return torch.log_softmax(truncate_logits(logits, params), dim=-1)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser): one independent stream per row/step."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def sample(logits: torch.Tensor, params: SamplingParams, row_seeds: list[int] | None = None):
    """Sample one token per row of logits [B, V].

    row_seeds: one seed per row (each row's draw depends on its seed alone, so a sequence's tokens
    do not depend on what else is in the batch); None uses torch's global generator.
    Returns (tokens [B] int64, logprobs [B] fp32, model_logprobs [B] fp32 or None)."""
    logits = logits.float()
    model_lp = None
    if params.greedy:
        lp = torch.log_softmax(logits, dim=-1)
        tokens = lp.argmax(-1)
        chosen = lp.gather(-1, tokens[:, None])[:, 0]
        return tokens, chosen, (chosen if params.return_model_logprobs else None)
    z = truncate_logits(logits, params)
    # inverse-CDF draw with one uniform per row (a hash of the row's seed, or torch's generator):
    # one cumsum instead of V random numbers per row, and batch-independent with seeds
    if row_seeds is None:
        u = 1.0 - torch.rand(z.shape[0], 1, device=z.device, dtype=torch.float64)  # (0, 1]
    else:
        u = torch.tensor([[((mix_seed(s) >> 10) + 1) / 2.0**53] for s in row_seeds],
                         dtype=torch.float64, device=z.device)
    # softmax / log_softmax run row by row (a row's values depend on that row alone, unlike an
    # elementwise exp over [B, V], whose vectorised and scalar parts move with B): batch-invariant
    cdf = torch.softmax(z, -1).cumsum_(-1)  # [B, V] fp32
    u = (u * cdf[:, -1:].double()).float()
    tokens = torch.searchsorted(cdf, u).clamp_(max=z.shape[-1] - 1)[:, 0]
    chosen = torch.log_softmax(z, -1).gather(-1, tokens[:, None])[:, 0]
    if params.return_model_logprobs:
        model_lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, chosen, model_lp

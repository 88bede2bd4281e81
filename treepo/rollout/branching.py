"""The arithmetic of TreePO branching as pure functions (docs/algorithm.md section 1, steps 4-5).

How many children a level gets (the budget moves from paths that stopped early to survivors),
how they are spread over the surviving paths (uniformly, or by the log-probs of what each path
sampled), how many a fallback starts, and how many KV pages one prompt's tree can hold at once.
The TreeSampler calls these; tests call them directly.
"""
from __future__ import annotations

import random

import torch

from treepo_kernels.common import cdiv


def children_budget(max_width: int, num_leaves: int, num_active: int, num_finished: int,
                    branch_factor: int) -> int:
    """Children for the next level of one prompt: total = max(a, min(W - F, b * (a + f))).

    W = max_width, F = leaves so far (those of this level included), a = paths still active,
    f = paths that finished at this level, b = branch_factor. Every active path gets at least one
    child; the b children that finished paths would have had go to the survivors, as long as the
    leaves-to-be stay within W."""
    remaining = max(max_width - num_leaves, 0)
    return max(num_active, min(remaining, branch_factor * (num_active + num_finished)))


def fallback_children(max_width: int, num_leaves: int, branch_factor: int) -> int:
    """Children a depth-first fallback starts: min(b, W - F)."""
    return min(branch_factor, max_width - num_leaves)


def uniform_allocation(total: int, num_paths: int, rng: random.Random) -> list[int]:
    """floor(total / a) children per path (at least 1), the remainder one each to random paths.

    Draws rng.sample(range(a), total % a) - one call, so a tree's randomness does not depend on
    how it is spread."""
    base, rem = divmod(total, num_paths)
    counts = [max(base, 1)] * num_paths
    for j in rng.sample(range(num_paths), rem):
        counts[j] += 1
    return counts


def path_statistic(path_logprobs: list[float], segment_len: int, statistic: str) -> float:
    """The score logprob branching weighs a path by, from its sampled tokens' log-probs.

    path_logprobs: every generated token of the path; its last segment_len are the new segment.
    statistic: "segment_mean" (mean over the new segment; the paper's setting), "path_mean" or
    "path_sum" (over the whole response)."""
    if statistic == "segment_mean":
        seg = path_logprobs[len(path_logprobs) - segment_len:]
        return sum(seg) / max(len(seg), 1)
    if statistic == "path_mean":
        return sum(path_logprobs) / max(len(path_logprobs), 1)
    if statistic == "path_sum":
        return sum(path_logprobs)
    raise ValueError(f"logprob_statistic={statistic!r}; valid: segment_mean, path_mean, path_sum")


def logprob_allocation(stats: list[float], total: int, temperature: float, prefer: str) -> list[int]:
    """Children per path from scores s: 1 each, the other total - a by weights softmax(s' / T),
    rounded by largest remainder (ties to the earlier path).

    s' = -s shifted to min 0 for prefer="low" (more children for low-probability paths, "Low
    Prob Encourage"), +s shifted for "high". Returns a counts >= 1 summing to total."""
    if prefer not in ("low", "high"):
        raise ValueError(f"prefer={prefer!r}; valid: low, high")
    a = len(stats)
    s = torch.tensor(stats, dtype=torch.float64)
    s = -s if prefer == "low" else s
    s = s - s.min()
    w = torch.softmax(s / temperature, 0)
    extra = total - a
    ideal = w * extra
    counts = ideal.floor().long()
    left = extra - int(counts.sum())
    order = sorted(range(a), key=lambda j: (-(ideal[j] - counts[j]).item(), j))  # largest remainder
    for j in order[:left]:
        counts[j] += 1
    return [1 + int(c) for c in counts]


def page_bound(prompt_len: int, max_response_len: int, max_width: int, page_size: int) -> int:
    """KV pages one prompt's tree can hold at once, assuming nothing is shared.

    Live paths plus kept leaves never exceed W: a level starts with at most W - F live paths
    (F = leaves so far); its f finished ones become leaves, so the a survivors are at most
    W - F - f = W - F_new, and both children_budget and fallback_children keep that. Each holds
    at most one full-length chain of pages (+1 for a fork's copied tail page); one more chain
    covers a fallback stub. The sampler admits prompts in waves whose bounds fit the free pages."""
    per_path = cdiv(prompt_len + max_response_len + 1, page_size) + 1
    return (max_width + 1) * per_path

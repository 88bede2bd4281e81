"""Advantages: the TreePO tree (sub-group) advantage, GRPO and REINFORCE++-baseline baselines, and
global token-level whitening (docs/algorithm.md section 2; TreePO, arXiv 2508.17445).

TreePO's rollouts share prefixes, so a leaf is compared not only with all leaves of its prompt
(the root group, as in GRPO) but also with the leaves that share each of its prefix segments: the
sub-group of every node on its path. Averaging these relative advantages credits the segments
where the trajectory's fate was decided. Rewards are per leaf; a leaf's advantage is then put on
each of its response tokens and whitened over every valid token of the training batch, on all
ranks together (REINFORCE++ style).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["tree_advantages", "grpo_advantages", "reinforce_pp_baseline_advantages", "whiten",
           "broadcast_to_tokens"]

AGGREGATIONS = ("average", "size_weighted")


def _check_rewards(rewards, prompt_index, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    R = torch.as_tensor(rewards)
    if R.dim() != 1:
        raise ValueError(f"{what}: rewards must be 1-D [N], got shape {tuple(R.shape)}")
    p = torch.as_tensor(prompt_index, device=R.device)
    if p.shape != R.shape:
        raise ValueError(f"{what}: prompt_index has shape {tuple(p.shape)}, rewards {tuple(R.shape)}")
    if p.dtype.is_floating_point or p.dtype == torch.bool:
        raise ValueError(f"{what}: prompt_index must be an integer tensor, got {p.dtype}")
    bad = ~torch.isfinite(R.double())
    if bad.any():
        raise ValueError(f"{what}: reward of leaf {int(bad.nonzero()[0])} is {R[bad][0].item()}")
    return R, p


def _out_dtype(R: torch.Tensor) -> torch.dtype:
    return R.dtype if R.dtype.is_floating_point else torch.float32


def tree_advantages(rewards: torch.Tensor, paths: list[list[int]], prompt_index: torch.Tensor,
                    aggregation: str = "average", include_root: bool = True,
                    reject_flat_subgroups: bool = False, max_subgroup_depth: int | None = None) -> torch.Tensor:
    """TreePO sub-group advantage per leaf (docs/algorithm.md section 2).

    rewards:      [N] float, R_i of each leaf (after any overlong shaping).
    paths:        N lists of node ids at depth 1..depth(i) (Leaf.path / trees_to_batch's "paths").
                  Node ids are per tree: groups are keyed by (prompt, depth, node id).
    prompt_index: [N] integer, the tree (prompt) of each leaf.
    Returns A [N] (rewards' float dtype, float32 for integer rewards; on rewards' device).

    Groups of leaf i: G_0(i) = all leaves of its prompt; G_k(i) = the leaves whose path has i's
    depth-k node at depth k, for k = 1 .. depth(i) - 1 (the leaf's own last segment is only
    itself), and k <= max_subgroup_depth when that is set (0 = root group only). A fallback
    child of a depth-k node has that node in its path, so it is in that node's groups.
    a_{i,k} = R_i - mean_{j in G_k(i)} R_j; S_i = {0 if include_root} U {k >= 1 : |G_k(i)| > 1},
    minus the k >= 1 groups whose rewards are all equal when reject_flat_subgroups.
    aggregation "average": A_i = mean_{k in S_i} a_{i,k};
    "size_weighted": A_i = sum_{S_i} |G_k| a_{i,k} / sum_{S_i} |G_k|. Empty S_i -> A_i = 0.
    A group whose rewards are all equal contributes exactly 0 (no rounding residue), so a prompt
    whose leaves all share one reward gets A_i = 0 exactly. Computed in float64.
    """
    R, p = _check_rewards(rewards, prompt_index, "tree_advantages")
    N = R.numel()
    if len(paths) != N:
        raise ValueError(f"tree_advantages: {len(paths)} paths for {N} rewards")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if max_subgroup_depth is not None and max_subgroup_depth < 0:
        raise ValueError(f"max_subgroup_depth={max_subgroup_depth} must be >= 0 or None")
    r = R.detach().double().cpu().tolist()
    pi = p.cpu().tolist()
    # (prompt, depth, node) -> [sum, count, min, max]; depth 0 (node None) is the root group
    groups: dict[tuple, list] = {}
    keys = []
    for i, path in enumerate(paths):
        top = len(path) - 1
        if max_subgroup_depth is not None:
            top = min(top, max_subgroup_depth)
        ks = [(pi[i], 0, None)] + [(pi[i], k, int(path[k - 1])) for k in range(1, top + 1)]
        for key in ks:
            g = groups.get(key)
            if g is None:
                groups[key] = [r[i], 1, r[i], r[i]]
            else:
                g[0] += r[i]
                g[1] += 1
                g[2] = min(g[2], r[i])
                g[3] = max(g[3], r[i])
        keys.append(ks)
    A = [0.0] * N
    for i, ks in enumerate(keys):
        num = den = 0.0
        for key in ks:
            total, size, lo, hi = groups[key]
            flat = lo == hi
            if key[1] == 0:
                if not include_root:
                    continue
            elif size < 2 or (reject_flat_subgroups and flat):
                continue
            a = 0.0 if flat else r[i] - total / size
            w = 1.0 if aggregation == "average" else float(size)
            num += w * a
            den += w
        A[i] = num / den if den else 0.0
    return torch.tensor(A, dtype=torch.float64).to(device=R.device, dtype=_out_dtype(R))


def _group_stats(R: torch.Tensor, p: torch.Tensor):
    """Per-leaf group mean, unbiased std (0 for singletons) and group size, in float64."""
    _, inv, counts = torch.unique(p, return_inverse=True, return_counts=True)
    x = R.double()
    n = counts.double()
    mean = torch.zeros_like(n).index_add_(0, inv, x) / n
    sq = torch.zeros_like(n).index_add_(0, inv, (x - mean[inv]) ** 2)
    std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
    return mean[inv], std[inv], n[inv]


def grpo_advantages(rewards: torch.Tensor, prompt_index: torch.Tensor, use_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO group advantage: A_i = (R_i - mean_g) / (std_g + eps), or R_i - mean_g without std.

    rewards [N] float, prompt_index [N] integer (the group of each response) -> A [N].
    std is Bessel-corrected (torch.std). A group of one response gets A = 0 (it has no baseline;
    verl would give R_i instead).
    """
    R, p = _check_rewards(rewards, prompt_index, "grpo_advantages")
    if R.numel() == 0:
        return R.to(_out_dtype(R))
    mean, std, _ = _group_stats(R, p)
    A = R.double() - mean
    if use_std:
        A = A / (std + eps)
    return A.to(_out_dtype(R))


def reinforce_pp_baseline_advantages(rewards: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """REINFORCE++-baseline: A_i = R_i - mean of its prompt group (rewards [N], prompt_index [N]
    -> [N]). The caller then whitens over the batch's tokens with `whiten`, as for TreePO."""
    return grpo_advantages(rewards, prompt_index, use_std=False)


def broadcast_to_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every valid token of row i gets adv[i]: adv [N], mask [N, T] (0/1 or bool) -> [N, T],
    0 where mask is 0 (adv's float dtype, float32 for integer adv)."""
    if adv.dim() != 1 or mask.dim() != 2 or adv.shape[0] != mask.shape[0]:
        raise ValueError(f"broadcast_to_tokens: need adv [N] and mask [N, T]; got adv {tuple(adv.shape)}, "
                         f"mask {tuple(mask.shape)}")
    dt = _out_dtype(adv)
    return adv.to(dt)[:, None] * mask.to(dt)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def whiten(values: torch.Tensor, mask: torch.Tensor, process_group=None, eps: float = 1e-8) -> torch.Tensor:
    """(A - mu) / sqrt(var + eps) over every valid token of the batch on all ranks; 0 on padding.

    values, mask: [N, T] (mask 0/1 or bool; N may be 0 on a rank with no data, and T may differ
    between ranks). mu and var are token-weighted over the valid tokens of all ranks: the count,
    sum and sum of squares (float64) are all-reduced over `process_group` when torch.distributed
    is initialised, so every rank must call this (a collective), with tensors on the backend's
    device. var is Bessel-corrected (n - 1); with n <= 1 it is 0. Returns values' float dtype
    (float32 for integer values).
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"whiten: values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be [N, T]")
    m = mask.to(torch.float64)
    v = values.to(torch.float64) * m
    stats = torch.stack([m.sum(), v.sum(), (v * v).sum()])
    if _dist_on():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)
    n, total, sq = stats.unbind()
    mu = total / n.clamp(min=1)
    var = ((sq - n * mu * mu) / (n - 1).clamp(min=1)).clamp(min=0)
    var = torch.where(n > 1, var, torch.zeros_like(var))
    out = (values.to(torch.float64) - mu) * torch.rsqrt(var + eps) * m
    return out.to(_out_dtype(values))

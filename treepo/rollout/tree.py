"""TreePO trees: configuration, the tree data structure, and training tensors from trees.

TreeConfig is the whole of docs/algorithm.md section 1 ("Tree sampling") as one validated dataclass. A Tree holds the
nodes (segments) and leaves (finished trajectories) of one prompt; `trees_to_batch` turns a batch
of trees into padded tensors (prompt / response ids, masks, old log-probs, per-depth subgroup ids)
for our trainer or anyone else's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

FINISH_REASONS = ("answer", "eos", "repetition", "max_len", "max_depth")
"""Every Leaf.finish_reason (and Node.finish_reason of a path's last node): a complete boxed answer
under the stop policy, EOS, a repeated window, max_response_len reached, max_depth reached
(docs/algorithm.md section 1 step 3 gives the order they are checked in)."""

FALLBACK_CANDIDATES = {"answered": ("answer", "eos"), "any": FINISH_REASONS}
"""TreeConfig.fallback_candidates -> the finish reasons of the leaves a fallback may cut."""


@dataclass(slots=True)
class TreeConfig:
    """Segment-level tree search settings (docs/algorithm.md section 1; paper defaults in paper())."""

    segment_len: int = 64  # l: tokens per segment (node)
    max_depth: int = 4  # d: segments per path at most
    max_width: int = 16  # W: leaves (trajectories) per prompt
    branch_factor: int = 2  # b: children per node; b >= W gives exactly the trees of b = W (see below)
    max_response_len: int | None = None  # response token cap; None = l * d
    init_divergence: str = "fixed"  # "fixed": root gets b children; "random": uniform in [init_min, init_max]
    init_min: int = 2
    init_max: int = 8
    stop_policy: str = "boxed_and_eos"  # "boxed_and_eos" | "boxed" | "eos"
    rep_window: int = 32  # repetition: a window of this many characters (token ids without tokenizer) ...
    rep_count: int = 8  # ... occurring at least this often (overlaps counted) in the new segment; 0 = off
    repetition_priority: str = "last"  # "first": checked before the answer rule; "last": after depth
    branch_policy: str = "uniform"  # "uniform" | "logprob"
    logprob_statistic: str = "segment_mean"  # "segment_mean" | "path_mean" | "path_sum" (sampled tokens)
    prefer: str = "low"  # "low": more children for low-probability paths ("Low Prob Encourage"); "high"
    branch_temperature: float = 2.0  # T of softmax(s / T) for logprob branching
    branch_temperature_end: float | None = None  # schedule target (None = constant)
    branch_temperature_schedule: str = "constant"  # "constant" | "linear" | "cosine" over training steps
    schedule_steps: int = 1  # steps over which the schedule goes from T to T_end
    fallback: bool = True  # depth-first fallback when a prompt runs out of active paths early
    fallback_candidates: str = "answered"  # FALLBACK_CANDIDATES: "answered" (answer / eos leaves) | "any"
    seed: int = 0  # branching / fallback randomness and per-path sampling streams (always seeded)

    # Widths are caps, not errors: W bounds the leaves, so no node ever gets more than the W - F
    # leaves still to come (children_budget, fallback_children) and the root gets min(b0, W). A
    # branch_factor >= W therefore means "as wide as the budget allows" and gives exactly the trees
    # of branch_factor = W (TreeConfig.sequential uses b = W); init_min / init_max > W likewise.

    def __post_init__(self):
        for name in ("segment_len", "max_depth", "max_width", "branch_factor", "init_min", "init_max",
                     "rep_window", "schedule_steps"):
            _check_int(self, name, low=1)
        _check_int(self, "rep_count", low=0)
        _check_int(self, "seed", low=None)
        if self.max_response_len is None:
            self.max_response_len = self.segment_len * self.max_depth
        _check_int(self, "max_response_len", low=1)
        choices = {"init_divergence": ("fixed", "random"), "stop_policy": ("boxed_and_eos", "boxed", "eos"),
                   "repetition_priority": ("first", "last"), "branch_policy": ("uniform", "logprob"),
                   "logprob_statistic": ("segment_mean", "path_mean", "path_sum"), "prefer": ("low", "high"),
                   "branch_temperature_schedule": ("constant", "linear", "cosine"),
                   "fallback_candidates": tuple(FALLBACK_CANDIDATES)}
        for name, ok in choices.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in ok:
                raise ValueError(f"{name}={value!r}; valid: {', '.join(ok)}")
        if self.init_min > self.init_max:
            raise ValueError(f"init_min={self.init_min} > init_max={self.init_max}; need 1 <= init_min <= init_max")
        for name in ("branch_temperature", "branch_temperature_end"):
            value = getattr(self, name)
            if value is None and name == "branch_temperature_end":
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r}; it must be a finite number > 0"
                                 + (" or None (constant)" if name == "branch_temperature_end" else ""))
        if not isinstance(self.fallback, bool):
            raise ValueError(f"fallback={self.fallback!r}; it must be True or False")

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, **kw) -> "TreeConfig":
        """The paper's main setting: 14 x 512 tokens, W=16, b=2, uniform, fallback from answered."""
        return cls(**{**dict(segment_len=512, max_depth=14, max_width=16, branch_factor=2,
                             max_response_len=7168), **kw})

    @classmethod
    def small(cls, **kw) -> "TreeConfig":
        """A CPU-sized tree: 4 x 32 tokens, W=8, b=2."""
        return cls(**{**dict(segment_len=32, max_depth=4, max_width=8, branch_factor=2), **kw})

    @classmethod
    def sequential(cls, width: int, max_response_len: int, **kw) -> "TreeConfig":
        """i.i.d. sampling through the same API: W independent paths, one segment, no branching."""
        return cls(**{**dict(segment_len=max_response_len, max_depth=1, max_width=width, branch_factor=width,
                             max_response_len=max_response_len, fallback=False), **kw})

    def branch_temperature_at(self, step: int) -> float:
        """Branching temperature at a training step under the schedule."""
        t0, t1 = self.branch_temperature, self.branch_temperature_end
        if t1 is None or self.branch_temperature_schedule == "constant":
            return t0
        x = min(max(step / self.schedule_steps, 0.0), 1.0)
        if self.branch_temperature_schedule == "cosine":
            x = 0.5 * (1 - math.cos(math.pi * x))
        return t0 + (t1 - t0) * x

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Node:
    """One segment. The root (id 0, depth 0) stands for the prompt and has no tokens."""

    id: int
    parent: int | None
    depth: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    from_fallback: bool = False
    finish_reason: str | None = None  # set when a path ended with this node
    children: list[int] = field(default_factory=list)


@dataclass
class Leaf:
    """One finished trajectory."""

    token_ids: list[int]
    logprobs: list[float]  # per token, under the sampling distribution
    path: list[int]  # node ids at depth 1..k
    finish_reason: str  # one of FINISH_REASONS
    from_fallback: bool = False
    model_logprobs: list[float] | None = None

    @property
    def depth(self) -> int:
        return len(self.path)


@dataclass
class TreeStats:
    prefill_tokens: int = 0  # tokens this tree's prompt/fallback contexts put through the model
    decode_tokens: int = 0  # generated tokens put through the model (the shared ones once)
    forward_passes: int = 0  # batched engine forwards of the sample() call (shared by its trees)
    peak_kv_pages: int = 0  # of the sample() call
    wall_time: float = 0.0  # of the sample() call
    decode_time: float = 0.0
    branch_time: float = 0.0
    fallbacks: int = 0
    limit: str | None = None  # why the tree has fewer than W leaves, if it does

    @property
    def processed_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


@dataclass
class Tree:
    prompt_token_ids: list[int]
    nodes: list[Node]
    leaves: list[Leaf]
    stats: TreeStats

    def node_at_depth(self, leaf: Leaf, depth: int) -> int:
        return 0 if depth == 0 else leaf.path[depth - 1]


def _check_int(cfg, name: str, low: int | None):
    """An int field (not a bool, not a float or a numeric string) >= low; the error names it."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} ({type(value).__name__}); it must be an int"
                         + (f" >= {low}" if low is not None else ""))
    if low is not None and value < low:
        raise ValueError(f"{name}={value}; it must be >= {low}")


# ---------------------------------------------------------------------------- training tensors

def trees_to_batch(trees: list[Tree], pad_token_id: int = 0, max_depth: int | None = None) -> dict:
    """Padded tensors for training, one row per leaf of every tree (tree order, leaf order).

    Returns a dict of tensors:
      prompts [N, Lp] (left-padded), prompt_mask [N, Lp], responses [N, Lr] (right-padded),
      response_mask [N, Lr], input_ids [N, Lp + Lr] = prompts ++ responses, attention_mask
      [N, Lp + Lr], position_ids [N, Lp + Lr], old_logprobs [N, Lr] (sampler's, 0 on padding),
      prompt_index [N] (tree index), subgroup_ids [N, D] (a batch-unique id of the node at depth
      k = 1..D on the leaf's path, -1 past its depth; the root group is prompt_index),
      from_fallback [N] bool, response_lengths [N]; and `paths`: list of node-id lists.
    """
    rows = [(t, i, leaf) for i, t in enumerate(trees) for leaf in t.leaves]
    if not rows:
        raise ValueError("no leaves in these trees")
    N = len(rows)
    Lp = max(len(t.prompt_token_ids) for t, _, _ in rows)
    Lr = max(max(len(leaf.token_ids) for _, _, leaf in rows), 1)
    D = max_depth or max(leaf.depth for _, _, leaf in rows)
    prompts = torch.full((N, Lp), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros(N, Lp, dtype=torch.long)
    responses = torch.full((N, Lr), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(N, Lr, dtype=torch.long)
    old_lp = torch.zeros(N, Lr, dtype=torch.float32)
    subgroups = torch.full((N, D), -1, dtype=torch.long)
    node_ids: dict[tuple[int, int], int] = {}
    for r, (t, i, leaf) in enumerate(rows):
        p = t.prompt_token_ids
        prompts[r, Lp - len(p):] = torch.tensor(p)
        prompt_mask[r, Lp - len(p):] = 1
        n = len(leaf.token_ids)
        if n:
            responses[r, :n] = torch.tensor(leaf.token_ids)
            response_mask[r, :n] = 1
            old_lp[r, :n] = torch.tensor(leaf.logprobs)
        for k, node in enumerate(leaf.path[:D]):
            subgroups[r, k] = node_ids.setdefault((i, node), len(node_ids))
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return {
        "prompts": prompts, "prompt_mask": prompt_mask, "responses": responses,
        "response_mask": response_mask, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention_mask, "position_ids": position_ids, "old_logprobs": old_lp,
        "prompt_index": torch.tensor([i for _, i, _ in rows]), "subgroup_ids": subgroups,
        "from_fallback": torch.tensor([leaf.from_fallback for _, _, leaf in rows]),
        "response_lengths": response_mask.sum(1), "paths": [list(leaf.path) for _, _, leaf in rows],
    }

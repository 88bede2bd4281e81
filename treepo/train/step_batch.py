"""One rank's training batch of an RL step, and how it is cut into mini- and micro-batches.

The per-leaf tensors (advantages, masks, the sampler's log-probs) stay in the padded [N, Lr]
layout of `trees_to_batch`: they are small (no vocabulary dimension) and the loss reads them per
(leaf, token) pair whatever the packing. What the packing changes is what goes through the model
(docs/training.md section 10):

- "tree" / "prompt": a micro-batch is whole trees, packed by `pack_trees` (every unique token, or
  the prompt, once), at most `micro_batch_tokens` packed tokens; a tree larger than the budget is a
  micro-batch of its own (never split, so its shared context is computed once);
- "none": a micro-batch is padded leaf rows, as many as fit rows x (Lp + Lr) <= micro_batch_tokens.

Mini-batches (several optimizer steps per RL step) take whole trees in every packing, strided
(tree i goes to mini-batch i mod n), so the three packings make the same optimizer steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from treepo.rollout.tree import Tree

from .batch import PACKINGS, PackedBatch, pack_trees, packed_size, plan_micro_batches


@dataclass
class MicroBatch:
    rows: list[int]  # leaf rows of the StepBatch, in the order of the forward's output rows
    packed: PackedBatch | None  # the packed trees ("tree" / "prompt"); None: padded rows ("none")
    tokens: int  # tokens the forward computes (packed tokens, or rows x padded width)


@dataclass
class StepBatch:
    """This rank's training batch of one step: trees_to_batch's tensors + token advantages."""

    tensors: dict  # trees_to_batch output (rows = leaves, tree order then leaf order)
    advantages: torch.Tensor  # [N] per leaf, before whitening
    token_advantages: torch.Tensor  # [N, Lr] whitened over every valid token of all ranks
    mask: torch.Tensor  # [N, Lr] float, 1 on response tokens
    sampler_logprobs: torch.Tensor  # [N, Lr] the sampler's log-probs under the untempered model (0 on padding)
    trees: list[Tree]
    packing: str = "tree"  # PACKINGS
    _packs: dict = field(default_factory=dict, repr=False)  # tree ids -> PackedBatch (reused by every pass)

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"packing={self.packing!r}; valid: {', '.join(PACKINGS)}")
        starts = [0]
        for t in self.trees:
            starts.append(starts[-1] + len(t.leaves))
        if starts[-1] != self.rows:
            raise ValueError(f"StepBatch: the trees have {starts[-1]} leaves but the tensors {self.rows} rows")
        self.tree_rows = [list(range(a, b)) for a, b in zip(starts, starts[1:])]

    @property
    def rows(self) -> int:
        return self.advantages.shape[0]

    @property
    def width(self) -> int:
        """Padded row width Lp + Lr of the "none" layout."""
        return self.tensors["input_ids"].shape[1]

    def mini_batches(self, n: int) -> list[list[int]]:
        """Tree ids of each of n mini-batches (strided; some may be empty)."""
        return [list(range(len(self.trees)))[i::n] for i in range(n)]

    def micro_batches(self, tree_ids: list[int], budget: int) -> list[MicroBatch]:
        """The micro-batches of these trees under a budget of `budget` tokens per forward."""
        if self.packing == "none":
            rows = [r for t in tree_ids for r in self.tree_rows[t]]
            groups = plan_micro_batches([self.width] * len(rows), budget)
            return [MicroBatch([rows[i] for i in g], None, len(g) * self.width) for g in groups]
        share = self.packing
        groups = plan_micro_batches([packed_size(self.trees[t], share) for t in tree_ids], budget)
        out = []
        for g in groups:
            ids = tuple(tree_ids[i] for i in g)
            if ids not in self._packs:
                self._packs[ids] = pack_trees([self.trees[t] for t in ids], share)
            packed = self._packs[ids]
            out.append(MicroBatch([r for t in ids for r in self.tree_rows[t]], packed, packed.tokens))
        return out

    def packing_stats(self) -> dict[str, int]:
        """Tokens of one training pass over this batch: unique (tree packing), per leaf (prompt +
        response of every leaf), padded (the "none" layout) and prompt-shared."""
        unique = sum(packed_size(t, "tree") for t in self.trees)
        prompt = sum(packed_size(t, "prompt") for t in self.trees)
        leaf = sum(len(t.prompt_token_ids) + len(lf.token_ids) for t in self.trees for lf in t.leaves)
        forward = {"tree": unique, "prompt": prompt, "none": self.rows * self.width}[self.packing]
        return {"unique": unique, "leaf": leaf, "padded": self.rows * self.width, "forward": forward}

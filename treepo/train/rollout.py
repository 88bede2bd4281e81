"""Rollout collection: draw this rank's prompts, sample their trees, score every leaf, and keep
the prompts whose leaves disagree (dynamic sampling, at most `max_gen_batches` rounds).

The result is a typed `Rollout`: each kept tree travels with its problem and the reward and
accuracy of each of its leaves, in leaf order, so nothing depends on the implicit alignment of
flat lists with `trees_to_batch`'s rows (tree order, then leaf order: `Rollout.rewards()`).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from treepo.engine.config import SamplingParams
from treepo.rollout.tree import Tree

from .data import Problem, PromptStream, render_prompt
from .distributed import all_max
from .rewards.problems import ProblemScorer


@dataclass
class ScoredTree:
    """One prompt's tree with the reward and the accuracy (1/0) of each leaf, in leaf order."""

    problem: Problem
    tree: Tree
    rewards: list[float]
    accuracies: list[float]

    def __post_init__(self):
        n = len(self.tree.leaves)
        if len(self.rewards) != n or len(self.accuracies) != n:
            raise ValueError(f"tree has {n} leaves but {len(self.rewards)} rewards and "
                             f"{len(self.accuracies)} accuracies")


@dataclass
class RolloutStats:
    """What sampling did on this rank during one step (kept and dropped prompts alike)."""

    gen_time: float = 0.0
    gen_rounds: int = 0
    prompts_sampled: int = 0
    prompts_dropped: int = 0  # all leaves had the same accuracy (dynamic sampling)
    reward_failures: int = 0
    rewards: list[float] = field(default_factory=list)  # every sampled leaf
    accuracies: list[float] = field(default_factory=list)
    leaf_lengths: list[int] = field(default_factory=list)
    finish: Counter = field(default_factory=Counter)  # finish reason -> leaves
    processed_tokens: int = 0  # tokens the engine processed (the trees' TreeStats.processed_tokens)
    engine_tokens: int = 0  # the same read from the engine's own counters (prefill + decode): a cross-check
    sequential_tokens: int = 0  # what i.i.d. sampling of the same leaves would have processed
    short_batch: bool = False  # fewer kept prompts than asked after max_gen_batches rounds


@dataclass
class Rollout:
    groups: list[ScoredTree]
    stats: RolloutStats

    @property
    def trees(self) -> list[Tree]:
        return [g.tree for g in self.groups]

    def rewards(self) -> torch.Tensor:
        """[N] float32, one per leaf in trees_to_batch's row order (tree order, leaf order)."""
        return torch.tensor([r for g in self.groups for r in g.rewards], dtype=torch.float32)


class RolloutCollector:
    """Samples this rank's share of each step's prompts from a stream every rank walks in step."""

    def __init__(self, sampler, tokenizer, scorer: ProblemScorer, stream: PromptStream, rank: int, world: int,
                 sampling: SamplingParams, prompts_per_step: int, dynamic_sampling: bool, max_gen_batches: int):
        self.sampler, self.tokenizer, self.scorer, self.stream = sampler, tokenizer, scorer, stream
        self.rank, self.world = rank, world
        self.sampling = sampling
        self.per_rank = max(1, prompts_per_step // world)
        self.dynamic_sampling, self.max_gen_batches = dynamic_sampling, max_gen_batches

    def draw(self, n_per_rank: int) -> tuple[list[Problem], list[int]]:
        """This rank's slice of n_per_rank * world problems drawn from the shared stream (every rank
        draws the same ones, so the streams stay in step); keys = global draw positions."""
        st = self.stream
        start = st.epoch * len(st.problems) + st.pos
        problems = st.take(n_per_rank * self.world)
        lo = self.rank * n_per_rank
        return problems[lo:lo + n_per_rank], list(range(start + lo, start + lo + n_per_rank))

    def sample(self, problems: list[Problem], keys: list[int], step: int) -> tuple[list[ScoredTree], int]:
        """A scored tree per problem (keys name each prompt's random streams), and how many
        reward calls failed."""
        prompts = [render_prompt(self.tokenizer, p.question) for p in problems]
        self.sampler.training_step = step
        trees = self.sampler.sample(prompts, self.sampling, keys=keys,
                                    progress=f"step {step} sampling" if self.rank == 0 else None)
        texts, owners, ids = [], [], []
        for p, t in zip(problems, trees):
            for leaf in t.leaves:
                texts.append(self.tokenizer.decode(leaf.token_ids, skip_special_tokens=True))
                owners.append(p)
                ids.append(leaf.token_ids)
        rewards, accs, failures = self.scorer.score(texts, owners, ids)
        out, i = [], 0
        for p, t in zip(problems, trees):
            n = len(t.leaves)
            out.append(ScoredTree(p, t, rewards[i:i + n], accs[i:i + n]))
            i += n
        return out, failures

    def _engine_tokens(self) -> int:
        c = self.sampler.engine.counters()
        return c["prefill_tokens"] + c["decode_tokens"]

    def collect(self, step: int) -> Rollout:
        """Sample until this rank keeps `per_rank` prompts whose leaves disagree (or rounds run out).

        Every rank runs the same number of rounds (the max need is all-reduced), so the prompt
        streams stay in step across ranks."""
        kept, st = [], RolloutStats()
        for _ in range(self.max_gen_batches):
            local_need = self.per_rank - len(kept)
            need = int(all_max(local_need))
            if need == 0:
                break
            problems, keys = self.draw(need)  # every rank draws, so the streams stay in step
            problems, keys = problems[:local_need], keys[:local_need]
            if not problems:
                continue
            t0, c0 = time.perf_counter(), self._engine_tokens()
            scored, failures = self.sample(problems, keys, step)
            st.gen_time += time.perf_counter() - t0
            st.engine_tokens += self._engine_tokens() - c0
            st.gen_rounds += 1
            st.prompts_sampled += len(problems)
            st.reward_failures += failures
            for g in scored:
                t = g.tree
                st.rewards += g.rewards
                st.accuracies += g.accuracies
                st.processed_tokens += t.stats.processed_tokens
                responses = sum(len(lf.token_ids) for lf in t.leaves)
                st.sequential_tokens += len(t.prompt_token_ids) + responses - len(t.leaves)
                for leaf in t.leaves:
                    st.finish[leaf.finish_reason] += 1
                    st.leaf_lengths.append(len(leaf.token_ids))
                if self.dynamic_sampling and len(set(g.accuracies)) <= 1:
                    st.prompts_dropped += 1
                    continue
                if len(kept) < self.per_rank:
                    kept.append(g)
            if not self.dynamic_sampling:
                break
        st.short_batch = len(kept) < self.per_rank
        return Rollout(kept, st)

"""`tree_generate`: TreePO tree sampling as one plain function, for projects with their own training
loop (verl, TRL, custom code). It takes a transformers causal LM (its weights shared, not copied)
or a treepo Engine, and returns every leaf as plain lists: ids, log-probs, tree paths, finish
reasons and per-depth subgroup ids; `TreeGeneration.advantages(rewards)` gives the TreePO tree
advantages of those leaves (treepo/advantages.py).

    from treepo import TreeConfig, SamplingParams, tree_generate
    out = tree_generate(model, tokenizer, ["What is 2 + 3?"], TreeConfig.small(), SamplingParams(temperature=0.7))
    rewards = [my_reward(text) for text in out.texts]
    adv = out.advantages(rewards)          # [N] per leaf, whitened over the leaves' tokens
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from treepo.advantages import broadcast_to_tokens, tree_advantages, whiten
from treepo.engine.config import SamplingParams
from treepo.engine.engine import Engine
from treepo.rollout.sampler import TreeSampler
from treepo.rollout.tree import Tree, TreeConfig, trees_to_batch

__all__ = ["tree_generate", "TreeGeneration", "prompt_token_ids"]


@dataclass
class TreeGeneration:
    """The leaves of one `tree_generate` call, one row per leaf in tree order then leaf order.

    prompt_index[i]     the prompt (index into the call's prompts) of leaf i
    prompt_ids[i]       that prompt's token ids (chat template applied)
    completion_ids[i]   the leaf's response token ids (the EOS included when it stopped on one)
    logprobs[i]         per response token, under the sampling distribution (temperature, top-p, top-k)
    paths[i]            node ids of the leaf's segments at depth 1..depth (ids are per tree)
    finish_reasons[i]   "answer" | "eos" | "repetition" | "max_len" | "max_depth"
    from_fallback[i]    the leaf was grown by the depth-first fallback
    subgroup_ids[i]     per depth 1..D, a batch-unique id of the leaf's node at that depth (-1 past
                        its depth); leaves with equal ids at depth k share their first k segments
    texts[i]            the decoded response (None without a tokenizer)
    trees               the Tree objects themselves (treepo/rollout/tree.py)
    processed_tokens    prefill + decode tokens the engine processed for these trees
    sequential_tokens   what sampling the same leaves independently would have processed
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    paths: list[list[int]]
    finish_reasons: list[str]
    from_fallback: list[bool]
    subgroup_ids: list[list[int]]
    texts: list[str | None]
    trees: list[Tree] = field(repr=False)
    processed_tokens: int = 0
    sequential_tokens: int = 0

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def compute_saved(self) -> float:
        """1 - processed / sequential tokens: what sharing prefixes saved over independent sampling."""
        return 1.0 - self.processed_tokens / max(self.sequential_tokens, 1)

    def completion_mask(self) -> torch.Tensor:
        """[N, T] 1 on each leaf's response tokens (T the longest response), 0 on padding."""
        T = max([len(c) for c in self.completion_ids] + [1])
        mask = torch.zeros(len(self), T)
        for i, c in enumerate(self.completion_ids):
            mask[i, :len(c)] = 1
        return mask

    def advantages(self, rewards, whiten_tokens: bool = True, aggregation: str = "average",
                   include_root: bool = True) -> torch.Tensor:
        """TreePO tree advantages of the leaves for `rewards` (one float per leaf, row order) -> [N] float32.

        tree_advantages (treepo/advantages.py: each leaf against every subgroup on its path, averaged),
        then, with whiten_tokens, whitened as treepo's trainer does: the advantage is put on each
        response token and the tokens of all leaves (of all ranks, when torch.distributed is
        initialised) are brought to mean 0 and variance 1, so each leaf's value is the one its
        tokens carry. A leaf with an empty response counts no token."""
        R = torch.as_tensor(rewards, dtype=torch.float32).flatten()
        if R.numel() != len(self):
            raise ValueError(f"rewards: {R.numel()} values for {len(self)} leaves; give one per leaf in row order")
        A = tree_advantages(R, self.paths, torch.tensor(self.prompt_index), aggregation=aggregation,
                            include_root=include_root)
        if not whiten_tokens:
            return A
        mask = self.completion_mask()
        W = whiten(broadcast_to_tokens(A, mask), mask)
        lengths = mask.sum(1)
        return torch.where(lengths > 0, W.sum(1) / lengths.clamp(min=1), torch.zeros_like(A))


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """One prompt as token ids: a list of ints as it is; a string or a list of chat messages
    ({"role", "content"} dicts) through the tokenizer's chat template as a user turn / that
    conversation, with the generation prompt (a string is encoded as is without a template)."""
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not prompt:
            raise ValueError("prompt: an empty token list; give at least one token id")
        return list(prompt)
    if tokenizer is None:
        raise ValueError(f"prompt {str(prompt)[:60]!r}: text and chat messages need a tokenizer; "
                         "pass one, or give token ids")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        messages = list(prompt)
    else:
        raise ValueError(f"prompt {str(prompt)[:60]!r} ({type(prompt).__name__}): give a string, a list of chat "
                         "messages ({'role': ..., 'content': ...}) or a list of token ids")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    if len(messages) != 1:
        raise ValueError("prompt: chat messages need a tokenizer with a chat template; this one has none")
    return tokenizer.encode(messages[0]["content"])


def as_engine(model_or_engine, tokenizer=None, **engine_settings) -> Engine:
    """An Engine as it is, or a new one over a transformers causal LM / treepo CausalLM whose
    weights it shares (Engine.from_model): build it once and reuse it across calls, since each
    engine allocates its own KV cache (engine_settings: EngineConfig fields, e.g. kv_cache_memory)."""
    if isinstance(model_or_engine, Engine):
        if engine_settings:
            raise ValueError(f"engine settings {sorted(engine_settings)} given with a ready Engine; "
                             "they only apply when a model is passed")
        return model_or_engine
    if not isinstance(model_or_engine, torch.nn.Module) or not hasattr(model_or_engine, "config"):
        raise ValueError(f"model_or_engine: a {type(model_or_engine).__name__}; give a transformers causal LM, "
                         "a treepo CausalLM or a treepo Engine")
    return Engine.from_model(model_or_engine, tokenizer, **engine_settings)


def tree_generate(model_or_engine, tokenizer, prompts, tree_config: TreeConfig | None = None,
                  sampling_params: SamplingParams | None = None, keys: list[int] | None = None,
                  **engine_settings) -> TreeGeneration:
    """Sample one TreePO tree per prompt and return its leaves as plain lists (TreeGeneration).

    model_or_engine  a transformers causal LM (Llama, Qwen2/3, Mistral families; the engine shares
                     its weights, so later in-place updates are seen) or a treepo Engine (reuse one
                     across calls: each new engine allocates its KV cache)
    tokenizer        the model's tokenizer (None: prompts must be token ids and texts stay None)
    prompts          strings (a user turn of the chat template), chat message lists, or token-id lists
    tree_config      TreeConfig (default TreeConfig()): width W = leaves per prompt, depth x segment, ...
    sampling_params  temperature / top-p / top-k / seed (max_tokens and n are the tree's business)
    keys             one int per prompt naming its random streams (default: its index), so a prompt
                     gets the same tree whatever else is in the call
    """
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
        raise ValueError("prompts: give a list of prompts (strings, chat message lists or token-id lists), "
                         "not a single prompt")
    if not prompts:
        raise ValueError("prompts: an empty list; give at least one prompt")
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    engine = as_engine(model_or_engine, tokenizer, **engine_settings)
    cfg = tree_config or TreeConfig()
    sampler = TreeSampler(engine, cfg)
    trees = sampler.sample(ids, sampling_params or SamplingParams(), keys=keys)
    return _leaves(trees, tokenizer)


def _leaves(trees: list[Tree], tokenizer) -> TreeGeneration:
    rows = [(i, t, leaf) for i, t in enumerate(trees) for leaf in t.leaves]
    subgroups = trees_to_batch(trees)["subgroup_ids"].tolist() if rows else []
    texts = [tokenizer.decode(leaf.token_ids, skip_special_tokens=True) if tokenizer is not None else None
             for _, _, leaf in rows]
    sequential = sum(len(t.prompt_token_ids) + sum(len(lf.token_ids) for lf in t.leaves) - len(t.leaves)
                     for t in trees)
    return TreeGeneration(
        prompt_index=[i for i, _, _ in rows], prompt_ids=[list(t.prompt_token_ids) for _, t, _ in rows],
        completion_ids=[list(leaf.token_ids) for _, _, leaf in rows],
        logprobs=[[float(x) for x in leaf.logprobs] for _, _, leaf in rows],
        paths=[list(leaf.path) for _, _, leaf in rows], finish_reasons=[leaf.finish_reason for _, _, leaf in rows],
        from_fallback=[bool(leaf.from_fallback) for _, _, leaf in rows], subgroup_ids=subgroups, texts=texts,
        trees=trees, processed_tokens=sum(t.stats.processed_tokens for t in trees), sequential_tokens=sequential)

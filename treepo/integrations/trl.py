"""TreePO trees inside Hugging Face TRL's GRPOTrainer (trl >= 1.16; pip install "treepo[trl]").

Two pieces, usable apart (docs/integrations.md cites the TRL lines each relies on):

`tree_rollout_func(tree_config)` -> a GRPOTrainer `rollout_func`. TRL hands it the process's
prompts, each repeated num_generations (G) times in a row (its RepeatSampler), and wants one row per
entry: prompt_ids, completion_ids, logprobs; every other key reaches the reward functions as a
per-row keyword argument. It samples one TreePO tree of width W = G per distinct prompt on a treepo
Engine over the trainer's own model (weights shared, or copied before every generation: never
stale; WeightSync), with TRL's own prompt tokenization (chat template) and TRL's temperature /
top-p / top-k, and returns the leaves in TRL's order with extra keys `treepo_path`,
`treepo_finish_reason`, `treepo_from_fallback` and `treepo_leaf`. A tree that ends with fewer than
G leaves (no fallback candidate) fills its rows with one-token placeholders that TRL's loss skips
(env_mask 0) and that get advantage 0.

`TreePOGRPOTrainer` -> a GRPOTrainer whose advantages are TreePO's: after TRL has generated and
scored a batch, the per-row group advantage is replaced with `treepo.advantages.tree_advantages`
of the sampled trees (each leaf against every subgroup on its path), put on each completion token
and whitened over the batch's tokens (of every process), a [B, T] tensor TRL's loss uses
row-aligned. treepo's sampling metrics (compute saved vs sequential, tokens processed, finish
reasons, weight-sync mode) go to TRL's own logs under treepo/.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation

from treepo.advantages import broadcast_to_tokens, tree_advantages, whiten
from treepo.engine.config import SamplingParams
from treepo.engine.engine import Engine
from treepo.rollout.tree import FINISH_REASONS, TreeConfig
from treepo.tree_generate import TreeGeneration, prompt_token_ids, tree_generate

from .weight_sync import WeightSync

__all__ = ["tree_rollout_func", "TreeRollout", "TreePOGRPOTrainer", "RolloutRecord"]

PLACEHOLDER = "placeholder"  # treepo_finish_reason of a row a short tree could not fill
KV_SHARE_CUDA = 0.25  # of the free GPU memory for the engine's KV cache, unless engine_settings say otherwise


@dataclass
class RolloutRecord:
    """What the last rollout returned, row by row (TRL's order): for the advantage and the tests."""

    generation: TreeGeneration
    group: list[int]  # the distinct prompt (tree) of each row, 0..number of trees - 1
    leaf: list[int | None]  # the row's index in generation's leaves, None for a placeholder
    paths: list[list[int]]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    mode: str  # "train" | "eval"


def _groups(prompts: list, G: int) -> list:
    """The distinct prompts of TRL's per-process list, which repeats each G times in a row."""
    if len(prompts) % G:
        raise ValueError(f"rollout_func got {len(prompts)} prompts, not a multiple of num_generations={G}: each "
                         "process must hold whole groups (make per_device_train_batch_size x steps_per_generation "
                         "a multiple of num_generations)")
    out = []
    for g in range(0, len(prompts), G):
        run = prompts[g:g + G]
        if any(p != run[0] for p in run[1:]):
            raise ValueError(f"rollout_func: prompts {g}..{g + G - 1} are not one prompt repeated num_generations={G} "
                             "times; TreePO needs every group on one process (per-process batch a multiple of G)")
        out.append(run[0])
    return out


class TreeRollout:
    """A GRPOTrainer rollout_func: `TreeRollout(tree_config)(prompts, trainer) -> dict` (see the module doc).

    tree_config      TreeConfig (depth x segment, branch factor, divergence, fallback, ...); its
                     max_width is replaced by the trainer's num_generations. Default: 4 segments of
                     max_completion_length / 4 tokens, branch factor 2.
    engine           a treepo Engine to sample on (its weights are synced from the trainer's model
                     before every generation); default: built on the first call from the trainer's
                     unwrapped model, sharing its tensors where it can.
    engine_settings  EngineConfig fields for that engine (e.g. kv_cache_memory=2**30; on CUDA the
                     default is KV_SHARE_CUDA of the free memory, leaving room for the optimizer).
    """

    def __init__(self, tree_config: TreeConfig | None = None, engine: Engine | None = None,
                 engine_settings: dict | None = None):
        if tree_config is not None and not isinstance(tree_config, TreeConfig):
            raise ValueError(f"tree_config: a {type(tree_config).__name__}; give a treepo.TreeConfig")
        if engine is not None and engine_settings:
            raise ValueError("engine_settings apply to the engine built from the trainer's model; "
                             "a ready engine was given")
        self.tree_config, self.engine, self.engine_settings = tree_config, engine, dict(engine_settings or {})
        self.weight_sync = WeightSync(engine) if engine is not None else None
        self.calls = 0
        self.last: RolloutRecord | None = None

    # ------------------------------------------------------------------ set-up per call
    def config_for(self, trainer, G: int) -> TreeConfig:
        L = trainer.args.max_completion_length
        if L is None:
            raise ValueError("GRPOConfig.max_completion_length is None; tree rollouts need a token budget")
        cfg = self.tree_config
        if cfg is None:
            seg = max(1, L // 4)
            cfg = TreeConfig(segment_len=seg, max_depth=max(1, L // seg), max_response_len=L)
        elif cfg.max_response_len > L:
            raise ValueError(f"tree_config.max_response_len={cfg.max_response_len} exceeds the trainer's "
                             f"max_completion_length={L}; lower it (or segment_len x max_depth)")
        return dataclasses.replace(cfg, max_width=G)

    @staticmethod
    def sampling_for(trainer) -> SamplingParams:
        a = trainer.args
        if getattr(a, "repetition_penalty", 1.0) != 1.0:
            raise ValueError(f"repetition_penalty={a.repetition_penalty}: treepo's engine samples without it; "
                             "set it to 1.0 with tree_rollout_func")
        if getattr(a, "min_p", None):
            raise ValueError(f"min_p={a.min_p}: treepo's engine has no min-p; leave it None with tree_rollout_func")
        return SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k or -1,
                              seed=int(a.seed) if a.seed is not None else 0)

    def _sync(self, trainer) -> str:
        """Build the engine on first use, then make its weights the trainer model's current ones."""
        from trl.distributed import DistributedBackend

        backend = DistributedBackend(trainer.accelerator)
        wrapped = getattr(trainer, "model_wrapped", None) or trainer.model
        with unwrap_model_for_generation(wrapped, trainer.accelerator,
                                         gather_deepspeed3_params=True) as model, \
                backend.summon_full_params(wrapped, recurse=True, writeback=False):
            if self.engine is None:
                settings = dict(self.engine_settings)
                device = next(model.parameters()).device
                if device.type == "cuda" and "kv_cache_memory" not in settings and "num_pages" not in settings:
                    # the optimizer's state is not allocated yet: leave it room (the engine's own default
                    # takes 60% of the free memory)
                    settings["kv_cache_memory"] = int(torch.cuda.mem_get_info(device)[0] * KV_SHARE_CUDA)
                self.engine = Engine.from_model(model, trainer._tokenizer, **settings)
                if backend.is_zero3 or backend.is_fsdp:  # gathered or sharded tensors: the engine keeps copies
                    for p in self.engine.model.parameters():
                        p.data = p.data.clone()
                self.weight_sync = WeightSync(self.engine)
            return self.weight_sync.sync(model).mode

    def _prompt_ids(self, trainer, prompts: list) -> list[list[int]]:
        """TRL's own tokenization (GRPOTrainer._tokenize_prompts: its chat template, tools and
        chat_template_kwargs), so a tree's prompt is exactly what TRL's generation would have used."""
        tokenize = getattr(trainer, "_tokenize_prompts", None)
        if tokenize is not None:
            ids = tokenize(prompts)[0]
            return [list(map(int, p)) for p in ids]
        return [prompt_token_ids(trainer._tokenizer, p) for p in prompts]

    # ------------------------------------------------------------------ the rollout
    def __call__(self, prompts: list, trainer) -> dict:
        mode = "train" if trainer.model.training else "eval"
        G = trainer.num_generations if mode == "train" else trainer.num_generations_eval
        distinct = _groups(prompts, G)
        cfg, params = self.config_for(trainer, G), self.sampling_for(trainer)
        sync_mode = self._sync(trainer)
        rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
        # a fresh random stream per call, process and prompt (TreeSampler keys)
        keys = [((self.calls * world + rank) << 20) + i for i in range(len(distinct))]
        self.calls += 1
        gen = tree_generate(self.engine, trainer._tokenizer, self._prompt_ids(trainer, distinct), cfg, params,
                            keys=keys)
        eos = trainer._tokenizer.eos_token_id
        rows = {k: [] for k in ("prompt_ids", "completion_ids", "logprobs", "treepo_path", "treepo_finish_reason",
                                "treepo_from_fallback", "treepo_leaf", "env_mask")}
        group, leaf_of = [], []
        by_tree: dict[int, list[int]] = {}
        for j, t in enumerate(gen.prompt_index):
            by_tree.setdefault(t, []).append(j)
        for g in range(len(distinct)):
            leaves = by_tree.get(g, [])
            for r in range(G):
                j = leaves[r] if r < len(leaves) else None
                group.append(g)
                leaf_of.append(j)
                if j is None:  # a short tree: a row TRL's loss skips (env_mask 0), advantage 0
                    rows["prompt_ids"].append(list(gen.trees[g].prompt_token_ids))
                    rows["completion_ids"].append([eos])
                    rows["logprobs"].append([0.0])
                    rows["treepo_path"].append([])
                    rows["treepo_finish_reason"].append(PLACEHOLDER)
                    rows["treepo_from_fallback"].append(False)
                    rows["treepo_leaf"].append(False)
                    rows["env_mask"].append([0])
                    continue
                rows["prompt_ids"].append(gen.prompt_ids[j])
                rows["completion_ids"].append(gen.completion_ids[j] or [eos])
                rows["logprobs"].append(gen.logprobs[j] or [0.0])
                rows["treepo_path"].append(gen.paths[j])
                rows["treepo_finish_reason"].append(gen.finish_reasons[j])
                rows["treepo_from_fallback"].append(gen.from_fallback[j])
                rows["treepo_leaf"].append(True)
                rows["env_mask"].append([1] * len(gen.completion_ids[j]) if gen.completion_ids[j] else [0])
        if all(rows["treepo_leaf"]) and all(gen.completion_ids):
            del rows["env_mask"]  # nothing to mask: TRL's default path
        self.last = RolloutRecord(gen, group, leaf_of, list(rows["treepo_path"]), list(rows["prompt_ids"]),
                                  list(rows["completion_ids"]), mode)
        self._log(trainer, mode, gen, rows, sync_mode)
        return rows

    def _log(self, trainer, mode: str, gen: TreeGeneration, rows: dict, sync_mode: str) -> None:
        metrics = getattr(trainer, "_metrics", None)
        if metrics is None:
            return
        m = metrics[mode]
        n = max(len(rows["treepo_leaf"]), 1)
        m["treepo/compute_saved_vs_sequential"].append(gen.compute_saved)
        m["treepo/tokens_processed"].append(float(gen.processed_tokens))
        m["treepo/tokens_sequential"].append(float(gen.sequential_tokens))
        m["treepo/placeholder_rows"].append(float(n - sum(rows["treepo_leaf"])))
        m["treepo/fallback_leaves"].append(float(sum(gen.from_fallback)))
        for reason in FINISH_REASONS:
            m[f"treepo/finish/{reason}"].append(rows["treepo_finish_reason"].count(reason) / n)
        m["treepo/weight_sync_copied"].append(0.0 if sync_mode == "shared" else 1.0)


def tree_rollout_func(tree_config: TreeConfig | None = None, engine: Engine | None = None,
                      engine_settings: dict | None = None) -> TreeRollout:
    """A GRPOTrainer rollout_func sampling TreePO trees on treepo's engine (TreeRollout)."""
    return TreeRollout(tree_config, engine, engine_settings)


class TreePOGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with TreePO tree rollouts and TreePO tree advantages.

    `TreePOGRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=..., tree_config=TreeConfig(...))`
    takes GRPOTrainer's arguments plus:
      tree_config / engine / engine_settings  for the tree_rollout_func it builds (or pass rollout_func=
                                              a TreeRollout of your own)
      aggregation   "average" (default) | "size_weighted": how a leaf's subgroup advantages combine
      include_root  also compare each leaf with all leaves of its prompt (default True)
    TRL's loss (loss_type, clipping, beta, ...) is unchanged; only the advantages are TreePO's.
    """

    def __init__(self, *args, tree_config: TreeConfig | None = None, engine: Engine | None = None,
                 engine_settings: dict | None = None, aggregation: str = "average", include_root: bool = True,
                 rollout_func: TreeRollout | None = None, **kwargs):
        if rollout_func is None:
            rollout_func = TreeRollout(tree_config, engine, engine_settings)
        elif not isinstance(rollout_func, TreeRollout):
            raise ValueError(f"rollout_func: a {type(rollout_func).__name__}; TreePOGRPOTrainer needs the trees, "
                             "so give a treepo TreeRollout (tree_rollout_func(...)) or none")
        elif tree_config is not None or engine is not None or engine_settings:
            raise ValueError("give tree_config / engine / engine_settings to tree_rollout_func, "
                             "not next to a rollout_func")
        if aggregation not in ("average", "size_weighted"):
            raise ValueError(f"aggregation={aggregation!r}; valid: average, size_weighted")
        self.tree_aggregation, self.tree_include_root = aggregation, include_root
        self.tree_advantages_last: torch.Tensor | None = None  # per row, before whitening (tests, logging)
        super().__init__(*args, rollout_func=rollout_func, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._tree_rewards_per_func = rewards  # [rows of all processes, reward functions]
        return rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        rec: RolloutRecord = self.rollout_func.last
        n = len(inputs)
        if rec is None or len(rec.group) != n:
            raise RuntimeError(f"TreePOGRPOTrainer: the last rollout has {0 if rec is None else len(rec.group)} rows "
                               f"for {n} inputs")
        rank = self.accelerator.process_index
        per_func = self._tree_rewards_per_func[rank * n:(rank + 1) * n].float()
        weights = self.reward_weights.to(per_func.device, per_func.dtype)
        rewards = (per_func * weights).nansum(dim=1).cpu()
        scorable = ~torch.isnan(per_func).all(dim=1).cpu()
        rows = [i for i in range(n) if rec.leaf[i] is not None and bool(scorable[i])]
        A = torch.zeros(n, dtype=torch.float32)
        if rows:
            A[rows] = tree_advantages(rewards[rows], [rec.paths[i] for i in rows],
                                      torch.tensor([rec.group[i] for i in rows]), aggregation=self.tree_aggregation,
                                      include_root=self.tree_include_root).float()
        mask = out["completion_mask"]
        if "tool_mask" in out:
            mask = mask * out["tool_mask"]
        keep = torch.zeros(n, 1, device=mask.device)
        keep[rows] = 1.0  # placeholders and unscorable rows take no part in the whitening
        mask = mask.float() * keep
        adv = whiten(broadcast_to_tokens(A.to(mask.device), mask), mask)
        out["advantages"] = adv.to(torch.float32)
        self.tree_advantages_last = A
        self._log_tree_advantages(adv, mask, A, rows)
        return out

    def _log_tree_advantages(self, adv, mask, A, rows) -> None:
        mode = "train" if self.model.training else "eval"
        per_row = adv.sum(1) / mask.sum(1).clamp(min=1)
        self._metrics[mode]["treepo/advantage_mean_abs"].append(float(A[rows].abs().mean()) if rows else 0.0)
        logged = self.accelerator.gather(per_row.to(self.accelerator.device)).tolist()
        tail = self._logs["advantages"]
        for _ in range(min(len(logged), len(tail))):  # TRL's completions table shows the advantages used
            tail.pop()
        tail.extend(logged)

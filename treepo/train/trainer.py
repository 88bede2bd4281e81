"""TreePO trainer: tree rollouts -> rewards -> tree advantages -> DAPO loss, FSDP2 via torchrun.

One process per rank (`treepo train` is a world of one; `torchrun --nproc_per_node N -m
treepo.train` shards). Each rank owns an inference Engine (its own weight copy, refreshed from the
trained model after every optimizer step) and samples its shard of the step's prompts with the
TreeSampler (or sequential sampling: the GRPO/DAPO baseline through the same code). Spec:
TREEPO_SPEC.md sections 2-4; numerics and FSDP notes: TRAINER_NOTES.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from treepo.advantages import grpo_advantages, tree_advantages, whiten
from treepo.engine.config import SamplingParams
from .data import Problem, PromptStream, gsm8k_test, gym_problems, jsonl_problems, render_prompt
from treepo.engine.engine import Engine
from .evaluate import evaluate
from treepo.losses import policy_loss
from treepo.engine.loader import load_model
from treepo.engine.tokenizer import load_tokenizer
from .rewards import gym_reward, math_reward, score_batch
from treepo.rollout.tree import TreeConfig, trees_to_batch
from treepo.rollout.sampler import TreeSampler


@dataclass
class TrainConfig:
    """Every knob of a run; `treepo train --<field> value` or `--config file.json` sets them."""

    # model and run
    model: str | None = None  # HF checkpoint dir; None = the bundled SmolLM2-135M-Instruct
    output_dir: str = "runs/treepo"  # metrics.jsonl, checkpoints/, hf/ (export), curves.png
    resume: bool = False  # continue from output_dir/checkpoints/latest
    seed: int = 0
    steps: int = 15  # optimizer "RL steps" (each: sample, score, update)
    preset: str = "default"  # "default" | "quick" (a few minutes on 2 CPU cores)
    # data
    train_task: str = "basic_arithmetic"  # reasoning-gym task (ignored with train_jsonl)
    train_task_config: dict = field(default_factory=lambda: {
        "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"],
        "format_style": "simple", "allow_parentheses": False, "allow_negation": False, "whitespace": "single"})
    train_size: int = 5000  # problems generated for training
    train_jsonl: str | None = None  # JSONL {"question", "answer"} instead of the gym task
    heldout_size: int = 64  # held-out problems of the training task (another seed) for evaluation
    eval_gsm8k: bool = True  # also evaluate on the 100 real GSM8K test problems (before and after)
    # sampling
    mode: str = "tree"  # "tree" (TreePO) | "sequential" (i.i.d. samples: the GRPO/DAPO baseline)
    prompts_per_step: int = 8  # prompts per RL step (all ranks together)
    leaves: int = 8  # W: trajectories per prompt
    segment_len: int = 32  # l
    max_depth: int = 4  # d
    branch_factor: int = 2  # b
    max_response_len: int = 128  # L (defaults to l * d when 0)
    temperature: float = 0.7  # rollouts; at 1.0 the 135M model almost never answers within 128 tokens
    top_p: float = 1.0
    engine_dtype: str = "bfloat16"  # inference copy dtype
    # batch shaping
    dynamic_sampling: bool = True  # drop prompts whose leaves all have the same accuracy ...
    max_gen_batches: int = 3  # ... and sample more, at most this many generation rounds per step
    overlong_buffer: int = 0  # B of overlong shaping (0 = off)
    overlong_factor: float = 1.0
    mini_batches: int = 1  # optimizer steps per RL step (1 epoch over the batch)
    micro_batch_size: int = 16  # leaves per forward/backward
    # advantages and loss
    advantage: str = "tree"  # "tree" (TreePO) | "grpo" | "rpp" (REINFORCE++-baseline)
    aggregation: str = "average"  # tree advantage: "average" | "size_weighted"
    include_root: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 10.0
    kl_coef: float = 0.0  # optional KL to the initial model (k1/k3); 0 = no reference model
    kl_type: str = "k3"
    # optimiser
    lr: float = 5e-6
    warmup_steps: int = 3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple = (0.9, 0.999)
    train_dtype: str = "float32"  # parameters; bf16 mixed precision is used on CUDA
    # evaluation, logging, checkpoints
    eval_every: int = 5  # steps between held-out evaluations (0 = only before and after)
    eval_n: int = 4  # samples per problem
    eval_temperature: float = 0.6
    eval_max_tokens: int = 128
    gsm8k_max_tokens: int = 256
    save_every: int = 20  # steps between checkpoints (0 = only at the end)
    export_hf: bool = True  # write an HF-format model to output_dir/hf at the end
    reward_timeout_s: float = 10.0
    reward_fn: str | None = None  # "module:function" with fn(response_text, sample) -> float; None = built-in

    def __post_init__(self):
        if self.preset == "quick":  # a few minutes on 2 cores
            for k, v in dict(steps=6, prompts_per_step=4, leaves=4, segment_len=16, max_depth=4,
                             max_response_len=64, heldout_size=16, eval_every=0, eval_n=2,
                             eval_max_tokens=64, gsm8k_max_tokens=64, save_every=3, eval_gsm8k=False).items():
                if getattr(self, k) == getattr(TrainConfig, "__dataclass_fields__")[k].default:
                    setattr(self, k, v)
        elif self.preset != "default":
            raise ValueError(f"preset={self.preset!r}; valid: default, quick")
        if self.mode not in ("tree", "sequential"):
            raise ValueError(f"mode={self.mode!r}; valid: tree, sequential")
        if self.advantage not in ("tree", "grpo", "rpp"):
            raise ValueError(f"advantage={self.advantage!r}; valid: tree, grpo, rpp")
        if self.max_response_len == 0:
            self.max_response_len = self.segment_len * self.max_depth
        for name in ("steps", "prompts_per_step", "leaves", "mini_batches", "micro_batch_size", "max_gen_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        self.betas = tuple(self.betas)

    def tree_config(self) -> TreeConfig:
        if self.mode == "sequential":
            return TreeConfig.sequential(self.leaves, self.max_response_len, seed=self.seed)
        return TreeConfig(segment_len=self.segment_len, max_depth=self.max_depth, max_width=self.leaves,
                          branch_factor=self.branch_factor, max_response_len=self.max_response_len,
                          seed=self.seed)


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="treepo train", description="TreePO RL training")
    ap.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        kind = type(f.default) if f.default is not dataclasses.MISSING else dict
        if kind is bool:
            ap.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        elif kind in (dict, tuple, list) or f.default is None:
            ap.add_argument(f"--{f.name}", type=_auto, default=None)
        else:
            ap.add_argument(f"--{f.name}", type=kind, default=None)
    args = ap.parse_args(argv)
    values = {}
    if args.config:
        with open(args.config) as fh:
            values.update(json.load(fh))
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    return TrainConfig(**values)


def _auto(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


# ---------------------------------------------------------------------------- distributed

def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun's env or a world of one over loopback; gloo on CPU, nccl on CUDA."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def all_sum(x: float | int, op=dist.ReduceOp.SUM) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.item()


def shard_model(model, world: int, device):
    """FSDP2: fully_shard each decoder layer, then the root (CPU mesh explicitly on CPU)."""
    if world == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kw = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


# ---------------------------------------------------------------------------- rewards

def problem_reward(text: str, sample: dict) -> float:
    """+1 / -1: the gym task's own checker when the problem has one, else math verification."""
    if sample.get("gym_entry"):
        return gym_reward(text, sample["gym_entry"])
    return math_reward(text, sample["answer"])


def reward_and_acc(text: str, problem: Problem) -> tuple[float, float]:
    r, a, _ = score_batch(problem_reward, [text], [_sample(problem)])
    return r[0], a[0]


def _sample(p: Problem) -> dict:
    return {"answer": p.answer, "gym_entry": p.gym_entry["entry"] if p.gym_entry else None, "source": p.source}


# ---------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg: TrainConfig):
        from treepo.assets import bundled_model_path

        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        path = cfg.model or bundled_model_path()
        self.model_path = path
        self.tokenizer = load_tokenizer(path)
        model = load_model(path, dtype=cfg.train_dtype, device=self.device)
        self.hf_config = model.hf_config
        model.train()
        self.model = shard_model(model, self.world, self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        warm = max(cfg.warmup_steps, 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, lambda s: min(1.0, (s + 1) / warm))
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = load_model(path, dtype=cfg.train_dtype, device=self.device).eval()
        eng_model = load_model(path, dtype=cfg.engine_dtype, device=self.device)
        self.engine = Engine(eng_model, self.tokenizer, device=self.device)
        self.sampler = TreeSampler(self.engine, cfg.tree_config())
        # data: the same stream on every rank; rank r takes its slice of each step's prompts
        if cfg.train_jsonl:
            train = jsonl_problems(cfg.train_jsonl)
            heldout = train[-cfg.heldout_size:]
            train = train[:-cfg.heldout_size] or train
        else:
            train = gym_problems(cfg.train_task, cfg.train_size, cfg.seed, **cfg.train_task_config)
            heldout = gym_problems(cfg.train_task, cfg.heldout_size, cfg.seed + 10_000, **cfg.train_task_config)
            seen = {p.question for p in train}
            heldout = [p for p in heldout if p.question not in seen] or heldout
        self.stream = PromptStream(train, seed=cfg.seed)
        self.reward_fn = problem_reward
        if cfg.reward_fn:
            import importlib

            mod, _, fn = cfg.reward_fn.partition(":")
            self.reward_fn = getattr(importlib.import_module(mod), fn)
        self.heldout = heldout
        self.step = 0
        self.out = cfg.output_dir
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.json"), "w") as fh:
                json.dump(dataclasses.asdict(cfg), fh, indent=1)
        self.tb = None
        if self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(self.out, "tb"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    # ------------------------------------------------------------------ engine weights
    @torch.no_grad()
    def sync_engine(self):
        """Copy the trained weights into the engine's inference model (collective under FSDP)."""
        sd = ckpt.full_state_dict(self.model, all_ranks=True) if self.world > 1 else self.model.state_dict()
        eng_params = self.engine.model.state_dict()
        missing = [k for k in eng_params if k not in sd]
        if missing:
            raise RuntimeError(f"weight sync: trained state dict lacks {missing[:4]}")
        for k, v in sd.items():
            if k in eng_params:
                v = v.full_tensor() if hasattr(v, "full_tensor") else v
                eng_params[k].copy_(v.to(eng_params[k].device, eng_params[k].dtype))

    # ------------------------------------------------------------------ rollout
    def rollout(self, problems: list[Problem], keys: list[int]):
        cfg = self.cfg
        prompts = [render_prompt(self.tokenizer, p.question) for p in problems]
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
        self.sampler.training_step = self.step
        trees = self.sampler.sample(prompts, params, keys=keys)
        texts, samples = [], []
        for p, t in zip(problems, trees):
            for leaf in t.leaves:
                texts.append(self.tokenizer.decode(leaf.token_ids, skip_special_tokens=True))
                samples.append(_sample(p) | {"response_ids": leaf.token_ids})
        rewards, accs, failures = score_batch(self.reward_fn, texts, samples, timeout_s=cfg.reward_timeout_s)
        return trees, texts, rewards, accs, failures

    def draw(self, n_per_rank: int) -> tuple[list[Problem], list[int]]:
        """This rank's slice of n_per_rank * world problems drawn from the shared stream (every rank
        draws the same ones, so the streams stay in step); keys = global draw positions."""
        st = self.stream
        start = st.epoch * len(st.problems) + st.pos
        problems = st.take(n_per_rank * self.world)
        lo = self.rank * n_per_rank
        return problems[lo:lo + n_per_rank], list(range(start + lo, start + lo + n_per_rank))

    def collect(self) -> dict:
        """Sample this rank's prompts; dynamic sampling keeps prompts whose leaves disagree."""
        cfg = self.cfg
        per_rank = max(1, cfg.prompts_per_step // self.world)
        kept_trees, kept_rewards, kept_accs = [], [], []
        stats = {"gen_rounds": 0, "prompts_sampled": 0, "prompts_dropped": 0, "reward_failures": 0,
                 "sampled_rewards": [], "sampled_accs": [], "finish": {}, "processed": 0, "seq_equiv": 0,
                 "gen_time": 0.0, "leaf_lens": []}
        for _ in range(cfg.max_gen_batches):
            local_need = per_rank - len(kept_trees)
            need = int(all_sum(local_need, dist.ReduceOp.MAX))
            if need == 0:
                break
            problems, keys = self.draw(need)  # every rank draws, so the streams stay in step
            problems, keys = problems[:local_need], keys[:local_need]
            if not problems:
                continue
            t0 = time.perf_counter()
            trees, _, rewards, accs, failures = self.rollout(problems, keys)
            stats["gen_time"] += time.perf_counter() - t0
            stats["gen_rounds"] += 1
            stats["prompts_sampled"] += len(problems)
            stats["reward_failures"] += failures
            stats["sampled_rewards"] += rewards
            stats["sampled_accs"] += accs
            i = 0
            for t in trees:
                n = len(t.leaves)
                r, a = rewards[i:i + n], accs[i:i + n]
                i += n
                stats["processed"] += t.stats.processed_tokens
                stats["seq_equiv"] += len(t.prompt_token_ids) + sum(len(l.token_ids) for l in t.leaves) - n
                for leaf in t.leaves:
                    stats["finish"][leaf.finish_reason] = stats["finish"].get(leaf.finish_reason, 0) + 1
                    stats["leaf_lens"].append(len(leaf.token_ids))
                if cfg.dynamic_sampling and len(set(a)) <= 1:
                    stats["prompts_dropped"] += 1
                    continue
                if len(kept_trees) < per_rank:
                    kept_trees.append(t)
                    kept_rewards += r
                    kept_accs += a
            if not cfg.dynamic_sampling:
                break
        stats["short_batch"] = len(kept_trees) < per_rank
        return {"trees": kept_trees, "rewards": kept_rewards, "accs": kept_accs, **stats}

    # ------------------------------------------------------------------ update
    def advantages(self, trees, rewards: torch.Tensor, batch) -> torch.Tensor:
        cfg = self.cfg
        if len(rewards) == 0:
            return rewards
        if cfg.advantage == "grpo":
            return grpo_advantages(rewards, batch["prompt_index"], use_std=True)
        # tree advantage; with depth-1 trees (sequential) it is the group-mean baseline (REINFORCE++-baseline)
        paths = batch["paths"] if cfg.advantage == "tree" else [p[:1] for p in batch["paths"]]
        return tree_advantages(rewards, paths, batch["prompt_index"], aggregation=cfg.aggregation,
                               include_root=cfg.include_root)

    def score(self, model, mb):
        Lp = mb["prompts"].shape[1]
        return model(mb["input_ids"], mb["position_ids"], attention_mask=mb["attention_mask"],
                     labels=mb["responses"], label_start=Lp)

    def train_step(self) -> dict:
        cfg = self.cfg
        t_step = time.perf_counter()
        data = self.collect()
        timing = {"gen": data["gen_time"]}
        trees, m = data["trees"], {}
        rewards = torch.tensor(data["rewards"], dtype=torch.float32)
        if trees:
            batch = trees_to_batch(trees, pad_token_id=self.tokenizer.pad_token_id or 0)
            lens = batch["response_lengths"].float()
            if cfg.overlong_buffer > 0:  # DAPO overlong shaping
                L, B = cfg.max_response_len, cfg.overlong_buffer
                rewards = rewards + torch.clamp(-(lens - (L - B)) / B * cfg.overlong_factor, max=0.0)
            t0 = time.perf_counter()
            adv = self.advantages(trees, rewards, batch)
            timing["adv"] = time.perf_counter() - t0
        else:  # nothing kept on this rank: take part in the collectives with empty work
            batch, adv = None, torch.zeros(0)
        N = len(adv)
        # token-level advantages whitened over the whole batch across ranks
        if batch is not None:
            mask = batch["response_mask"].float()
            adv_tok = whiten(adv[:, None].expand_as(mask) * mask, mask)
        # micro-batches: equal count on every rank (FSDP collectives), padded with empty ones
        rows = list(range(N))
        minis = [rows[i::cfg.mini_batches] for i in range(cfg.mini_batches)]
        t0 = time.perf_counter()
        # old log-probs recomputed by the trainer's model (the sampler's are logged against them)
        old_lp = None
        if batch is not None:
            old_lp = torch.zeros_like(mask)
        n_mb_total = int(all_sum(math.ceil(N / cfg.micro_batch_size), dist.ReduceOp.MAX))
        with torch.no_grad():
            for j in range(n_mb_total):
                idx = rows[j * cfg.micro_batch_size:(j + 1) * cfg.micro_batch_size]
                mb = self._micro(batch, idx)
                lp, _ = self.score(self.model, mb)
                if idx:
                    old_lp[idx] = lp.float() * mb["response_mask"]
        timing["old_log_prob"] = time.perf_counter() - t0
        metrics_acc = {}
        t0 = time.perf_counter()
        grad_norms, skipped = [], 0
        for mini in minis:
            n_mb = int(all_sum(math.ceil(len(mini) / cfg.micro_batch_size), dist.ReduceOp.MAX))
            local_tokens = float(mask[mini].sum()) if batch is not None and mini else 0.0
            token_count = max(all_sum(local_tokens), 1.0)
            self.optim.zero_grad(set_to_none=True)
            for j in range(n_mb):
                idx = mini[j * cfg.micro_batch_size:(j + 1) * cfg.micro_batch_size]
                mb = self._micro(batch, idx)
                lp, ent = self.score(self.model, mb)
                if idx:
                    a = adv_tok[idx]
                    lp_old = old_lp[idx]
                else:
                    a = torch.zeros_like(lp)
                    lp_old = lp.detach()
                lp_ref = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        lp_ref, _ = self.score(self.ref_model, mb)
                loss, met = policy_loss(lp, lp_old, a, mb["response_mask"].float(), eps_low=cfg.eps_low,
                                        eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, token_count=token_count,
                                        logp_ref=lp_ref, kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, entropy=ent)
                (loss * self.world).backward()  # FSDP averages gradients over ranks; we want the sum
                w = float(mb["response_mask"].sum())
                for k, v in met.items():
                    metrics_acc.setdefault(k, [0.0, 0.0])
                    metrics_acc[k][0] += float(v) * w
                    metrics_acc[k][1] += w
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            if torch.isfinite(gn):
                self.optim.step()
            else:
                skipped += 1
            grad_norms.append(float(gn))
        self.sched.step()
        timing["update"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.sync_engine()
        timing["weight_sync"] = time.perf_counter() - t0
        self.step += 1
        # metrics (rank-averaged where it matters)
        for k, (s, w) in sorted(metrics_acc.items()):
            m[f"actor/{k}"] = all_sum(s) / max(all_sum(w), 1.0)
        sr, sa = data["sampled_rewards"], data["sampled_accs"]
        m["reward/mean"] = all_sum(sum(sr)) / max(all_sum(len(sr)), 1)
        m["reward/accuracy"] = all_sum(sum(sa)) / max(all_sum(len(sa)), 1)
        m["reward/failures"] = all_sum(data["reward_failures"])
        m["batch/prompts_kept"] = all_sum(len(trees))
        m["batch/prompts_dropped"] = all_sum(data["prompts_dropped"])
        m["batch/gen_rounds"] = all_sum(data["gen_rounds"], dist.ReduceOp.MAX)
        m["batch/short"] = all_sum(int(data["short_batch"]), dist.ReduceOp.MAX)
        m["batch/leaves"] = all_sum(N)
        if N:
            m["adv/mean"], m["adv/std"] = float(adv.mean()), float(adv.std()) if N > 1 else 0.0
            mm = mask.bool()
            m["mismatch/sampler_vs_trainer_logp"] = float((batch["old_logprobs"][mm] - old_lp[mm]).abs().mean())
        lens = data["leaf_lens"]
        m["response/len_mean"] = all_sum(sum(lens)) / max(all_sum(len(lens)), 1)
        m["response/len_max"] = all_sum(max(lens, default=0), dist.ReduceOp.MAX)
        m["response/clip_ratio"] = all_sum(sum(l >= cfg.max_response_len for l in lens)) / max(all_sum(len(lens)), 1)
        for reason in ("answer", "eos", "repetition", "max_len", "max_depth"):
            m[f"finish/{reason}"] = all_sum(data["finish"].get(reason, 0))
        proc, seq_eq = all_sum(data["processed"]), all_sum(data["seq_equiv"])
        m["sampling/tokens_processed"] = proc
        m["sampling/compute_saved_vs_sequential"] = 1 - proc / max(seq_eq, 1)
        m["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        m["actor/skipped_steps"] = skipped
        m["actor/lr"] = self.sched.get_last_lr()[0]
        wall = time.perf_counter() - t_step
        for k, v in timing.items():
            m[f"timing/{k}"] = all_sum(v, dist.ReduceOp.MAX)
        m["timing/step"] = all_sum(wall, dist.ReduceOp.MAX)
        m["perf/tokens_per_s"] = proc / max(m["timing/step"], 1e-9)
        return m

    def _micro(self, batch, idx):
        """Rows idx of the batch; an all-padding single row when idx is empty."""
        keys = ("prompts", "responses", "response_mask", "input_ids", "attention_mask", "position_ids")
        if batch is None or not idx:
            z = torch.zeros(1, 2, dtype=torch.long, device=self.device)
            mb = {k: z.clone() for k in keys}
            mb["prompts"] = z[:, :1].clone()
            mb["responses"] = z[:, :1].clone()
            mb["response_mask"] = z[:, :1].clone()
            mb["attention_mask"] = torch.ones_like(z)
            mb["position_ids"] = torch.arange(2, device=self.device)[None]
            return mb
        it = torch.tensor(idx)
        return {k: batch[k][it].to(self.device) for k in keys}

    # ------------------------------------------------------------------ eval / save / loop
    def run_eval(self, final: bool = False) -> dict:
        cfg = self.cfg
        res = {}
        # every rank evaluates its slice of the problems; sums are all-reduced
        def shard(ps):
            return ps[self.rank::self.world]
        ev = evaluate(self.engine, shard(self.heldout), reward_and_acc, n=cfg.eval_n,
                      temperature=cfg.eval_temperature, max_tokens=cfg.eval_max_tokens, seed=cfg.seed)
        res.update(self._reduce_eval(ev, "heldout"))
        if cfg.eval_gsm8k and (final or self.step == 0):
            ev = evaluate(self.engine, shard(gsm8k_test()), reward_and_acc, n=1, temperature=cfg.eval_temperature,
                          max_tokens=cfg.gsm8k_max_tokens, seed=cfg.seed)
            res.update(self._reduce_eval(ev, "gsm8k"))
        return res

    def _reduce_eval(self, ev: dict, name: str) -> dict:
        out = {}
        o = ev.get("overall", {})
        n = o.get("problems", 0)
        tot = all_sum(n)
        for k, v in sorted(o.items()):  # same order on every rank: these are collectives
            if k != "problems":
                out[f"eval/{name}/{k}"] = all_sum(v * n) / max(tot, 1)
        out[f"eval/{name}/problems"] = tot
        return out

    def save(self):
        extra = {"data": self.stream.state_dict(), "sched": self.sched.state_dict(),
                 "config": dataclasses.asdict(self.cfg)}
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optim, extra)

    def maybe_resume(self):
        if not self.cfg.resume:
            return
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise ValueError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
        meta = ckpt.load_checkpoint(path, self.model, self.optim)
        self.step = meta["step"]
        self.stream.load_state_dict(meta["data"])
        self.sched.load_state_dict(meta["sched"])
        self.sync_engine()
        self.log({"resumed_from": path, "step": self.step})

    def log(self, rec: dict):
        if self.rank != 0:
            return
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None and "step" in rec:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def progress(self, m: dict):
        if self.rank != 0:
            return
        cfg = self.cfg
        done = self.step / cfg.steps
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        print(f"[{bar}] step {self.step}/{cfg.steps} reward {m['reward/mean']:+.3f} acc {m['reward/accuracy']:.3f} "
              f"len {m['response/len_mean']:.0f} kept {m['batch/prompts_kept']:.0f} "
              f"loss {m.get('actor/pg_loss', 0):+.4f} gn {m['actor/grad_norm']:.3f} "
              f"saved {m['sampling/compute_saved_vs_sequential']:.0%} {m['timing/step']:.1f}s", flush=True)

    def fit(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        history = []
        if self.step == 0:
            ev = self.run_eval()
            self.log({"step": 0, **ev})
            history.append({"step": 0, **ev})
            self._print_eval(ev)
        while self.step < cfg.steps:
            m = self.train_step()
            rec = {"step": self.step, **m}
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                ev = self.run_eval()
                rec.update(ev)
                self._print_eval(ev)
            self.log(rec)
            history.append(rec)
            self.progress(m)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
        ev = self.run_eval(final=True)
        self.log({"step": self.step, "final": True, **ev})
        self._print_eval(ev)
        self.save()
        if cfg.export_hf:
            ckpt.export_hf(self.model, os.path.join(self.out, "hf"), self.hf_config, self.tokenizer)
        if self.rank == 0:
            from .plots import plot_metrics
            plot_metrics(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "curves.png"))
        return ev

    def _print_eval(self, ev: dict):
        if self.rank == 0 and ev:
            print("eval step", self.step, " ".join(f"{k.split('eval/')[1]}={v:.3f}" for k, v in ev.items()
                                                   if not k.endswith("problems")), flush=True)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

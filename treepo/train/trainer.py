"""TreePO trainer: tree rollouts -> rewards -> tree advantages -> DAPO loss, FSDP2 via torchrun.

One process per rank (`treepo train` is a world of one; `torchrun --nproc_per_node N -m
treepo.train` shards). Each rank owns an inference Engine (its own weight copy, refreshed from the
trained model after every optimizer step) and samples its shard of the step's prompts with the
TreeSampler (or sequential sampling: the GRPO/DAPO baseline through the same code). One RL step:
collect (train/rollout.py) -> advantages -> old log-probs -> mini-batch updates -> weight sync.
Algorithm: docs/algorithm.md sections 2-4; the step, FSDP and numerics: docs/training.md.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from treepo.advantages import (
    broadcast_to_tokens,
    grpo_advantages,
    reinforce_pp_baseline_advantages,
    tree_advantages,
    whiten,
)
from treepo.engine.config import SamplingParams
from treepo.engine.engine import Engine
from treepo.engine.loader import load_model
from treepo.engine.tokenizer import load_tokenizer
from treepo.losses import policy_loss, token_count_for_step
from treepo.progress import progress as progress_bar
from treepo.rollout.sampler import TreeSampler
from treepo.rollout.tree import trees_to_batch

from . import checkpoint as ckpt
from .config import TrainConfig, parse_args
from .data import PromptStream, gsm8k_test, train_and_heldout
from .distributed import all_max, all_reduce_scalar, init_distributed, shard_model
from .evaluate import evaluate, reduce_eval
from .memory import PeakMemory, return_freed_tensors_to_the_os
from .metrics import (
    MetricsLog,
    TokenWeighted,
    batch_metrics,
    eval_line,
    packing_metrics,
    progress_line,
    rollout_metrics,
    timing_metrics,
)
from .precision import autocast, resolve_autocast, resolve_engine_dtype
from .rewards.problems import ProblemScorer
from .rollout import Rollout, RolloutCollector
from .run_dir import clear_previous_run, plan_run_on_rank0, write_config
from .step_batch import MicroBatch, StepBatch
from .tree_attention import TreeAttention, check_attention

MICRO_KEYS = ("prompts", "responses", "response_mask", "input_ids", "attention_mask", "position_ids")


class Trainer:
    tokens_computed = 0  # tokens through the model calls of the current step (logprobs adds, train_step resets)

    def __init__(self, cfg: TrainConfig):
        from treepo.assets import bundled_model_path

        self.cfg = cfg
        return_freed_tensors_to_the_os()  # a step's freed activations must not stay in the RSS (memory.py)
        self.scorer = ProblemScorer(cfg.reward_fn, cfg.reward_timeout_s)  # a bad reward_fn fails before loading
        self.rank, self.world, self.device = init_distributed()
        self.out = cfg.output_dir
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        self.plan = plan_run_on_rank0(cfg, self.rank)  # output dir and checkpoint, before any model loads
        train, self.heldout = self._datasets()  # bad data or a held-out split that cannot work: before loading
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        path = cfg.model or bundled_model_path()
        self.model_path = path
        self.tokenizer = load_tokenizer(path)
        self.autocast_dtype = resolve_autocast(cfg.autocast, self.device)
        check_attention(cfg.attention, self.device)  # before the model loads
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
        eng_model = load_model(path, dtype=resolve_engine_dtype(cfg.engine_dtype, self.device), device=self.device)
        self.engine = Engine(eng_model, self.tokenizer, device=self.device)
        self.sampler = TreeSampler(self.engine, cfg.tree_config())
        self.stream = PromptStream(train, seed=cfg.seed)
        self.collector = RolloutCollector(self.sampler, self.tokenizer, self.scorer, self.stream, self.rank,
                                          self.world, SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                                                     seed=cfg.seed, return_model_logprobs=True),
                                          cfg.prompts_per_step, cfg.dynamic_sampling, cfg.max_gen_batches)
        self.step = 0
        if self.rank == 0:
            if cfg.overwrite and self.plan.previous:  # only now that the model has loaded
                self._print(f"--overwrite: deleted {', '.join(clear_previous_run(self.out))} in {self.out}")
            write_config(self.out, cfg)
        self.log = MetricsLog(self.out, self.rank)

    def _datasets(self):
        """(train, held-out) problems: the same on every rank; rank r takes its slice per step.
        No held-out question occurs in training (data.split_heldout; docs/training.md section 9)."""
        train, heldout = train_and_heldout(self.cfg)
        self._print(f"data: {len(train)} training problems ({len({p.question for p in train})} distinct "
                    f"questions), {len(heldout)} held-out problems whose questions are never trained on")
        return train, heldout

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

    # ------------------------------------------------------------------ one step
    def advantages(self, tensors: dict, rewards: torch.Tensor) -> torch.Tensor:
        """[N] per-leaf advantages of cfg.advantage (TreePO tree, GRPO, or REINFORCE++-baseline)."""
        cfg = self.cfg
        if cfg.advantage == "grpo":
            return grpo_advantages(rewards, tensors["prompt_index"], use_std=True)
        if cfg.advantage == "rpp":
            return reinforce_pp_baseline_advantages(rewards, tensors["prompt_index"])
        return tree_advantages(rewards, tensors["paths"], tensors["prompt_index"], aggregation=cfg.aggregation,
                               include_root=cfg.include_root)

    def prepare(self, rollout: Rollout) -> StepBatch | None:
        """Padded per-leaf tensors, overlong shaping, advantages and their whitening (a collective:
        a rank with nothing kept still takes part, and gets None)."""
        cfg = self.cfg
        if not rollout.groups:
            whiten(torch.zeros(0, 1), torch.zeros(0, 1))
            return None
        tensors = trees_to_batch(rollout.trees, pad_token_id=self.tokenizer.pad_token_id or 0)
        rewards = rollout.rewards()
        if cfg.overlong_buffer > 0:  # DAPO overlong shaping
            L, B = cfg.max_response_len, cfg.overlong_buffer
            lens = tensors["response_lengths"].float()
            rewards = rewards + torch.clamp(-(lens - (L - B)) / B * cfg.overlong_factor, max=0.0)
        adv = self.advantages(tensors, rewards)
        mask = tensors["response_mask"].float()
        # the trainer scores the untempered model: compare it with the sampler's model_logprobs
        # (leaf.logprobs are under the tempered, truncated sampling distribution)
        sampler_lp = torch.zeros_like(mask)
        for r, leaf in enumerate(lf for t in rollout.trees for lf in t.leaves):
            lps = leaf.model_logprobs if leaf.model_logprobs is not None else leaf.logprobs
            sampler_lp[r, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        return StepBatch(tensors, adv, whiten(broadcast_to_tokens(adv, mask), mask), mask, sampler_lp,
                         rollout.trees, cfg.packing)

    def logprobs(self, model, batch: StepBatch | None, mb: MicroBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of each response token [b, Lr] with grad, its entropy [b, Lr] without) of the
        micro-batch's leaf rows; packed micro-batches compute each unique token once and copy it to
        every (leaf, token) pair that reads it (docs/training.md section 10)."""
        with autocast(self.device, self.autocast_dtype):
            if mb is None or mb.packed is None:
                t = self.padded_rows(batch, mb.rows if mb is not None else [])
                self.tokens_computed += t["input_ids"].numel() if mb is not None else 0  # not a stand-in row
                Lp = t["prompts"].shape[1]
                return model(t["input_ids"], t["position_ids"], attention_mask=t["attention_mask"],
                             labels=t["responses"], label_start=Lp)
            p = mb.packed if mb.packed.input_ids.device == self.device else mb.packed.to(self.device)
            self.tokens_computed += p.tokens
            attn = TreeAttention.from_batch(p, self.cfg.attention)  # its masks / plan serve every layer
            lp, ent = model(p.input_ids, p.position_ids, attn=attn, labels=p.labels, label_positions=p.pred_index)
        width = batch.mask.shape[1]
        return p.scatter(lp, width), p.scatter(ent, width)

    def padded_rows(self, batch: StepBatch | None, idx: list[int]) -> dict:
        """Rows idx of the padded layout; an all-padding single row when idx is empty (the rank has
        no work for this micro-batch but must run the FSDP collectives)."""
        if batch is None or not idx:
            z = torch.zeros(1, 2, dtype=torch.long, device=self.device)
            mb = {k: z.clone() for k in MICRO_KEYS}
            for k in ("prompts", "responses", "response_mask"):
                mb[k] = z[:, :1].clone()
            mb["attention_mask"] = torch.ones_like(z)
            mb["position_ids"] = torch.arange(2, device=self.device)[None]
            return mb
        it = torch.tensor(idx)
        return {k: batch.tensors[k][it].to(self.device) for k in MICRO_KEYS}

    def micro_batches(self, batch: StepBatch | None, tree_ids: list[int]) -> list[MicroBatch | None]:
        """The micro-batches of these trees, padded with None (an empty micro-batch) to the same
        count on every rank (FSDP collectives)."""
        mbs = batch.micro_batches(tree_ids, self.cfg.micro_batch_tokens) if batch is not None and tree_ids else []
        n = int(all_max(len(mbs)))
        return mbs + [None] * (n - len(mbs))

    @torch.no_grad()
    def old_logprobs(self, batch: StepBatch | None) -> torch.Tensor | None:
        """logp_old [N, Lr] recomputed by the trained model (the sampler's are logged against it)."""
        old = torch.zeros_like(batch.mask) if batch is not None else None
        trees = list(range(len(batch.trees))) if batch is not None else []
        mbs = self.micro_batches(batch, trees)
        with self._progress("old log-probs", len(mbs)) as bar:
            for mb in mbs:
                lp, _ = self.logprobs(self.model, batch, mb)
                if mb is not None:
                    old[mb.rows] = lp.float().cpu() * batch.mask[mb.rows]
                bar.update()
        return old

    def _progress(self, what: str, total: int):
        """A progress bar of this step's `what` on rank 0 (treepo/progress.py: on a terminal only)."""
        return progress_bar(f"step {self.step + 1} {what}" if self.rank == 0 else None, total, "micro-batch")

    def update(self, batch: StepBatch | None, old_lp: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
        """One optimizer step per mini-batch on the DAPO loss (token-mean over the mini-batch's
        valid tokens on all ranks; FSDP's gradient averaging compensated). old_lp None: on-policy
        (one mini-batch), so logp_old is the update's own log-prob, detached. Returns (metrics,
        the log-probs of the update's first forward [N, Lr] for the mismatch metric)."""
        cfg = self.cfg
        acc, grad_norms, skipped = TokenWeighted(), [], 0
        first_lp = torch.zeros_like(batch.mask) if batch is not None else None
        minis = batch.mini_batches(cfg.mini_batches) if batch is not None else [[]] * cfg.mini_batches
        plans = [self.micro_batches(batch, mini) for mini in minis]
        bar = self._progress("update", sum(len(p) for p in plans))
        for mini, mbs in zip(minis, plans):
            rows = [r for t in mini for r in batch.tree_rows[t]] if batch is not None else []
            token_count = max(token_count_for_step([batch.mask[rows]] if rows else []), 1)
            self.optim.zero_grad(set_to_none=True)
            for mb in mbs:
                bar.update()
                lp, ent = self.logprobs(self.model, batch, mb)
                if mb is not None:
                    mask = batch.mask[mb.rows].to(self.device)
                    a = batch.token_advantages[mb.rows].to(self.device)
                    lp_old = old_lp[mb.rows].to(self.device) if old_lp is not None else lp.detach()
                    first_lp[mb.rows] = lp.detach().float().cpu() * batch.mask[mb.rows]
                else:
                    mask = torch.zeros_like(lp)
                    a, lp_old = torch.zeros_like(lp), lp.detach()
                lp_ref = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        lp_ref, _ = self.logprobs(self.ref_model, batch, mb)
                loss, met = policy_loss(lp, lp_old, a, mask, eps_low=cfg.eps_low,
                                        eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, token_count=token_count,
                                        logp_ref=lp_ref, kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, entropy=ent)
                (loss * self.world).backward()  # FSDP averages gradients over ranks; we want the sum
                acc.add(met, float(mask.sum()))
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            if torch.isfinite(gn):
                self.optim.step()
            else:
                skipped += 1
            grad_norms.append(float(gn))
        bar.close()
        lr = self.sched.get_last_lr()[0]  # the rate this step used (read before the scheduler moves on)
        self.sched.step()
        m = acc.reduce("actor/")
        m["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        m["actor/skipped_steps"] = skipped
        m["actor/lr"] = lr
        return m, first_lp

    def train_step(self) -> dict:
        cfg = self.cfg
        t_step = time.perf_counter()
        self.tokens_computed = 0  # tokens through the trainer's model calls this step (logprobs counts them)
        rollout = self.collector.collect(self.step)
        timing = {"gen": rollout.stats.gen_time}
        t0 = time.perf_counter()
        batch = self.prepare(rollout)
        timing["adv"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # on-policy (one mini-batch, one epoch): logp_old is the update's log-prob detached, the
        # weights being those that sampled; with several mini-batches the old pass is needed
        old_lp = self.old_logprobs(batch) if cfg.mini_batches > 1 else None
        timing["old_log_prob"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with PeakMemory(self.device) as peak:
            m, first_lp = self.update(batch, old_lp)
        timing["update"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.sync_engine()
        timing["weight_sync"] = time.perf_counter() - t0
        self.step += 1
        N = batch.rows if batch is not None else 0
        m |= rollout_metrics(rollout.stats, len(rollout.groups), N, cfg.max_response_len)
        m |= batch_metrics(batch, old_lp if old_lp is not None else first_lp)
        m |= packing_metrics(batch)
        # every pass's tokens: the update's forward (+ backward), the old-log-prob and reference forwards
        m["packing/tokens_computed"] = all_reduce_scalar(self.tokens_computed)
        m["perf/update_peak_mem_gb"] = all_max(peak.peak_gb)
        m["perf/update_mem_growth_gb"] = all_max(peak.peak_gb - peak.start_gb)  # above the update's start
        timing["step"] = time.perf_counter() - t_step
        m |= timing_metrics(timing)
        m["perf/tokens_per_s"] = m["sampling/tokens_processed"] / max(m["timing/step"], 1e-9)
        return m

    # ------------------------------------------------------------------ eval / save / loop
    def run_eval(self, final: bool = False) -> dict:
        """Held-out problems of the training task (and GSM8K before and after); every rank
        evaluates its slice and the sums are all-reduced."""
        cfg = self.cfg
        res = {}
        if self.heldout:  # --heldout_size 0: no held-out evaluation
            ev = evaluate(self.engine, self.heldout[self.rank::self.world], self.scorer, n=cfg.eval_n,
                          temperature=cfg.eval_temperature, max_tokens=cfg.eval_max_tokens, seed=cfg.seed,
                          problem_ids=self._slice_ids(len(self.heldout)), progress=self._eval_bar("heldout"))
            res.update(reduce_eval(ev, "heldout"))
        if cfg.eval_gsm8k and (final or self.step == 0):
            gsm = gsm8k_test()
            ev = evaluate(self.engine, gsm[self.rank::self.world], self.scorer, n=1,
                          temperature=cfg.eval_temperature, max_tokens=cfg.gsm8k_max_tokens, seed=cfg.seed,
                          problem_ids=self._slice_ids(len(gsm)), progress=self._eval_bar("GSM8K"))
            res.update(reduce_eval(ev, "gsm8k"))
        return res

    def _eval_bar(self, name: str) -> str | None:
        return f"eval {name} (step {self.step})" if self.rank == 0 else None

    def _slice_ids(self, n: int) -> list[int]:
        """Global indices of this rank's slice [rank::world] of n evaluation problems."""
        return list(range(self.rank, n, self.world))

    def save(self):
        extra = {"data": self.stream.state_dict(), "sched": self.sched.state_dict(),
                 "config": dataclasses.asdict(self.cfg)}
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optim, extra,
                                    keep=self.cfg.keep_checkpoints)

    def maybe_resume(self):
        """Load the checkpoint plan_run verified; metrics.jsonl loses the records of later steps
        (the resumed run redoes them)."""
        path = self.plan.resume_from
        if path is None:
            return
        for note in self.plan.skipped:
            self._print(f"--resume_fallback: {note}")
        meta = ckpt.load_checkpoint(path, self.model, self.optim)
        self.step = meta["step"]
        self.stream.load_state_dict(meta["data"])
        self.sched.load_state_dict(meta["sched"])
        self.sync_engine()
        dropped = self.log.truncate(self.step)
        self.log.write({"resumed_from": path, "step": self.step, "skipped": self.plan.skipped,
                        "dropped_records": dropped})
        self._print(f"resumed from {path} (step {self.step}; {dropped} later metrics records dropped)")

    def _print(self, line: str):
        if self.rank == 0:
            print(line, flush=True)

    def fit(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        if self.step == 0:
            ev = self.run_eval()
            self.log.write({"step": 0, **ev})
            self._print(eval_line(self.step, ev))
        while self.step < cfg.steps:
            m = self.train_step()
            rec = {"step": self.step, **m}
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                ev = self.run_eval()
                rec.update(ev)
                self._print(eval_line(self.step, ev))
            self.log.write(rec)
            self._print(progress_line(self.step, cfg.steps, m))
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
        ev = self.run_eval(final=True)
        self.log.write({"step": self.step, "final": True, **ev})
        self._print(eval_line(self.step, ev))
        self.save()
        if cfg.export_hf:
            ckpt.export_hf(self.model, os.path.join(self.out, "hf"), self.hf_config, self.tokenizer)
        if self.rank == 0:
            from .plots import plot_metrics
            plot_metrics(self.log.path, os.path.join(self.out, "curves.png"))
        return ev


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        Trainer(cfg).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cli(argv=None) -> int:
    """main for `treepo train` and `python -m treepo.train` / torchrun: a configuration, file or
    checkpoint error is one line on stderr and exit status 2."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        print(f"treepo train: error: {e}", file=sys.stderr)
        return 2

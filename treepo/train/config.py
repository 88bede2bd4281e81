"""The trainer's configuration: every field is a `treepo train` flag or a key of `--config`.

Presets are defaults, not overrides: they are applied before the --config file and the flags,
so `--preset quick --steps 15` runs 15 steps although 15 is also the plain default (a preset
applied after parsing cannot tell a flag that was given from one left at its default).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field

from treepo.advantages import AGGREGATIONS
from treepo.flags import METAVARS, add_bool_flag, field_docs, help_text, show, spellings
from treepo.losses import KL_TYPES
from treepo.rollout.tree import TreeConfig
from treepo.train.batch import PACKINGS
from treepo.train.tree_attention import IMPLS as ATTENTIONS

MODES = ("tree", "sequential")
ADVANTAGES = ("tree", "grpo", "rpp")
AUTOCASTS = ("auto", "bf16", "off")
ENGINE_DTYPES = ("auto", "bfloat16", "float32")

# preset name -> field values it sets (explicit fields and the --config file override them)
PRESETS: dict[str, dict] = {
    "default": {},
    "quick": dict(steps=6, prompts_per_step=4, leaves=4, segment_len=16, max_depth=4, max_response_len=64,
                  heldout_size=16, eval_every=0, eval_n=2, eval_max_tokens=64, gsm8k_max_tokens=64, save_every=3,
                  eval_gsm8k=False),
}


# field -> its valid values (checked in __post_init__, listed by `treepo train --help`)
CHOICES: dict[str, tuple] = {"preset": tuple(PRESETS), "mode": MODES, "packing": PACKINGS, "attention": ATTENTIONS,
                             "autocast": AUTOCASTS, "engine_dtype": ENGINE_DTYPES, "advantage": ADVANTAGES,
                             "aggregation": AGGREGATIONS, "kl_type": KL_TYPES}


@dataclass
class TrainConfig:
    """Every knob of a run; `treepo train --<field> value` or `--config file.json` sets them.

    Build it with `parse_args(argv)` or `TrainConfig.from_preset(name, **fields)`: a preset's
    values are defaults that explicit fields override (PRESETS).
    """

    # model and run
    model: str | None = None  # HF checkpoint dir; None = the bundled SmolLM2-135M-Instruct
    output_dir: str = "runs/treepo"  # metrics.jsonl, checkpoints/, hf/ (export), curves.png
    resume: bool = False  # continue the run in output_dir from checkpoints/latest, after checking its checksums
    resume_fallback: bool = False  # with resume: if that checkpoint is damaged, resume from the newest intact
    # older one (the run says which) instead of stopping with an error that names the damaged file
    overwrite: bool = False  # start afresh in an output_dir that holds an earlier run: once the model has
    # loaded, delete its config.json, metrics.jsonl, checkpoints/, hf/, curves.png and tb/ (other files stay);
    # without it (or resume) such an output_dir is refused
    seed: int = 0  # data order, tree sampling, the torch and Python RNGs (+ rank)
    steps: int = 15  # optimizer "RL steps" (each: sample, score, update)
    preset: str = "default"  # "default" | "quick" (a few minutes on 2 CPU cores): see PRESETS

    # data
    train_task: str = "basic_arithmetic"  # reasoning-gym task (ignored with train_jsonl)
    train_task_config: dict = field(default_factory=lambda: {  # the task's settings (JSON)
        "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"],
        "format_style": "simple", "allow_parentheses": False, "allow_negation": False, "whitespace": "single"})
    train_size: int = 5000  # problems generated for training
    train_jsonl: str | None = None  # JSONL {"question", "answer"} instead of the gym task
    heldout_size: int = 64  # held-out problems for evaluation, questions never trained on (0 = none)
    eval_gsm8k: bool = True  # also evaluate on the 100 real GSM8K test problems (before and after)

    # sampling
    mode: str = "tree"  # "tree" (TreePO) | "sequential" (i.i.d. samples: the GRPO/DAPO baseline)
    prompts_per_step: int = 8  # prompts per RL step (all ranks together)
    leaves: int = 8  # W: trajectories per prompt
    segment_len: int = 32  # l: tokens per tree segment (one decoding round before branching)
    max_depth: int = 4  # d: segments on a root-to-leaf path
    branch_factor: int = 2  # b: children of a node that branches
    max_response_len: int = 128  # L (defaults to l * d when 0)
    temperature: float = 0.7  # rollouts; at 1.0 the 135M model almost never answers within 128 tokens
    top_p: float = 1.0  # nucleus sampling of rollouts (1 = off)
    engine_dtype: str = "auto"  # inference copy: "auto" (bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX,
    # float32 elsewhere: torch emulates bf16 matmuls there, several times slower) | "bfloat16" | "float32"

    # batch shaping
    dynamic_sampling: bool = True  # drop prompts whose leaves all have the same accuracy ...
    max_gen_batches: int = 3  # ... and sample more, at most this many generation rounds per step
    overlong_buffer: int = 0  # B of overlong shaping (0 = off)
    overlong_factor: float = 1.0  # reward penalty at max_response_len (linear over its last B tokens)
    mini_batches: int = 1  # optimizer steps per RL step (1 epoch over the batch)
    packing: str = "tree"  # what one training forward computes (docs/training.md section 10): "tree" every
    # unique token of a tree once, "prompt" only the prompt shared, "none" one padded row per leaf
    micro_batch_tokens: int = 2048  # tokens per forward/backward (whole trees; a larger tree runs alone)
    attention: str = "auto"  # attention over packed trees (train/tree_attention.py): "auto" ("triton" on CUDA,
    # "gathered" on a CPU) | "triton" | "gathered" | "flex" (FlexAttention; no backward on a CPU) | "per_tree" | "dense"

    # advantages and loss
    advantage: str = "tree"  # "tree" (TreePO) | "grpo" | "rpp" (REINFORCE++-baseline)
    aggregation: str = "average"  # tree advantage: "average" | "size_weighted"
    include_root: bool = True  # tree advantage: the root (whole group) is one of the subgroups averaged
    eps_low: float = 0.2  # PPO clip: the ratio is clipped below at 1 - eps_low
    eps_high: float = 0.28  # ... and above at 1 + eps_high (DAPO's clip-higher)
    dual_clip: float = 10.0  # dual clip c: the loss of a negative advantage is at most -c A
    kl_coef: float = 0.0  # optional KL to the initial model (k1/k3); 0 = no reference model
    kl_type: str = "k3"  # KL estimator: "k1" | "k3"

    # optimiser
    lr: float = 5e-6  # AdamW learning rate (after warmup)
    warmup_steps: int = 3  # linear learning-rate warmup over this many optimizer steps
    weight_decay: float = 0.1  # AdamW
    grad_clip: float = 1.0  # max global gradient norm
    betas: tuple = (0.9, 0.999)  # AdamW (JSON list)
    train_dtype: str = "float32"  # parameters and optimizer state (fp32 master weights)
    autocast: str = "auto"  # bf16 autocast of the training forward/backward: "auto" (on CUDA, and on CPUs with
    # AVX512-BF16/AMX where it is faster) | "bf16" | "off"

    # evaluation, logging, checkpoints
    eval_every: int = 5  # steps between held-out evaluations (0 = only before and after)
    eval_n: int = 4  # samples per problem
    eval_temperature: float = 0.6  # sampling temperature of evaluation
    eval_max_tokens: int = 128  # response tokens per held-out problem
    gsm8k_max_tokens: int = 256  # response tokens per GSM8K problem
    save_every: int = 20  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # complete checkpoints kept: older ones are deleted after each save (0 = all)
    export_hf: bool = True  # write an HF-format model to output_dir/hf at the end
    reward_timeout_s: float = 10.0  # seconds one reward call may take; past it its worker is killed and the
    # response scores -1
    reward_fn: str | None = None  # "module:function" with fn(response_text, sample) -> float; None = built-in

    def __post_init__(self):
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.max_response_len == 0:
            self.max_response_len = self.segment_len * self.max_depth
        for name in ("steps", "prompts_per_step", "leaves", "mini_batches", "micro_batch_tokens",
                     "max_gen_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "weight_decay", "grad_clip", "temperature", "eps_low", "eps_high", "dual_clip",
                     "kl_coef", "overlong_factor", "reward_timeout_s", "eval_temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}={v!r} must be a finite number >= 0")
        for f in dataclasses.fields(self):
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} must be true or false")
        if self.resume and self.overwrite:
            raise ValueError("resume=True continues the run in output_dir, overwrite=True deletes it: give one")
        if self.resume_fallback and not self.resume:
            raise ValueError("resume_fallback=True only applies with resume=True")
        k = self.keep_checkpoints
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints!r} must be an integer >= 0 (0 = keep all)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        self.betas = tuple(self.betas)

    @classmethod
    def from_preset(cls, preset: str = "default", **fields) -> "TrainConfig":
        """The preset's values, overridden by `fields`."""
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **fields, "preset": preset})

    def tree_config(self) -> TreeConfig:
        """The sampler's TreeConfig (sequential mode: W i.i.d. samples of max_response_len)."""
        if self.mode == "sequential":
            return TreeConfig.sequential(self.leaves, self.max_response_len, seed=self.seed)
        return TreeConfig(segment_len=self.segment_len, max_depth=self.max_depth, max_width=self.leaves,
                          branch_factor=self.branch_factor, max_response_len=self.max_response_len,
                          seed=self.seed)


def _json_or_text(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


DESCRIPTION = """TreePO RL training. Every flag is a TrainConfig field (treepo/train/config.py) and a key
of the --config JSON file; values: preset < --config file < flags. Flags take underscores or dashes
(--segment_len 16 = --segment-len 16); a boolean is --resume, --resume true|false or --no-resume."""


def build_parser() -> argparse.ArgumentParser:
    """The `treepo train` parser: one flag per TrainConfig field, its help the field's comment plus its
    default, valid values and preset values; every parsed value is None unless given."""
    ap = argparse.ArgumentParser(prog="treepo train", description=DESCRIPTION,
                                 usage="treepo train [-h] [--config FILE] [--<field> VALUE ...]")
    ap.add_argument("--config", metavar="FILE", help="JSON file of TrainConfig fields (flags override it)")
    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        in_presets = [f"--preset {p}: {show(v[f.name])}" for p, v in PRESETS.items() if f.name in v]
        text = help_text(docs.get(f.name, ""), default, CHOICES.get(f.name), "; ".join(in_presets))
        kind = type(default)
        if kind is bool:
            add_bool_flag(ap, f.name, text)
        elif kind in (dict, tuple, list) or default is None:
            ap.add_argument(*spellings(f.name), dest=f.name, type=_json_or_text, default=None,
                            metavar="JSON" if default is not None else "STR", help=text)
        else:
            ap.add_argument(*spellings(f.name), dest=f.name, type=kind, default=None,
                            metavar="NAME" if f.name in CHOICES else METAVARS.get(kind, "VALUE"), help=text)
    return ap


def parse_args(argv=None) -> TrainConfig:
    """TrainConfig from flags: preset values < the --config JSON file < explicit flags."""
    args = build_parser().parse_args(argv)
    values = {}
    if args.config:
        try:
            with open(args.config) as fh:
                values.update(json.load(fh))
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {args.config}: not valid JSON ({e})") from None
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    return TrainConfig.from_preset(values.pop("preset", "default"), **values)

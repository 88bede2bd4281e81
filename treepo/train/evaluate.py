"""Evaluation: mean@n, maj@n and pass@k per dataset (docs/algorithm.md, section 4), from n
i.i.d. samples per problem (best-of-n, the trainer's evaluation) or from one TreePO tree per
problem, its leaves the samples (test-time tree search, paper section 4.5; the compute each
takes is measured by test_time.py). Responses are scored by the run's ProblemScorer: the same
reward function as the rollouts (`--reward_fn` included), under the same deadline."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from treepo.engine.config import SamplingParams
from treepo.engine.engine import Completion
from treepo.rollout.sampler import TreeSampler
from treepo.rollout.tree import Tree, TreeConfig

from .data import Problem, render_prompt
from .distributed import all_reduce_scalar
from .rewards import extract_answer
from .rewards.problems import ProblemScorer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021); needs k <= n."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(engine, problems: list[Problem], scorer: ProblemScorer, n: int = 4, temperature: float = 0.6,
             max_tokens: int = 256, seed: int = 0, ks: tuple[int, ...] | None = None,
             problem_ids: list[int] | None = None, progress: str | None = None,
             sampler: TreeConfig | None = None) -> dict:
    """Sample completions per problem and score them with `scorer` (accuracy 1 where reward > 0).

    sampler: None samples n i.i.d. completions of up to max_tokens (Engine.generate); a
    TreeConfig samples one tree per problem (TreeSampler, seeded by seed and the problem's id)
    whose leaves are its samples: n is then its max_width and max_tokens its max_response_len
    (the arguments are ignored). A tree can end with fewer leaves than W (TreeStats.limit):
    each problem's metrics use the samples it got (pass@k with k capped at that count).
    problem_ids: each problem's index in the whole evaluation set (default: its index here). The
    samples of a problem are seeded by (seed, its id), so a rank evaluating a slice draws exactly
    what one process evaluating everything draws: results do not depend on the world size.
    progress: a label for a progress bar of completions finished (on a terminal only).

    Returns {source: {"mean@n", "maj@n", "pass@k"..., "response_len", "problems"}, "overall":
    size-weighted}; every metric key is present in every entry (maj@n is 0 for a problem where no
    response gives an answer), and "overall" has them all even for an empty problem list, so
    ranks reduce the same keys (reduce_eval)."""
    outs, _ = sample_completions(engine, problems, n, temperature, max_tokens, seed, problem_ids, progress, sampler)
    n = sampler.max_width if sampler is not None else n
    return score_completions(problems, outs, scorer, ks or tuple(sorted({1, n})))


def sample_completions(engine, problems: list[Problem], n: int, temperature: float, max_tokens: int, seed: int,
                       problem_ids: list[int] | None = None, progress: str | None = None,
                       sampler: TreeConfig | None = None) -> tuple[list[list[Completion]], list[Tree] | None]:
    """(completions per problem, the trees or None): evaluate's sampling, described there."""
    tok = engine.tokenizer
    prompts = [render_prompt(tok, p.question) for p in problems]
    params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
    if sampler is None:
        return engine.generate(prompts, params, stream_ids=problem_ids, progress=progress), None
    params = SamplingParams(temperature=temperature, max_tokens=sampler.max_response_len, seed=seed)
    trees = TreeSampler(engine, sampler).sample(prompts, params, keys=problem_ids, progress=progress)
    outs = [[Completion(lf.token_ids, lf.logprobs, lf.finish_reason,
                        text=tok.decode(lf.token_ids, skip_special_tokens=True) if tok is not None else None)
             for lf in t.leaves] for t in trees]
    return outs, trees


def score_completions(problems: list[Problem], outs: list[list[Completion]], scorer: ProblemScorer,
                      ks: tuple[int, ...]) -> dict:
    """evaluate's metrics of the completions of each problem (outs[j] belongs to problems[j])."""
    keys = metric_keys(ks)
    per = defaultdict(lambda: dict.fromkeys(keys, 0.0))
    counts = Counter()
    _, all_accs, _ = scorer.score([c.text for comps in outs for c in comps],
                                  [p for p, comps in zip(problems, outs) for _ in comps],
                                  [c.token_ids for comps in outs for c in comps])
    i = 0
    for prob, comps in zip(problems, outs):
        texts = [c.text for c in comps]
        n = len(comps)
        accs, i = all_accs[i:i + n], i + n
        m = per[prob.source]
        counts[prob.source] += 1
        if not n:  # a tree without leaves scores 0 everywhere
            continue
        c = int(sum(a > 0 for a in accs))
        m["mean@n"] += sum(accs) / n
        answers = [extract_answer(t) for t in texts]
        voted = Counter(a for a in answers if a is not None).most_common(1)
        if voted:  # majority answer, scored like any response that gives it
            m["maj@n"] += accs[answers.index(voted[0][0])]
        for k in ks:
            m[f"pass@{k}"] += pass_at_k(n, c, min(k, n))
        m["response_len"] += sum(len(cc.token_ids) for cc in comps) / n
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

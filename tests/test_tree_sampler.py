"""TreePO tree sampler: invariants, fallback correctness, stops, resources, determinism."""
import random

import pytest
import torch
from helpers import assert_close, tiny_hf_model

from treepo import Engine, KVCacheExhausted, SamplingParams, TreeConfig, TreeSampler, trees_to_batch
from treepo.rollout.branching import (
    children_budget,
    fallback_children,
    logprob_allocation,
    page_bound,
    path_statistic,
    uniform_allocation,
)
from treepo.rollout.text_rules import boxed_spans, has_repetition
from treepo.rollout.tree import FALLBACK_CANDIDATES, FINISH_REASONS

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 41))]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama3_rope_gqa3", vocab=160, layers=2)


def engine(hf, eos=range(1, 12), **kw):
    eng = Engine.from_model(hf, num_pages=kw.pop("num_pages", 4096), page_size=kw.pop("page_size", 4), **kw)
    eng.eos_token_ids = set(eos)
    return eng


def check_tree(tree, cfg):
    nodes = tree.nodes
    for leaf in tree.leaves:
        segs = [nodes[n].token_ids for n in leaf.path]
        assert leaf.token_ids == [t for s in segs for t in s], "leaf is not the concatenation of its path"
        assert all(1 <= len(s) <= cfg.segment_len for s in segs)
        assert all(len(s) == cfg.segment_len for s in segs[:-1]), "inner segments are full"
        assert [nodes[n].depth for n in leaf.path] == list(range(1, leaf.depth + 1))
        assert all(nodes[b].parent == a for a, b in zip([0] + leaf.path, leaf.path))
        assert len(leaf.token_ids) <= cfg.max_response_len and leaf.depth <= cfg.max_depth
        assert len(leaf.logprobs) == len(leaf.token_ids)
        assert nodes[leaf.path[-1]].finish_reason == leaf.finish_reason


CONFIGS = [
    dict(segment_len=6, max_depth=5, max_width=8, branch_factor=2),
    dict(segment_len=4, max_depth=6, max_width=16, branch_factor=3, init_divergence="random", init_min=2, init_max=5),
    dict(segment_len=5, max_depth=4, max_width=8, branch_factor=2, branch_policy="logprob", prefer="high"),
    dict(segment_len=3, max_depth=8, max_width=6, branch_factor=4, branch_policy="logprob",
         logprob_statistic="path_sum", fallback_candidates="any"),
    dict(segment_len=7, max_depth=3, max_width=5, branch_factor=2, max_response_len=17),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_tree_invariants(hf, ci, seed):
    cfg = TreeConfig(**CONFIGS[ci], rep_count=0, seed=seed)
    eng = engine(hf, eos=range(1, 12 + 10 * seed))
    trees = TreeSampler(eng, cfg).sample(PROMPTS, SamplingParams(seed=seed))
    for t in trees:
        assert len(t.leaves) == cfg.max_width and t.stats.limit is None
        check_tree(t, cfg)
        if cfg.init_divergence == "random":
            b0 = len(t.nodes[0].children) - sum(1 for n in t.nodes if n.parent == 0 and n.from_fallback)
            assert cfg.init_min <= b0 <= min(cfg.init_max, cfg.max_width)
    assert eng.kv.num_used == 0


def test_fallback_logprobs_match_a_plain_forward(hf):
    """Every leaf (fallback ones included) re-scored by transformers on prompt + response gives
    the sampler's log-probs: the continuation was computed on exactly that context."""
    cfg = TreeConfig(segment_len=2, max_depth=5, max_width=8, branch_factor=2, rep_count=0)
    eng = engine(hf, eos=range(1, 60))  # EOS ~37% per token: early stops and fallbacks
    trees = TreeSampler(eng, cfg).sample(PROMPTS, SamplingParams(seed=1))
    n_fallback = sum(leaf.from_fallback for t in trees for leaf in t.leaves)
    # a fallback cut after k >= 1 segments: the leaf's first node predates the fallback
    deep = [leaf for t in trees for leaf in t.leaves if leaf.from_fallback and not t.nodes[leaf.path[0]].from_fallback]
    assert n_fallback > 0 and deep
    for t in trees:
        for leaf in t.leaves:
            ids = t.prompt_token_ids + leaf.token_ids
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
            P = len(t.prompt_token_ids)
            ref = lp[P - 1:-1].gather(-1, torch.tensor(leaf.token_ids)[:, None])[:, 0]
            assert_close(torch.tensor(leaf.logprobs), ref, atol=2e-4, what=f"leaf {leaf.path}")


def test_fallback_cut_is_segment_aligned_and_continues_from_fork_node(hf):
    cfg = TreeConfig(segment_len=2, max_depth=6, max_width=12, branch_factor=2, rep_count=0)
    cuts = 0
    for seed in range(4):
        eng = engine(hf, eos=range(1, 60))
        trees = TreeSampler(eng, cfg).sample(PROMPTS, SamplingParams(seed=seed))
        for t in trees:
            check_tree(t, cfg)  # includes: inner segments full, so cuts are at multiples of l
            for n in t.nodes[1:]:
                parent = t.nodes[n.parent]
                if n.from_fallback and not parent.from_fallback and n.parent != 0:
                    cuts += 1
                    # the fork node is an inner node of an answered path (never the leaf's last node)
                    assert parent.finish_reason is None and len(parent.token_ids) == cfg.segment_len
        assert eng.kv.num_used == 0
    assert cuts > 0


def test_budget_transfer_formula(hf):
    """Children per level follow total = max(a, min(W - F, b * (a + f)))."""
    cfg = TreeConfig(segment_len=4, max_depth=6, max_width=16, branch_factor=2, rep_count=0, fallback=False)
    eng = engine(hf, eos=range(1, 25))
    (t,) = TreeSampler(eng, cfg).sample([PROMPTS[0]], SamplingParams(seed=3))
    by_depth = {}
    for n in t.nodes[1:]:
        by_depth.setdefault(n.depth, []).append(n)
    F = 0
    for d in sorted(by_depth)[:-1]:
        level = by_depth[d]
        f = sum(n.finish_reason is not None for n in level)
        a = len(level) - f
        F += f
        nxt = len(by_depth.get(d + 1, []))
        assert nxt == (max(a, min(cfg.max_width - F, cfg.branch_factor * (a + f))) if a else 0), (d, a, f, F)


def test_children_budget_formula():
    """total = max(a, min(W - F, b * (a + f))): early stops give their budget to survivors, W caps it."""
    assert children_budget(16, 0, 2, 0, 2) == 4  # nothing finished: b each
    assert children_budget(16, 3, 2, 3, 2) == 10  # three stopped early: their 6 children go to the two
    assert children_budget(16, 12, 3, 1, 2) == 4  # capped by the W - F = 4 leaves still to come
    assert children_budget(16, 15, 3, 0, 2) == 3  # every survivor keeps one child, even past W - F
    assert children_budget(4, 6, 1, 2, 2) == 1  # remaining is never negative
    r = random.Random(0)
    for _ in range(500):
        W, b = r.randint(1, 20), r.randint(1, 5)
        F, a, f = r.randint(0, W), r.randint(1, 8), r.randint(0, 4)
        total = children_budget(W, F, a, f, b)
        assert total == max(a, min(max(W - F, 0), b * (a + f))) and total >= a
    assert fallback_children(16, 13, 2) == 2 and fallback_children(16, 15, 2) == 1


def test_uniform_allocation_spreads_the_remainder():
    r = random.Random(0)
    for _ in range(200):
        a = r.randint(1, 6)
        total = r.randint(a, 20)
        counts = uniform_allocation(total, a, random.Random(r.random()))
        assert sum(counts) == total and max(counts) - min(counts) <= 1 and min(counts) >= 1
    for seed in range(50):
        counts = uniform_allocation(11, 6, random.Random(seed))
        assert sorted(counts) == [1, 2, 2, 2, 2, 2]  # remainder spread, not dumped on one path
    assert {tuple(uniform_allocation(11, 6, random.Random(s))) for s in range(50)} != {(2, 2, 2, 2, 2, 1)}
    assert uniform_allocation(8, 4, random.Random(3)) == [2] * 4


def test_logprob_allocation():
    r = random.Random(0)
    for _ in range(200):
        a = r.randint(1, 6)
        total = r.randint(a, 20)
        stats = [r.uniform(-5, 0) for _ in range(a)]
        for prefer in ("low", "high"):
            counts = logprob_allocation(stats, total, 0.5, prefer)
            assert all(c >= 1 for c in counts) and sum(counts) == total
    # prefer="low": the least likely segment gets the most children
    assert logprob_allocation([-0.1, -3.0], 8, 0.5, "low") == [1, 7]
    assert logprob_allocation([-0.1, -3.0], 8, 0.5, "high") == [7, 1]
    # equal scores: an even split, the leftover by largest remainder with ties to the earlier path
    assert logprob_allocation([-1.0] * 3, 7, 2.0, "low") == [3, 2, 2]
    # a high temperature flattens the weights
    assert logprob_allocation([-0.1, -3.0], 8, 100.0, "low") == [4, 4]
    with pytest.raises(ValueError, match="prefer='middle'"):
        logprob_allocation([0.0], 1, 1.0, "middle")


def test_path_statistic():
    lps = [-1.0, -2.0, -3.0, -6.0]  # the last two tokens are the new segment
    assert path_statistic(lps, 2, "segment_mean") == -4.5
    assert path_statistic(lps, 2, "path_mean") == -3.0
    assert path_statistic(lps, 2, "path_sum") == -12.0
    assert path_statistic([], 0, "segment_mean") == 0.0
    with pytest.raises(ValueError, match="logprob_statistic='median'"):
        path_statistic(lps, 2, "median")


def test_page_bound_arithmetic():
    # prompt 5 + response 16 + 1 pending token = 22 tokens: 6 pages of 4, +1 for a fork's tail copy
    assert page_bound(5, 16, 8, 4) == (8 + 1) * 7
    assert page_bound(3, 16, 8, 4) == 9 * 6  # 20 tokens: 5 pages (+1)
    assert page_bound(3, 16, 1, 64) == 2 * 2


def test_finish_reasons_are_one_list():
    assert set(FALLBACK_CANDIDATES["any"]) == set(FINISH_REASONS)
    assert set(FALLBACK_CANDIDATES["answered"]) == {"answer", "eos"} <= set(FINISH_REASONS)
    assert TreeConfig(fallback_candidates="any").fallback_candidates == "any"
    with pytest.raises(ValueError, match="fallback_candidates='all'; valid: answered, any"):
        TreeConfig(fallback_candidates="all")


def test_temperature_schedule():
    cfg = TreeConfig(branch_temperature=2.0, branch_temperature_end=1.0, branch_temperature_schedule="linear",
                     schedule_steps=10)
    assert [cfg.branch_temperature_at(s) for s in (0, 5, 10, 20)] == [2.0, 1.5, 1.0, 1.0]
    cfg.branch_temperature_schedule = "cosine"
    assert cfg.branch_temperature_at(5) == pytest.approx(1.5)


def test_boxed_and_repetition_rules():
    assert boxed_spans(r"so \boxed{\frac{1}{2}} and") == [(3, 22)]
    assert boxed_spans(r"\boxed{1} then \fbox{\dfrac{3}{4}}") == [(0, 9), (15, 34)]
    assert boxed_spans(r"\boxed{1} \boxed{12") == [(0, 9)]  # unclosed: not complete
    assert boxed_spans(r"a \boxed{{x}+{y}} b") == [(2, 17)]
    assert has_repetition("ab" * 10, window=4, count=9)  # "abab" at 0, 2, .., 16: overlaps count
    assert not has_repetition("ab" * 10, window=4, count=10)
    assert has_repetition([1, 2, 1, 2, 1, 2], window=2, count=3)
    assert not has_repetition("abcdefgh", window=2, count=2)
    assert not has_repetition("aaaa", window=2, count=0)


def _decode_boxed(ids):
    # token ids as text: multiples of 7 are a complete boxed answer, the rest one letter each
    return "".join("\\boxed{7}" if t % 7 == 0 else chr(97 + t % 26) for t in ids)


@pytest.mark.parametrize("policy", ["boxed", "boxed_and_eos", "eos"])
def test_stop_policies(hf, policy):
    cfg = TreeConfig(segment_len=4, max_depth=4, max_width=8, branch_factor=2, stop_policy=policy, rep_count=0)
    eng = engine(hf, eos=range(1, 20))
    trees = TreeSampler(eng, cfg, decode_fn=_decode_boxed).sample(PROMPTS, SamplingParams(seed=0))
    stop = eng.eos_token_ids
    reasons = set()
    for t in trees:
        check_tree(t, cfg)
        for leaf in t.leaves:
            last = t.nodes[leaf.path[-1]].token_ids
            boxed = any(x % 7 == 0 for x in last)
            eos_at = [i for i, x in enumerate(leaf.token_ids) if x in stop]
            reasons.add(leaf.finish_reason)
            if eos_at:  # EOS ends the path: nothing after it, and it is the only one
                assert eos_at == [len(leaf.token_ids) - 1]
            if leaf.finish_reason == "answer":
                assert policy != "eos" and boxed and (policy == "boxed" or eos_at)
            elif leaf.finish_reason == "eos":
                assert eos_at and not (policy != "eos" and boxed)
            else:
                assert not eos_at and not (policy == "boxed" and boxed)
    assert ("answer" in reasons) == (policy != "eos")


def test_eos_as_first_token_of_a_segment(hf):
    cfg = TreeConfig(segment_len=5, max_depth=6, max_width=16, branch_factor=2, rep_count=0)
    eng = engine(hf, eos=range(1, 30))
    trees = TreeSampler(eng, cfg).sample(PROMPTS * 2, SamplingParams(seed=4))
    first = [leaf for t in trees for leaf in t.leaves
             if leaf.finish_reason == "eos" and len(t.nodes[leaf.path[-1]].token_ids) == 1 and leaf.depth > 1]
    assert first, "no path stopped on EOS as the first token of a segment"


@pytest.mark.parametrize("priority,expect", [("first", "repetition"), ("last", "max_depth")])
def test_repetition_priority(hf, priority, expect):
    # every token decodes to "a": any segment of >= window + count - 1 characters repeats
    cfg = TreeConfig(segment_len=6, max_depth=1, max_width=4, branch_factor=4, rep_window=2, rep_count=4,
                     repetition_priority=priority, max_response_len=100, fallback=False)
    eng = engine(hf, eos=[])
    (t,) = TreeSampler(eng, cfg, decode_fn=lambda ids: "a" * len(ids)).sample([PROMPTS[0]], SamplingParams(seed=0))
    assert {leaf.finish_reason for leaf in t.leaves} == {expect}
    cfg.max_depth = 3
    (t,) = TreeSampler(eng, cfg, decode_fn=lambda ids: "a" * len(ids)).sample([PROMPTS[0]], SamplingParams(seed=0))
    assert {leaf.finish_reason for leaf in t.leaves} == {"repetition"}  # checked before going on


def test_tree_saves_compute_and_frees_everything(hf):
    eng = engine(hf, eos=[])
    W, seg, d = 16, 4, 4
    tree_cfg = TreeConfig(segment_len=seg, max_depth=d, max_width=W, branch_factor=2, rep_count=0)
    seq_cfg = TreeConfig.sequential(W, seg * d, rep_count=0)
    trees = TreeSampler(eng, tree_cfg).sample(PROMPTS, SamplingParams(seed=0))
    assert eng.kv.num_used == 0
    seqs = TreeSampler(eng, seq_cfg).sample(PROMPTS, SamplingParams(seed=0))
    assert eng.kv.num_used == 0
    for t, s in zip(trees, seqs):
        assert len(t.leaves) == len(s.leaves) == W
        assert t.stats.prefill_tokens == s.stats.prefill_tokens == len(t.prompt_token_ids)  # once
        assert t.stats.processed_tokens < s.stats.processed_tokens
        # shared segments are decoded once: decode tokens == tree's unique tokens (minus pending last ones)
        unique = sum(len(n.token_ids) for n in t.nodes)
        assert t.stats.decode_tokens == unique - W
    assert trees[0].stats.peak_kv_pages < seqs[0].stats.peak_kv_pages


def test_page_bound_holds_for_one_tree_and_admits_waves(hf):
    """The admission bound (live paths + kept leaves <= W, one chain of pages each, no sharing
    assumed) is never exceeded by a tree, over configs that branch, fall back and stop early; a
    pool of exactly two bounds runs three prompts in two waves."""
    worst = 0.0
    for ci, conf in enumerate(CONFIGS):
        for seed in range(4):
            cfg = TreeConfig(**conf, rep_count=0, seed=seed)
            eng = engine(hf, eos=range(1, 12 + 15 * seed), page_size=2)
            sampler = TreeSampler(eng, cfg)
            for p in PROMPTS:
                tree = sampler.sample([p], SamplingParams(seed=seed))[0]
                bound = page_bound(len(p), cfg.max_response_len, cfg.max_width, eng.kv_usage().page_size)
                assert tree.stats.peak_kv_pages <= bound, (ci, seed, len(p))
                worst = max(worst, tree.stats.peak_kv_pages / bound)
    assert worst > 0.3  # the cases come near the bound: the check has teeth
    cfg = TreeConfig(**CONFIGS[0], rep_count=0)
    need = max(page_bound(len(p), cfg.max_response_len, cfg.max_width, 4) for p in PROMPTS)
    eng = engine(hf, num_pages=2 * need)
    trees = TreeSampler(eng, cfg).sample(PROMPTS, SamplingParams(seed=0))
    assert [len(t.leaves) for t in trees] == [cfg.max_width] * 3 and eng.kv.num_used == 0
    together = TreeSampler(engine(hf), cfg).sample(PROMPTS, SamplingParams(seed=0))
    for a, b in zip(trees, together):  # waves change nothing
        assert [(x.token_ids, x.finish_reason, x.path) for x in a.leaves] == \
               [(x.token_ids, x.finish_reason, x.path) for x in b.leaves]
    with pytest.raises(KVCacheExhausted):  # one prompt's bound does not fit: refused before any work
        TreeSampler(engine(hf, num_pages=need - 1), cfg).sample(PROMPTS, SamplingParams(seed=0))


def test_same_seed_same_trees(hf):
    cfg = TreeConfig(segment_len=4, max_depth=5, max_width=8, branch_factor=2, rep_count=0,
                     init_divergence="random", branch_policy="logprob")
    eng = engine(hf, eos=range(1, 30))

    def run():
        return [[(leaf.token_ids, leaf.path, leaf.finish_reason) for leaf in t.leaves]
                for t in TreeSampler(eng, cfg).sample(PROMPTS, SamplingParams(seed=5))]

    a, b = run(), run()
    assert a == b
    cfg.seed = 6
    assert run() != a


def test_trees_to_batch(hf):
    cfg = TreeConfig(segment_len=4, max_depth=3, max_width=4, branch_factor=2, rep_count=0)
    trees = TreeSampler(engine(hf, eos=range(1, 20)), cfg).sample(PROMPTS[:2], SamplingParams(seed=0))
    b = trees_to_batch(trees, pad_token_id=0)
    N = sum(len(t.leaves) for t in trees)
    assert b["input_ids"].shape[0] == N and b["prompt_index"].tolist() == [0] * 4 + [1] * 4
    r = 0
    for i, t in enumerate(trees):
        for leaf in t.leaves:
            n = len(leaf.token_ids)
            assert b["responses"][r, :n].tolist() == leaf.token_ids and b["response_mask"][r].sum() == n
            assert b["prompts"][r][b["prompt_mask"][r].bool()].tolist() == t.prompt_token_ids
            assert_close(b["old_logprobs"][r, :n], torch.tensor(leaf.logprobs), atol=0)
            for k, node in enumerate(leaf.path):  # same node <-> same subgroup id
                same = [rr for rr in range(N) if b["subgroup_ids"][rr, k] == b["subgroup_ids"][r, k]]
                assert all(b["paths"][rr][k] == node and b["prompt_index"][rr] == i for rr in same)
            r += 1
    pos = b["position_ids"][0][b["attention_mask"][0].bool()]
    assert pos.tolist() == list(range(len(pos)))


def test_bad_input(hf):
    eng = engine(hf, eos=[], max_model_len=64)
    with pytest.raises(ValueError, match="max_response_len"):
        TreeSampler(eng, TreeConfig(segment_len=16, max_depth=4)).sample([[1] * 10], SamplingParams())
    with pytest.raises(ValueError, match="stop_policy"):
        TreeConfig(stop_policy="never")
    with pytest.raises(ValueError, match="max_width"):
        TreeConfig(max_width=0)
    with pytest.raises(ValueError, match="token 1 is 999"):
        TreeSampler(eng, TreeConfig.small()).sample([[1, 999]], SamplingParams())
    assert eng.kv.num_used == 0


def test_outline_and_html_picture(hf, tmp_path):
    from treepo.rollout.viz import outline, trees_html

    cfg = TreeConfig(segment_len=3, max_depth=3, max_width=4, branch_factor=2, rep_count=0)
    trees = TreeSampler(engine(hf, eos=range(1, 30)), cfg).sample(PROMPTS[:2], SamplingParams(seed=0))
    text = outline(trees[0])
    assert len(text.splitlines()) == len(trees[0].nodes)  # header + one line per non-root node
    for leaf in trees[0].leaves:
        assert f"#{leaf.path[-1]} " in text and f"[{leaf.finish_reason}]" in text
    page = trees_html(trees, rewards=[[1.0, -1.0, 1.0, -1.0]] * 2)
    assert page.count('<section class="tree"') == 2
    assert page.count('<div class="node') == sum(len(t.nodes) for t in trees)
    assert "r=-1" in page and page.rstrip().endswith("</html>")  # more of the page: tests/test_viz.py


# ---------------------------------------------------------------------------- interrupts (issue 12, item 8)

def _leaves(trees):
    return [[(x.token_ids, x.path, x.finish_reason, x.from_fallback) for x in t.leaves] for t in trees]


INT_CFG = TreeConfig(segment_len=2, max_depth=3, max_width=4, branch_factor=2, rep_count=0)
INT_TREE_PROMPTS = [PROMPTS[0], PROMPTS[2]]  # page bounds 20 + 40 > 48 pages: two waves


def _interrupt_engine(hf):
    return engine(hf, eos=range(1, 60), num_pages=48)


def test_interrupted_tree_sampling_frees_every_page(hf, monkeypatch):
    """A KeyboardInterrupt in the k-th forward, fork or sampling call of TreeSampler.sample, or at
    spread bytecodes of its bookkeeping (prefill, forks, decode, fallback, leaves freed, waves):
    every page back, and a rerun on the same engine gives a fresh engine's trees."""
    from test_engine import Interrupt, assert_pool_restored, raise_on_call, spread

    fresh = _interrupt_engine(hf)
    trees = TreeSampler(fresh, INT_CFG).sample(INT_TREE_PROMPTS, SamplingParams(seed=2))
    assert sum(t.stats.fallbacks for t in trees) > 0
    expect = _leaves(trees)
    eng = _interrupt_engine(hf)
    sampler = TreeSampler(eng, INT_CFG)
    run = lambda: sampler.sample(INT_TREE_PROMPTS, SamplingParams(seed=2))  # noqa: E731
    for name in ("forward", "fork", "sample_into"):
        with monkeypatch.context() as m:
            calls = raise_on_call(m, eng, name, 0)
            run()
        for k in spread(calls[0], 3):
            free0 = list(eng.kv._free)
            with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt, match=f"{name} call {k}"):
                raise_on_call(m, eng, name, k)
                run()
            assert_pool_restored(eng, free0)
    with Interrupt(0) as it:
        run()
    for k in spread(it.count - 1, 16):
        free0 = list(eng.kv._free)
        with pytest.raises(KeyboardInterrupt), Interrupt(k) as it:
            run()
        done = list(eng.kv._free) != free0  # interrupted after all its work: pages freed in a new order
        assert_pool_restored(eng, None if done else free0, it.where)
    assert _leaves(run()) == expect
    assert eng.kv.num_used == 0


# ---------------------------------------------------------------------------- TreeConfig validation (item 10)

@pytest.mark.parametrize("bad,match", [
    (dict(segment_len=4.0), r"segment_len=4.0 \(float\); it must be an int >= 1"),
    (dict(max_width="4"), r"max_width='4' \(str\); it must be an int >= 1"),
    (dict(seed=None), r"seed=None \(NoneType\); it must be an int"),
    (dict(seed=1.5), r"seed=1.5 \(float\)"),
    (dict(branch_factor=True), r"branch_factor=True \(bool\)"),
    (dict(max_depth=0), r"max_depth=0; it must be >= 1"),
    (dict(max_response_len=8.5), r"max_response_len=8.5 \(float\)"),
    (dict(max_response_len=0), r"max_response_len=0; it must be >= 1"),
    (dict(rep_count=-1), r"rep_count=-1; it must be >= 0"),
    (dict(rep_window="32"), r"rep_window='32'"),
    (dict(init_min=3, init_max=2), r"init_min=3 > init_max=2"),
    (dict(init_min=0), r"init_min=0; it must be >= 1"),
    (dict(branch_temperature=0), r"branch_temperature=0; it must be a finite number > 0"),
    (dict(branch_temperature="2"), r"branch_temperature='2'"),
    (dict(branch_temperature_end=float("nan")), r"branch_temperature_end=nan; .* or None"),
    (dict(schedule_steps=2.0), r"schedule_steps=2.0 \(float\)"),
    (dict(fallback="yes"), r"fallback='yes'; it must be True or False"),
    (dict(stop_policy=["eos"]), r"stop_policy=\['eos'\]; valid: boxed_and_eos, boxed, eos"),
])
def test_tree_config_validates_types_and_ranges(bad, match):
    with pytest.raises(ValueError, match=match):
        TreeConfig(**bad)


def test_branch_factor_above_max_width_caps(hf):
    """b >= W is "as wide as the budget allows": exactly the trees of b = W (documented on
    TreeConfig); the sequential preset is the b = W case."""
    eng = engine(hf, eos=range(1, 40))
    kw = dict(segment_len=3, max_depth=3, max_width=3, rep_count=0, seed=2)
    wide = TreeSampler(eng, TreeConfig(**kw, branch_factor=7)).sample(PROMPTS, SamplingParams(seed=2))
    capped = TreeSampler(eng, TreeConfig(**kw, branch_factor=3)).sample(PROMPTS, SamplingParams(seed=2))
    assert _leaves(wide) == _leaves(capped)
    assert all(len(t.leaves) == 3 and len(t.nodes[0].children) <= 3 for t in wide)
    assert TreeConfig.sequential(5, 16).branch_factor == 5

"""Batch invariance (docs/kernels.md, "Batch invariance"): with fixed key chunks, a query's attention
is the same bits whatever else is in the batch, however its pages are shared, and whether its token
is decoded or (re)computed by an extend; packed GEMM rows do not depend on the row count; and an
engine with batch_invariant=True gives bit-identical bf16 completions (tokens and log-probs) in a
roomy or a pressured pool, alone or batched, for generate and for TreePO trees."""
import random

import pytest
import torch
from helpers import assert_close, tiny_hf_model
from kernel_cases import TOL, tree_case
from test_tree_plan import SHAPES

from treepo import Engine, SamplingParams, TreeConfig, TreeSampler
from treepo_kernels import cpu as kernels
from treepo_kernels.tree_decode import tree_decode_ref
from treepo_kernels.tree_plan import plan_chunked

ok, why = kernels.status()
pytestmark = pytest.mark.skipif(not ok, reason=why)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (Hq, Hkv, D, page_size, prompt_len, depth, branch, seg_len): the shared grid plus the generic head
# dim path (80), g = 1 (one-row tasks), page size 1, and 40 leaves under one node (two leaf tiles)
INV_SHAPES = SHAPES + [(6, 2, 80, 4, 9, 2, 3, 5), (3, 3, 32, 16, 16, 2, 4, 16), (8, 2, 64, 1, 3, 2, 2, 2),
                       (24, 3, 128, 16, 70, 1, 40, 3), (9, 3, 64, 4, 150, 2, 3, 40)]


def decode(q, k, v, tables, lens, P, chunk_pages):
    return kernels.tree_decode(q, k, v, plan_chunked(tables, lens, P, chunk_pages), fixed=True)


def private_copy(k, v, table, L, P, free):
    """The same KV in pages of its own (as a preempted, recomputed sequence has): a new table."""
    new = [free.pop() for _ in range((L + P - 1) // P)]
    for a, b in zip(table, new):
        k[b], v[b] = k[a], v[a]
    return new


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(INV_SHAPES)))
def test_chunked_plan_matches_reference(case, dtype):
    shape = INV_SHAPES[case]
    q, k, v, tables, lens, P = tree_case(shape, case, dtype)
    for chunk_pages in (1, 2, max(1, 64 // P)):
        plan = plan_chunked(tables, lens, P, chunk_pages)
        assert plan.unique_tokens <= plan.path_tokens
        out, lse = kernels.tree_decode(q, k, v, plan, fixed=True)
        ref, ref_lse = tree_decode_ref(q.float(), k.float(), v.float(), plan)
        assert_close(out, ref, **TOL[dtype], what=f"chunked decode out {shape} chunk_pages={chunk_pages}")
        assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6, what="chunked decode lse")


def test_chunked_plan_shares_chunks():
    """Leaves holding the same pages for a chunk share its unit: a shared prompt is read once."""
    P = 4
    prompt = list(range(16))  # 64 tokens = 2 chunks of 8 pages
    tables = [prompt + [100 + i] for i in range(5)]
    plan = plan_chunked(tables, [66] * 5, P, chunk_pages=8)
    assert plan.num_units == 2 + 5 and plan.unique_tokens == 64 + 5 * 2
    assert int(plan.unit_leaf_ptr[1] - plan.unit_leaf_ptr[0]) == 5
    with pytest.raises(ValueError, match="only full pages may be shared"):
        plan_chunked([[0, 1], [0, 1]], [7, 8], P, chunk_pages=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(INV_SHAPES)))
def test_chunked_decode_rows_do_not_depend_on_the_batch(case, dtype):
    """A leaf's output and LSE are bit-identical alone, in any subset or order of the batch, and with
    its pages copied out of the shared tree (no sharing left)."""
    q, k, v, tables, lens, P = tree_case(INV_SHAPES[case], case, dtype)
    cp = max(1, 64 // P)
    out, lse = decode(q, k, v, tables, lens, P, cp)
    used = {p for t in tables for p in t}
    free = [p for p in range(k.shape[0]) if p not in used]
    rng = random.Random(case)
    B = len(lens)
    for b in rng.sample(range(B), min(B, 4)):
        a_out, a_lse = decode(q[b:b + 1], k, v, [tables[b]], [lens[b]], P, cp)
        assert torch.equal(a_out[0], out[b]) and torch.equal(a_lse[0], lse[b]), f"leaf {b} alone"
        own = private_copy(k, v, tables[b], lens[b], P, free)
        c_out, c_lse = decode(q[b:b + 1], k, v, [own], [lens[b]], P, cp)
        assert torch.equal(c_out[0], out[b]) and torch.equal(c_lse[0], lse[b]), f"leaf {b} in private pages"
    sub = rng.sample(range(B), max(1, B // 2))
    s_out, s_lse = decode(q[sub], k, v, [tables[b] for b in sub], [lens[b] for b in sub], P, cp)
    assert torch.equal(s_out, out[sub]) and torch.equal(s_lse, lse[sub]), "a shuffled subset of the batch"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64, 16), (8, 2, 128, 4), (6, 2, 80, 4), (3, 3, 32, 1), (8, 1, 32, 8)])
def test_chunked_extend_equals_decode(heads, dtype):
    """A token's attention from a chunked extend - whatever the extend's length, tiling and batch -
    equals the chunked decode of that token bit for bit: a recomputed sequence reproduces its KV."""
    Hq, Hkv, D, P = heads
    C = max(1, 64 // P) * P
    g = torch.Generator().manual_seed(Hq * D + P)
    n_pages = 400
    k = torch.randn(n_pages, Hkv, P, D, generator=g).to(dtype)
    v = torch.randn(n_pages, Hkv, P, D, generator=g).to(dtype)
    perm = torch.randperm(n_pages, generator=g).tolist()
    L, L2 = 150, 37  # sequence 0 (the one checked) and another sequence batched with it
    t0, t1 = perm[:(L + P - 1) // P], perm[200:200 + (L2 + P - 1) // P]
    q = torch.randn(L, Hq, D, generator=g).to(dtype)  # the query of every position of sequence 0
    q2 = torch.randn(L2, Hq, D, generator=g).to(dtype)

    def extend(seqs):  # seqs: (table, kv_len, queries of its last positions)
        width = max(len(t) for t, _, _ in seqs)
        bt = torch.tensor([t + [t[0]] * (width - len(t)) for t, _, _ in seqs], dtype=torch.int32)
        cu = torch.tensor([0] + [len(x) for _, _, x in seqs]).cumsum(0)
        lens = torch.tensor([n for _, n, _ in seqs])
        return kernels.paged_extend(torch.cat([x for _, _, x in seqs]), k, v, bt, cu, lens, chunk=C)

    full, full_lse = extend([(t0, L, q)])
    for n in (1, 5, 17, 64):  # the last n positions recomputed, batched with another sequence's prefill
        out, lse = extend([(t1, L2, q2), (t0, L, q[L - n:])])
        assert torch.equal(out[L2:], full[L - n:]) and torch.equal(lse[L2:], full_lse[L - n:]), f"n={n}"
    for t in (0, 3, C - 1, C, C + 1, 2 * C + 5, L - 1):  # decode of position t: kv_len t + 1
        d_out, d_lse = decode(q[t:t + 1], k, v, [t0], [t + 1], P, C // P)
        assert torch.equal(d_out[0], full[t]) and torch.equal(d_lse[0], full_lse[t]), f"position {t}"
    with pytest.raises(RuntimeError, match="multiple of the page size"):
        kernels.paged_extend(q, k, v, torch.tensor([t0], dtype=torch.int32), torch.tensor([0, L]),
                             torch.tensor([L]), chunk=P + 1 if P > 1 else -1)


@pytest.mark.parametrize("impl", [0, 1])
@pytest.mark.parametrize("gated", [False, True])
def test_packed_gemm_rows_do_not_depend_on_the_row_count(impl, gated):
    g = torch.Generator().manual_seed(impl + 2 * gated)
    for N, K in ((96, 48), (2 * 232, 144), (520, 64)):
        w = (torch.randn(N, K, generator=g) * 0.1).to(torch.bfloat16)
        x = torch.randn(70, K, generator=g).to(torch.bfloat16)
        n_out = N // 2 if gated else N
        pk = kernels.pack_linear(w, gated=gated)
        full = kernels.linear_packed(x, pk, n_out, gated=gated, _impl=impl)
        for m in (1, 2, 5, 7, 13, 24, 25, 37):
            part = kernels.linear_packed(x[m - 1:2 * m - 1], pk, n_out, gated=gated, _impl=impl)
            assert torch.equal(part, full[m - 1:2 * m - 1]), f"rows {m - 1}:{2 * m - 1} of [{N}, {K}]"


# ------------------------------------------------------------------ engine
PROMPTS = [[(7 * i) % 150 + 3 for i in range(70)], [5, 9, 33, 7, 100], [42, 3, 17]]  # 70: chunk ends inside


_MODELS = {}
CASES = [("llama3_rope_gqa3", 64), ("llama3_rope_gqa3", 16), ("qwen3_norms_gqa4", 16), ("llama_bias", 16)]


@pytest.fixture(params=CASES, ids=[f"{f}-chunk{c}" for f, c in CASES])
def hf(request, monkeypatch):
    """A tiny bf16 model (RoPE scaling + GQA; Qwen3's q/k norms; biases everywhere, the MLP's too)
    and the engine's key chunk (64 tokens; 16 puts many chunk ends inside a short test)."""
    from treepo.engine.attention import cpu_backend

    family, chunk = request.param
    monkeypatch.setattr(cpu_backend, "INVARIANT_CHUNK_TOKENS", chunk)
    if family not in _MODELS:
        _MODELS[family] = tiny_hf_model(family, vocab=160, hidden=96, layers=2, dtype=torch.bfloat16)
    return _MODELS[family]


def engine(hf, num_pages=512, **kw):
    return Engine.from_model(hf, num_pages=num_pages, page_size=4, batch_invariant=True, **kw)


def results(outs):
    return [(c.token_ids, c.logprobs) for o in outs for c in o]


def test_generate_is_batch_and_preemption_invariant(hf):
    p = SamplingParams(n=4, temperature=1.0, max_tokens=30, seed=5, ignore_eos=True)
    roomy = results(engine(hf).generate(PROMPTS, p))
    small = engine(hf, num_pages=40)
    pressured = results(small.generate(PROMPTS, p))
    assert small.stats.preemptions > 0
    assert pressured == roomy, "pressured pool (preemption + recompute) vs roomy"
    alone = results(engine(hf).generate([PROMPTS[0]], p))
    assert alone == roomy[:4], "prompt alone vs batched"
    few = results(engine(hf, max_num_seqs=5).generate(PROMPTS, p))
    assert few == roomy, "max_num_seqs=5 (other step compositions)"


def test_tree_is_batch_invariant(hf):
    cfg = TreeConfig(segment_len=6, max_depth=5, max_width=8, branch_factor=2, rep_count=0, seed=1)

    def leaves(prompts):
        eng = engine(hf, num_pages=2048)
        eng.eos_token_ids = set(range(1, 12))
        trees = TreeSampler(eng, cfg).sample(prompts, SamplingParams(seed=1))
        return [(leaf.token_ids, leaf.logprobs) for t in trees for leaf in t.leaves]

    batched = leaves(PROMPTS)
    assert leaves([PROMPTS[0]]) == batched[:8]


def test_batch_invariant_needs_what_it_says():
    hf32 = tiny_hf_model("llama3_rope_gqa3", vocab=160, hidden=48, layers=1)
    with pytest.raises(ValueError, match="needs a bf16 model"):
        Engine.from_model(hf32, num_pages=64, batch_invariant=True)
    hf16 = tiny_hf_model("llama3_rope_gqa3", vocab=160, hidden=48, layers=1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="attention_backend 'cpu' or 'auto'"):
        Engine.from_model(hf16, num_pages=64, batch_invariant=True, attention_backend="torch")
    with pytest.raises(ValueError, match="packed_weights=False"):
        Engine.from_model(hf16, num_pages=64, batch_invariant=True, packed_weights=False)
    with pytest.raises(ValueError, match="batch_invariant=1"):
        Engine.from_model(hf16, num_pages=64, batch_invariant=1)


@pytest.mark.parametrize("family", ["llama_gqa4_untied", "llama_bias", "qwen2_bias_gqa3", "qwen3_norms_gqa4",
                                    "mistral_gqa4"])
def test_invariant_engine_matches_the_model(family):
    """The invariant mode's forward (packed GEMMs of either build, the rope table, the fused q/k
    norms, chunked attention) computes the model: its logits are the plain engine's."""
    hf = tiny_hf_model(family, dtype=torch.bfloat16)
    prompts = [[5, 9, 33, 7, 100], list(range(10, 31)), [42]]
    plain = Engine.from_model(hf, num_pages=64, page_size=4, packed_weights=False, attention_backend="torch")
    inv = Engine.from_model(hf, num_pages=64, page_size=4, batch_invariant=True)
    steps = []
    for eng in (plain, inv):
        seqs = [eng.new_sequence(p) for p in prompts]
        first = eng.forward(seqs)
        for s in seqs:
            s.token_ids.append(3)
        steps.append((first, eng.forward(seqs)))  # prefill rows, then decode rows over the cache
    for a, b in zip(*steps):
        assert_close(b, a, atol=0.05 * a.abs().max().item(), what=f"{family} logits")
        assert (b.argmax(-1) == a.argmax(-1)).float().mean() >= 2 / 3

"""Engine behaviour: seeding, prefill-once forks, preemption, stops, bad input."""
import pytest
import torch
from helpers import assert_close, tiny_hf_model

from treepo import Engine, EngineConfig, KVCacheExhausted, SamplingParams
from treepo.engine.sampling import process_logits, sample


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama3_rope_gqa3", vocab=160, layers=2)


def make(hf, **kw):
    kw.setdefault("num_pages", 256)
    kw.setdefault("page_size", 4)
    return Engine.from_model(hf, **kw)


PROMPTS = [[5, 9, 33, 7, 100], list(range(10, 31)), [42]]


def ids(outs):
    return [[c.token_ids for c in o] for o in outs]


def test_same_seed_same_output(hf):
    eng = make(hf)
    p = SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=7)
    a, b = eng.generate(PROMPTS, p), eng.generate(PROMPTS, p)
    assert ids(a) == ids(b)
    c = eng.generate(PROMPTS, SamplingParams(n=3, max_tokens=16, seed=8))
    assert ids(a) != ids(c)
    assert len(set(map(tuple, ids(a)[0]))) > 1  # n samples really differ


def test_n_samples_prefill_prompt_once(hf):
    eng = make(hf)
    n, max_tokens = 6, 10
    outs = eng.generate(PROMPTS, SamplingParams(n=n, max_tokens=max_tokens, seed=0, ignore_eos=True))
    st = eng.stats
    assert st.prefill_tokens == sum(len(p) for p in PROMPTS)  # not n times
    # every sample decodes max_tokens - 1 tokens after the shared prefill produced its first
    assert st.decode_tokens == len(PROMPTS) * n * (max_tokens - 1)
    assert st.forward_passes == max_tokens
    assert all(len(o) == n and all(len(c.token_ids) == max_tokens for c in o) for o in outs)
    assert eng.kv.num_used == 0


def test_sampled_logprobs_are_the_sampling_distribution(hf):
    eng = make(hf)
    p = SamplingParams(n=2, temperature=0.7, top_k=20, top_p=0.8, max_tokens=8, seed=3,
                       return_model_logprobs=True)
    outs = eng.generate([PROMPTS[0]], p)
    for c in outs[0]:
        full = torch.tensor([PROMPTS[0] + c.token_ids])
        with torch.no_grad():
            logits = hf(full).logits[0, len(PROMPTS[0]) - 1:-1].float()
        tok = torch.tensor(c.token_ids)[:, None]
        assert_close(torch.tensor(c.logprobs), process_logits(logits, p).gather(-1, tok)[:, 0], atol=1e-4)
        assert_close(torch.tensor(c.model_logprobs), torch.log_softmax(logits, -1).gather(-1, tok)[:, 0], atol=1e-4)
        assert all(lp > float("-inf") for lp in c.logprobs)


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    lp = process_logits(logits, SamplingParams(top_p=0.75))
    assert torch.isfinite(lp).tolist() == [[True, True, False, False]]
    lp = process_logits(logits, SamplingParams(top_k=3))
    assert torch.isfinite(lp).tolist() == [[True, True, True, False]]
    assert_close(lp.exp().sum(), torch.tensor(1.0), atol=1e-6)
    # sampling frequencies follow the truncated distribution
    toks, _, _ = sample(logits.expand(20000, -1), SamplingParams(top_k=3), list(range(20000)))
    freq = torch.bincount(toks, minlength=4).float() / 20000
    assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015)


def test_stop_ids_and_eos(hf):
    eng = make(hf)
    greedy = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0][0]
    stop_tok = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_tok)
    out = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]))[0][0]
    assert out.finish_reason == "stop" and out.token_ids == greedy.token_ids[:first + 1]
    eng.eos_token_ids = {stop_tok}
    out = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12))[0][0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_tok
    out = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12


def test_preemption_loses_nothing(hf):
    """A pool too small for all samples at once preempts and recomputes: same greedy result."""
    p = SamplingParams(n=4, temperature=0, max_tokens=30, ignore_eos=True)
    big = make(hf).generate(PROMPTS, p)
    small_eng = make(hf, num_pages=24)
    small = small_eng.generate(PROMPTS, p)
    assert small_eng.stats.preemptions > 0
    assert ids(small) == ids(big)
    assert small_eng.kv.num_used == 0
    # sampled too: same seed gives the same tokens whatever the pool size
    ps = SamplingParams(n=4, temperature=1.0, max_tokens=30, seed=5, ignore_eos=True)
    assert ids(make(hf, num_pages=24).generate([PROMPTS[0]], ps)) == ids(make(hf).generate([PROMPTS[0]], ps))


def test_bad_input_errors_leave_engine_usable(hf):
    eng = make(hf, max_model_len=64)
    p = SamplingParams(temperature=0, max_tokens=5)
    before = ids(eng.generate(PROMPTS, p))
    with pytest.raises(ValueError, match="prompt 1 has 64 tokens; max_model_len is 64"):
        eng.generate([[1, 2], [3] * 64], p)
    with pytest.raises(ValueError, match=r"prompt 0 token 2 is 160; token ids must be ints in \[0, 160\)"):
        eng.generate([[1, 2, 160]], p)
    with pytest.raises(ValueError, match="token 0 is -1"):
        eng.generate([[-1]], p)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        eng.generate([[]], p)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert eng.kv.num_used == 0
    assert ids(eng.generate(PROMPTS, p)) == before


def test_max_model_len_finishes_with_length(hf):
    eng = make(hf, max_model_len=24)
    out = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0][0]
    assert out.finish_reason == "length" and len(PROMPTS[1]) + len(out.token_ids) == 24


def test_kv_exhausted_is_clear_and_recoverable(hf):
    eng = make(hf, num_pages=4)  # 16 tokens in all
    with pytest.raises(KVCacheExhausted, match="KV cache exhausted: need"):
        eng.generate([list(range(3, 30))], SamplingParams(max_tokens=4))
    assert eng.kv.num_used == 0
    with pytest.raises(KVCacheExhausted):  # one sequence outgrowing the whole pool
        eng.generate([[3, 4, 5]], SamplingParams(max_tokens=40, ignore_eos=True))
    assert eng.kv.num_used == 0
    out = eng.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0][0].token_ids) == 8


def test_fork_shares_prefix_pages(hf):
    eng = make(hf)
    s = eng.new_sequence(list(range(3, 13)))  # 10 tokens, page size 4: 2 full + 1 partial page
    eng.forward([s])
    kids = eng.fork(s, 3)
    assert all(k.table[:2] == s.table[:2] and k.table[2] != s.table[2] for k in kids)
    assert [eng.kv.refcount[p] for p in s.table] == [4, 4, 1]
    for k in kids + [s]:
        k.token_ids.append(50)
    logits = eng.forward(kids + [s])
    assert_close(logits[0], logits[3], atol=1e-5, what="child vs parent logits")
    for k in kids + [s]:
        eng.free(k)
    assert eng.kv.num_used == 0


def test_engine_config_keywords_config_and_errors(hf):
    """Keywords are EngineConfig fields; config= plus keywords overrides; bad settings name the field."""
    a = make(hf, max_num_seqs=3)
    b = Engine.from_model(hf, config=EngineConfig(num_pages=256, page_size=4, max_num_seqs=8), max_num_seqs=3)
    assert a.engine_config == b.engine_config and b.engine_config.max_num_seqs == 3
    p = SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True)
    assert ids(a.generate(PROMPTS, p)) == ids(b.generate(PROMPTS, p)) == ids(make(hf).generate(PROMPTS, p))
    usage = b.kv_usage()
    assert (usage.page_size, usage.num_pages, usage.num_free) == (4, 256, 256) and usage.peak_used > 0
    b.reset_peak_kv()
    assert b.kv_usage().peak_used == 0
    assert b.counters() == {k: getattr(b.stats, k) for k in ("prefill_tokens", "decode_tokens", "forward_passes")}
    assert b.stop_token_ids(SamplingParams(stop_token_ids=[7])) == {7} | b.eos_token_ids
    assert b.stop_token_ids(SamplingParams(stop_token_ids=[7], ignore_eos=True)) == {7}
    with pytest.raises(TypeError, match="unknown engine setting.* max_seqs; EngineConfig fields are: device, "):
        make(hf, max_seqs=4)
    with pytest.raises(TypeError, match="config must be an EngineConfig"):
        Engine(a.model, None, "cpu")
    for bad, match in [(dict(page_size=0), "page_size=0; it must be an int >= 1"),
                       (dict(num_pages=0), "num_pages=0; it must be None or an int >= 1"),
                       (dict(max_model_len=1), "max_model_len=1"),
                       (dict(kv_cache_memory=-5), "kv_cache_memory=-5"),
                       (dict(kv_cache_memory=1 << 20, num_pages=4), "give one of them"),
                       (dict(packed_weights="yes"), "packed_weights='yes'")]:
        with pytest.raises(ValueError, match=match):
            EngineConfig(**bad)

"""Engine behaviour: seeding, prefill-once forks, preemption, stops, bad input, interrupts,
more samples than max_num_seqs."""
import os
import sys

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


# ---------------------------------------------------------------------------- interrupts (issue 12, item 8)

class Interrupt:
    """Raise KeyboardInterrupt at the k-th bytecode run in the engine's and the sampler's
    bookkeeping (an asynchronous Ctrl-C lands between any two bytecodes, so every k is a real
    interrupt point); k=0 only counts them. `with Interrupt(k) as it: ...`; it.count after."""

    FILES = tuple(os.path.join("treepo", *p.split("/")) for p in (
        "engine/engine.py", "engine/scheduler.py", "engine/kv_cache.py", "engine/sequence.py",
        "engine/runner.py", "engine/sampling.py", "rollout/"))

    def __init__(self, k: int):
        self.k, self.count, self.where = k, 0, None

    def _local(self, frame, event, arg):
        if event == "opcode":
            self.count += 1
            if self.count == self.k:
                self.where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                raise KeyboardInterrupt(self.where)
        return self._local

    def _global(self, frame, event, arg):
        if any(f in frame.f_code.co_filename for f in self.FILES):
            frame.f_trace_opcodes = True
            return self._local
        return None

    def __enter__(self):
        self._old = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._old)


def raise_on_call(monkeypatch, obj, name, k):
    """Make obj.name raise KeyboardInterrupt on its k-th call (1-based); returns the call counter."""
    real, calls = getattr(obj, name), [0]

    def wrapper(*a, **kw):
        calls[0] += 1
        if calls[0] == k:
            raise KeyboardInterrupt(f"{name} call {k}")
        return real(*a, **kw)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def assert_pool_restored(eng, free_list=None, where=None):
    """Every page free once (no page twice in the free list), all refcounts 0; with free_list,
    the free list as before the interrupted call, order included."""
    kv = eng.kv
    assert eng.kv_usage().num_free == kv.num_pages and sum(kv.refcount) == 0, where
    assert sorted(kv._free) == list(range(kv.num_pages)), where
    if free_list is not None:
        assert list(kv._free) == free_list, where


# two prompts, n=3 under max_num_seqs=4 (prompt 1's samples are parked, then forked) in a pool
# small enough to preempt: prefill, forks, parking, decode, preemption and finishing all run
INTERRUPTED = dict(num_pages=12, max_num_seqs=4)
INT_PROMPTS = [[5, 9, 33, 7, 100], list(range(10, 27))]
INT_PARAMS = SamplingParams(n=3, max_tokens=6, seed=1, ignore_eos=True)


def spread(n: int, m: int) -> list[int]:
    """About m points of 1..n, evenly spread, first and last included."""
    return sorted({1 + (n - 1) * i // max(m - 1, 1) for i in range(m)}) if n else []


def test_interrupted_generate_frees_every_page_call_points(hf, monkeypatch):
    """A KeyboardInterrupt in the k-th forward (prefill / decode), fork, page growth or sampling
    call: every page back, the engine usable, and a rerun gives a fresh engine's tokens."""
    fresh = make(hf, **INTERRUPTED)
    expect = ids(fresh.generate(INT_PROMPTS, INT_PARAMS))
    eng = make(hf, **INTERRUPTED)
    import treepo.engine.engine as engine_mod
    for obj, name in [(eng.runner, "forward"), (eng.kv, "fork"), (eng.kv, "grow"), (engine_mod, "sample")]:
        with monkeypatch.context() as m:
            calls = raise_on_call(m, obj, name, 0)
            eng.generate(INT_PROMPTS, INT_PARAMS)
        assert calls[0] >= 3, name
        for k in spread(calls[0], 4):
            free0 = list(eng.kv._free)
            with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt, match=f"{name} call {k}"):
                raise_on_call(m, obj, name, k)
                eng.generate(INT_PROMPTS, INT_PARAMS)
            assert_pool_restored(eng, free0)
        assert ids(eng.generate(INT_PROMPTS, INT_PARAMS)) == expect, name
        assert eng.kv.num_used == 0
    assert fresh.stats.preemptions > 0  # the case really parks and preempts


def test_interrupted_generate_frees_every_page_anywhere(hf):
    """A KeyboardInterrupt at evenly spread bytecodes of generate()'s bookkeeping (mid-allocation,
    mid-fork, mid-free, mid-postprocess...): the same guarantees at every one."""
    eng = make(hf, **INTERRUPTED)
    expect = ids(eng.generate(INT_PROMPTS, INT_PARAMS))  # every page touched: counts repeat
    with Interrupt(0) as it:
        eng.generate(INT_PROMPTS, INT_PARAMS)
    where = set()
    for k in spread(it.count - 1, 20):
        free0 = list(eng.kv._free)
        with pytest.raises(KeyboardInterrupt), Interrupt(k) as it:
            eng.generate(INT_PROMPTS, INT_PARAMS)
        where.add(it.where.split(os.sep)[-1].split(":")[0])
        # as before the call - unless the interrupt came after all its work (pages freed in a new order)
        done = list(eng.kv._free) != free0
        assert_pool_restored(eng, None if done else free0, it.where)
    assert {"kv_cache.py", "scheduler.py", "engine.py"} <= where
    assert ids(eng.generate(INT_PROMPTS, INT_PARAMS)) == expect
    assert eng.kv.num_used == 0


def test_transaction_restores_the_pool_and_empties_its_sequences(hf):
    eng = make(hf)
    keep = eng.new_sequence([3, 4, 5, 6, 7])
    eng.forward([keep])
    before = (list(eng.kv.refcount), list(eng.kv._free))
    with pytest.raises(RuntimeError, match="boom"):
        with eng.transaction():
            s = eng.new_sequence(list(range(3, 14)))
            eng.forward([s])
            kids = eng.fork(s, 3)
            with eng.transaction():  # nested: its sequences are the outer block's on success
                inner = eng.fork(kids[0], 2)
            raise RuntimeError("boom")
    assert (list(eng.kv.refcount), list(eng.kv._free)) == before
    assert all(x.table == [] and x.num_cached == 0 for x in [s, *kids, *inner])
    assert keep.table and keep.num_cached == 5  # made before the block: untouched
    eng.free(keep)
    assert eng.kv.num_used == 0


# ---------------------------------------------------------------------------- n > max_num_seqs (item 9)

@pytest.mark.parametrize("max_num_seqs", [1, 3, 5])
def test_more_samples_than_max_num_seqs_are_scheduled_in_turn(hf, max_num_seqs):
    """n above max_num_seqs: the prompt is prefilled once, parked, and its samples forked as slots
    free up; seeded results are those of an unconstrained run, and no step runs more than
    max_num_seqs sequences."""
    p = SamplingParams(n=7, max_tokens=9, seed=4, temperature=1.0, top_k=40)
    expect = ids(make(hf).generate(PROMPTS, p))
    eng = make(hf, max_num_seqs=max_num_seqs)
    widths = []
    real = eng.sample_into
    eng.sample_into = lambda seqs, *a: (widths.append(len(seqs)), real(seqs, *a))[1]
    assert ids(eng.generate(PROMPTS, p)) == expect
    assert max(widths) == max_num_seqs
    assert eng.stats.prefill_tokens == sum(len(q) for q in PROMPTS)  # each prompt once
    assert eng.kv.num_used == 0


def test_more_samples_than_max_num_seqs_under_page_pressure(hf):
    """Parking, preemption (parked prompts first) and a pool too small for a fork beside its
    parked prompt (samples then start one at a time, the prompt prefilled again): same tokens."""
    p = SamplingParams(n=6, max_tokens=12, seed=2, ignore_eos=True)
    expect = ids(make(hf).generate(PROMPTS, p))
    eng = make(hf, num_pages=16, max_num_seqs=4)
    assert ids(eng.generate(PROMPTS, p)) == expect
    assert eng.stats.preemptions > 0 and eng.kv.num_used == 0
    # 11 prompt tokens = 3 pages; a fork beside the parked prompt would need 3 + 2 > 4 pages
    q, p = [list(range(40, 51))], SamplingParams(n=3, max_tokens=4, seed=9, ignore_eos=True)
    tiny = make(hf, num_pages=4)
    assert ids(tiny.generate(q, p)) == ids(make(hf).generate(q, p))
    assert tiny.stats.prefill_tokens == 3 * 11 and tiny.kv.num_used == 0

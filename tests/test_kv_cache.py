"""Paged KV cache: refcounts, copy-on-fork tails, never writing a shared page, nothing leaked."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treepo.engine.kv_cache import KVCacheExhausted, PagedKVCache
from treepo_kernels import append_kv_ref


def _append(kv, seq, n_new, rng):
    """Append n_new tokens with recognisable values, checking the pages written are private."""
    start = seq["len"]
    kv.grow(seq["table"], start + n_new)
    assert kv.is_writable(seq["table"], start, start + n_new), "append would write a shared page"
    pages, offs = kv.slots(seq["table"], start, start + n_new)
    vals = torch.randn(n_new, kv.num_kv_heads, kv.head_dim, generator=rng)
    for layer in range(kv.num_layers):
        append_kv_ref(kv.k[layer], kv.v[layer], vals + layer, -vals, torch.tensor(pages), torch.tensor(offs))
    seq["vals"] = torch.cat([seq["vals"], vals])
    seq["len"] += n_new


def _content_ok(kv, seq):
    P = kv.page_size
    for t in range(seq["len"]):
        p, o = seq["table"][t // P], t % P
        if not torch.equal(kv.k[1, p, :, o], seq["vals"][t] + 1) or not torch.equal(kv.v[0, p, :, o], -seq["vals"][t]):
            return False
    return True


ops = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free"]), st.integers(0, 10**6),
                         st.integers(1, 9)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, page_size=st.sampled_from([1, 3, 4, 16]))
def test_random_fork_append_free(ops, page_size):
    kv = PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=4, num_pages=40, page_size=page_size)
    rng = torch.Generator().manual_seed(0)
    seqs = []
    for op, pick, n in ops:
        try:
            if op == "new" or not seqs:
                s = {"table": [], "len": 0, "vals": torch.empty(0, 2, 4)}
                _append(kv, s, n, rng)
                seqs.append(s)
            elif op == "append":
                _append(kv, seqs[pick % len(seqs)], n, rng)
            elif op == "fork":
                parent = seqs[pick % len(seqs)]
                for t in kv.fork(parent["table"], parent["len"], n % 3 + 1):
                    seqs.append({"table": t, "len": parent["len"], "vals": parent["vals"].clone()})
            else:
                kv.free(seqs.pop(pick % len(seqs))["table"])
        except KVCacheExhausted:
            pass  # all-or-nothing: the checks below prove nothing changed half-way
        # refcount of every page == number of tables holding it; free list consistent
        held = {}
        for s in seqs:
            assert len(s["table"]) == kv.pages_for(s["len"])
            for p in s["table"]:
                held[p] = held.get(p, 0) + 1
        assert all(kv.refcount[p] == held.get(p, 0) for p in range(kv.num_pages))
        assert kv.num_free == kv.num_pages - len(held)
    assert all(_content_ok(kv, s) for s in seqs), "a sequence's KV was overwritten"
    for s in seqs:
        kv.free(s["table"])
    assert kv.num_free == kv.num_pages and all(r == 0 for r in kv.refcount)
    assert kv.peak_used <= kv.num_pages


def test_many_random_ops_long_run():
    """Thousands of operations on one pool, then everything free."""
    import random
    r = random.Random(0)
    kv = PagedKVCache(num_layers=2, num_kv_heads=1, head_dim=2, num_pages=64, page_size=4)
    rng = torch.Generator().manual_seed(0)
    seqs, exhausted = [], 0
    for _ in range(3000):
        op = r.choice(["new", "append", "append", "fork", "free"])
        try:
            if op == "new" or not seqs:
                s = {"table": [], "len": 0, "vals": torch.empty(0, 1, 2)}
                _append(kv, s, r.randint(1, 9), rng)
                seqs.append(s)
            elif op == "append":
                _append(kv, r.choice(seqs), r.randint(1, 6), rng)
            elif op == "fork":
                p = r.choice(seqs)
                seqs += [{"table": t, "len": p["len"], "vals": p["vals"].clone()}
                         for t in kv.fork(p["table"], p["len"], r.randint(1, 3))]
            else:
                kv.free(seqs.pop(r.randrange(len(seqs)))["table"])
        except KVCacheExhausted:
            exhausted += 1
            kv.free(seqs.pop(r.randrange(len(seqs)))["table"])
    assert exhausted > 0  # the pool really ran dry along the way
    assert all(_content_ok(kv, s) for s in seqs)
    for s in seqs:
        kv.free(s["table"])
    assert kv.num_free == kv.num_pages and sum(kv.refcount) == 0


def test_memory_budget_and_errors():
    kv = PagedKVCache.from_memory(1 << 20, num_layers=2, num_kv_heads=2, head_dim=8, page_size=16)
    assert kv.num_pages == (1 << 20) // (2 * 2 * 2 * 16 * 8 * 4)
    with pytest.raises(ValueError, match="holds no page"):
        PagedKVCache.from_memory(10, 2, 2, 8)
    t = []
    with pytest.raises(KVCacheExhausted, match=f"need {kv.num_pages + 1} more pages"):
        kv.grow(t, (kv.num_pages + 1) * 16)
    assert t == [] and kv.num_free == kv.num_pages
    with pytest.raises(RuntimeError, match="refcount 0"):
        kv.free([0])


def test_snapshot_restore_gives_the_pool_back_exactly():
    kv = PagedKVCache(num_layers=2, num_kv_heads=1, head_dim=2, num_pages=20, page_size=4)
    keep = []
    kv.grow(keep, 9)
    snap = kv.snapshot()
    a, b = [], []
    kv.grow(a, 7)
    (c,) = kv.fork(a, 7, 1)
    kv.grow(b, 13)
    kv.free(a)
    first = list(c) + list(b)
    kv.restore(snap)
    assert (kv.refcount, kv._free) == snap and kv.num_used == len(keep) == 3
    a, b = [], []  # the same operations again get the same page ids
    kv.grow(a, 7)
    (c,) = kv.fork(a, 7, 1)
    kv.grow(b, 13)
    assert list(c) + list(b) == first


def test_interrupted_kv_operation_leaks_but_never_corrupts():
    """Outside a transaction, a KeyboardInterrupt inside grow / fork / free may leak pages (a
    snapshot restore takes them back) but never frees a held page or one twice."""
    from test_engine import Interrupt

    def ops(kv, tables):
        kv.grow(tables[0], 10)
        tables += kv.fork(tables[0], 10, 2)
        kv.grow(tables[1], 14)
        kv.free(tables[0])
        kv.free(tables[2])

    kv = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_pages=12, page_size=4)
    snap = kv.snapshot()
    ops(kv, [[]])  # every page touched: the counts below repeat
    kv.restore(snap)
    with Interrupt(0) as it:
        ops(kv, [[]])
    kv.restore(snap)
    for k in range(1, it.count):
        snap, tables = kv.snapshot(), [[]]
        with pytest.raises(KeyboardInterrupt), Interrupt(k):
            ops(kv, tables)
        held = {}
        for t in tables:
            for p in t:
                held[p] = held.get(p, 0) + 1
        assert len(set(kv._free)) == kv.num_free, k  # nothing free twice
        assert not set(kv._free) & set(held), k  # nothing held is free
        assert all(kv.refcount[p] >= n for p, n in held.items()), k  # a leak at most
        kv.restore(snap)
        assert kv.num_free == kv.num_pages

"""Shared test cases of the attention kernels (C++ and Triton): random trees grown with real KV-cache
forks, ragged extends, tolerances, and engine parity checks of a backend against the torch one."""
import random

import torch
from test_tree_plan import grow_tree

from treepo.engine.kv_cache import PagedKVCache

# kernels compute in fp32 from the stored values; the only extra error is the output's rounding
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
       torch.float16: dict(atol=1e-3, rtol=1e-3)}

EXTRA_SHAPES = [  # (Hq, Hkv, D, page_size, prompt_len, depth, branch, seg_len)
    (3, 3, 32, 16, 16, 2, 4, 16),  # g=1, forks exactly at page ends, full last pages
    (24, 3, 128, 16, 70, 1, 40, 3),  # 40 leaves under one node (more than a task's leaf tile)
    (8, 1, 64, 8, 9, 6, 2, 1),  # deep chain of 1-token segments
    (12, 4, 32, 4, 3, 3, 3, 0),  # zero-length segments only: forks share everything
]


def tree_case(shape, seed, dtype):
    Hq, Hkv, D, P, prompt, depth, branch, seg = shape
    kv = PagedKVCache(1, Hkv, D, num_pages=4096, page_size=P)
    kv._free = torch.randperm(4096, generator=torch.Generator().manual_seed(seed)).tolist()  # shuffled ids
    tables, lens = grow_tree(kv, seed, prompt, depth, branch, seg)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(kv.k[0].shape, generator=g).to(dtype)
    v = torch.randn(kv.v[0].shape, generator=g).to(dtype)
    q = torch.randn(len(lens), Hq, D, generator=g).to(dtype)
    return q, k, v, tables, lens, P


def append_case(D, dtype, page_size=8):
    """37 new tokens' K/V for random slots of a 160-slot cache (3 KV heads, pages of page_size, head
    dim D), and the caches as append_kv_ref leaves them: (k_cache, v_cache, k, v, pages, offsets,
    ref_k, ref_v)."""
    from treepo_kernels import append_kv_ref

    g = torch.Generator().manual_seed(0)
    P = page_size
    k_cache = torch.randn(160 // P, 3, P, D, generator=g).to(dtype)
    v_cache = torch.randn(160 // P, 3, P, D, generator=g).to(dtype)
    T = 37
    slots = torch.randperm(160, generator=g)[:T]
    pages, offsets = slots // P, slots % P
    k = torch.randn(T, 3, D, generator=g).to(dtype)
    v = torch.randn(T, 3, D, generator=g).to(dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    append_kv_ref(ref_k, ref_v, k, v, pages, offsets)
    return k_cache, v_cache, k, v, pages, offsets, ref_k, ref_v


def extend_case(seed, Hq, Hkv, D, P, dtype):
    """Ragged extend: sequences with random cached lengths and 1..40 new tokens, shuffled pages."""
    r = random.Random(seed)
    B = r.randint(1, 5)
    cached = [r.choice([0, 1, P - 1, P, r.randint(0, 50)]) for _ in range(B)]
    new = [r.choice([1, 2, 15, 16, 17, r.randint(1, 40)]) for _ in range(B)]
    kv_lens = [c + n for c, n in zip(cached, new)]
    max_pages = max(-(-L // P) for L in kv_lens)
    perm = torch.randperm(B * max_pages + 3, generator=torch.Generator().manual_seed(seed))
    tables = perm[: B * max_pages].view(B, max_pages).int()
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B * max_pages + 3, Hkv, P, D, generator=g).to(dtype)
    v = torch.randn(B * max_pages + 3, Hkv, P, D, generator=g).to(dtype)
    q = torch.randn(sum(new), Hq, D, generator=g).to(dtype)
    cu = torch.tensor([0] + new).cumsum(0)
    return q, k, v, tables, cu, torch.tensor(kv_lens)


# ------------------------------------------------------------------ engine parity between backends
PARITY_PROMPTS = [[5, 9, 33, 7, 100], list(range(10, 31)), [42]]


def assert_greedy_parity(hf, backend, max_tokens, device="cpu"):
    """Greedy generation (n=3, prompts forked) with `backend` equals the torch backend's: the same
    tokens, log-probs within 1e-4."""
    from helpers import assert_close

    from treepo import Engine, SamplingParams

    outs = {}
    for name in ("torch", backend):
        eng = Engine.from_model(hf, num_pages=256, page_size=4, attention_backend=name, device=device)
        assert eng.backend.name == name
        outs[name] = eng.generate(PARITY_PROMPTS, SamplingParams(n=3, temperature=0.0, max_tokens=max_tokens,
                                                                 ignore_eos=True))
    for a, b in zip(outs["torch"], outs[backend]):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), atol=1e-4)


def assert_tree_parity(hf, backend, cfg, num_pages, device="cpu"):
    """A TreeSampler run with `backend` gives the torch backend's trees (leaves, finish reasons,
    fallback flags, log-probs within 1e-4) and frees every page."""
    from helpers import assert_close

    from treepo import Engine, SamplingParams, TreeSampler

    trees = {}
    for name in ("torch", backend):
        eng = Engine.from_model(hf, num_pages=num_pages, page_size=4, attention_backend=name, device=device)
        eng.eos_token_ids = set(range(1, 20))
        trees[name] = TreeSampler(eng, cfg).sample(PARITY_PROMPTS[:2], SamplingParams(seed=3, temperature=1.0))
        assert eng.kv.num_used == 0
    for a, b in zip(trees["torch"], trees[backend]):
        assert [(x.token_ids, x.finish_reason, x.from_fallback) for x in a.leaves] == \
               [(x.token_ids, x.finish_reason, x.from_fallback) for x in b.leaves]
        for la, lb in zip(a.leaves, b.leaves):
            assert_close(torch.tensor(lb.logprobs), torch.tensor(la.logprobs), atol=1e-4)

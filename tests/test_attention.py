"""The engine's batched torch backend against the per-sequence reference, on a breaking grid."""
import math

import pytest
import torch
from helpers import assert_close

from treepo.engine.attention import AttentionMetadata, PagedAttention, TorchBackend
from treepo.engine.kv_cache import PagedKVCache
from treepo_kernels import paged_attention_ref


def dense_attention(q, k, v, n_cached):
    """Plain causal attention for one sequence: q [n, Hq, D] at positions n_cached.., k/v [L, Hkv, D]."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, 1).transpose(0, 1).double()
    v = v.repeat_interleave(Hq // Hkv, 1).transpose(0, 1).double()
    s = q.transpose(0, 1).double() @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    L = k.shape[1]
    qpos = torch.arange(n_cached, n_cached + q.shape[0])[:, None]
    s = s.masked_fill(torch.arange(L)[None] > qpos, float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1)


CASES = [  # (Hq, Hkv, D, page_size, [(cached, new), ...])
    (4, 4, 32, 4, [(0, 1)]),  # B=1, single token
    (9, 3, 64, 16, [(0, 17), (15, 1), (16, 1), (31, 1), (5, 11)]),  # SmolLM2 heads, page edges
    (8, 1, 16, 4, [(3, 1), (0, 9), (7, 2)]),  # MQA, mixed decode + extend
    (8, 2, 128, 8, [(63, 1), (64, 1), (1, 1), (0, 1)]),  # last page with 1 token / full
    (12, 3, 32, 16, [(100, 5), (0, 100), (47, 1)]),  # long-ish chains, odd lengths
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_torch_backend_matches_reference(case, dtype):
    Hq, Hkv, D, P, lens = CASES[case]
    g = torch.Generator().manual_seed(case)
    total_pages = sum(-(-(c + n) // P) for c, n in lens) + 5
    kv = PagedKVCache(num_layers=2, num_kv_heads=Hkv, head_dim=D, num_pages=total_pages, page_size=P, dtype=dtype)
    kv._free = torch.randperm(total_pages, generator=g).tolist()  # shuffled page ids
    tables, ks, vs, qs = [], [], [], []
    for c, n in lens:
        t = []
        kv.grow(t, c + n)
        tables.append(t)
        ks.append(torch.randn(c + n, Hkv, D, generator=g).to(dtype))
        vs.append(torch.randn(c + n, Hkv, D, generator=g).to(dtype))
        qs.append(torch.randn(n, Hq, D, generator=g).to(dtype))
        pages, offs = kv.slots(t, 0, c)  # the cached part is already in the pages
        if c:
            kv.k[1, pages, :, offs] = ks[-1][:c]
            kv.v[1, pages, :, offs] = vs[-1][:c]
    meta = AttentionMetadata.build(kv, tables, [n for _, n in lens], [c + n for c, n in lens], "cpu")
    attn = PagedAttention(TorchBackend(), meta, kv, Hq)
    q = torch.cat(qs)
    out = attn(1, q, torch.cat([k[c:] for k, (c, _) in zip(ks, lens)]),
               torch.cat([v[c:] for v, (c, _) in zip(vs, lens)]))
    ref, lse = paged_attention_ref(q, kv.k[1], kv.v[1], meta.block_tables, meta.cu_q,
                                   torch.tensor(meta.kv_lens))
    exact = torch.cat([dense_attention(qq, k, v, c) for qq, k, v, (c, _) in zip(qs, ks, vs, lens)])
    # the reference (fp32 math) is within rounding of float64 truth; the backend within the dtype's
    assert_close(ref, exact, atol=1e-5 if dtype == torch.float32 else 1e-2, what="reference vs exact")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert_close(out, exact, atol=tol, what=f"torch backend {dtype}")
    assert lse.shape == (q.shape[0], Hq) and torch.isfinite(lse).all()


def test_auto_falls_back_to_torch_with_a_notice_when_the_extension_is_missing(monkeypatch, capsys):
    from treepo.engine import attention
    from treepo_kernels import cpu

    monkeypatch.setattr(cpu, "_error", "ImportError: no _C")
    monkeypatch.setattr(attention, "_noticed", set())
    assert attention.make_backend("auto", "cpu").name == "torch"
    assert "'cpu' unavailable" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not available"):
        attention.make_backend("cpu", "cpu")

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
    from treepo_kernels import ext

    monkeypatch.setattr(ext, "_state", ext.ExtState("failed", why="ImportError: no _C"))
    monkeypatch.setattr(attention, "_noticed", set())
    assert attention.make_backend("auto", "cpu").name == "torch"
    assert "'cpu' unavailable" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not available"):
        attention.make_backend("cpu", "cpu")


def test_triton_is_an_optional_import():
    """With triton blocked, the references, the planner and the torch / cpu backends import and run
    (their op files hold Triton kernels too), and the triton backend says it is not installed."""
    import os
    import subprocess
    import sys

    code = "\n".join([
        "import sys; sys.modules['triton'] = None",
        "import torch",
        "from treepo.engine.attention import backend_status, make_backend",
        "from treepo_kernels import append_kv_ref, paged_attention_ref, plan_tree, tree_decode_ref",
        "from treepo_kernels.paged_kv import append_kv",
        "ok, why = backend_status('triton', 'cpu')",
        "assert not ok and 'not installed' in why, why",
        "assert make_backend('torch', 'cpu').name == 'torch'",
        "k, v = torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8)",
        "new = torch.ones(5, 1, 8)",
        "append_kv_ref(k, v, new, new, torch.tensor([0] * 4 + [1]), torch.arange(5) % 4)",
        "q = torch.randn(1, 2, 8)",
        "plan = plan_tree([[0, 1]], [5], 4)",
        "out = paged_attention_ref(q, k, v, torch.tensor([[0, 1]]), torch.tensor([0, 1]), torch.tensor([5]))[0]",
        "assert torch.allclose(out, tree_decode_ref(q, k, v, plan)[0])",
        "try:",
        "    append_kv(k, v, k[0, :, :1], v[0, :, :1], torch.tensor([0]), torch.tensor([0]))",
        "except ImportError as e:",
        "    assert 'not installed' in str(e)",
        "else:",
        "    raise AssertionError('a Triton launch without triton did not raise')",
    ])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]

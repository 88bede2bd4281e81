"""The packed bf16 GEMM (csrc/linear.cpp) against fp32 matmuls, and the engine's packed forward
(treepo/packed_model.py) against the model's own forward."""
import pytest
import torch
from helpers import assert_close, tiny_hf_model

from treepo import Engine, SamplingParams
from treepo.engine.packed_model import PackedModel, packed_status
from treepo_kernels import cpu as kernels

ok, why = kernels.status()
pytestmark = pytest.mark.skipif(not ok, reason=why)
FAST = kernels.gemm_impl() == "avx512bf16"
IMPLS = [0, 1] if FAST else [1]  # 0: the AVX512-BF16 tiles, 1: the portable loop


def reference(x, w, gated):
    y = x.float() @ w.float().T
    if gated:
        i = w.shape[0] // 2
        y = torch.nn.functional.silu(y[:, :i]) * y[:, i:]
    return y


# rows: 1 tile / several tiles / balanced chunks; columns: exact blocks, a ragged last block, fewer
# blocks than threads x 4 (narrower tiles), a tail group; K: tiny and model-sized
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n, k", [(16, 2), (40, 6), (200, 64), (962, 576), (3072, 96)])
def test_linear_packed_matches_fp32_matmul(n, k, gated, impl):
    g = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    packed = kernels.pack_linear(w, gated=gated)
    n_out = n // 2 if gated else n
    for m in (1, 2, 5, 6, 7, 13, 24, 25, 130):
        x = torch.randn(m, k, generator=g).bfloat16()
        ref = reference(x, w, gated)
        scale = ref.abs().max().item() + 1e-6
        y32 = kernels.linear_packed(x, packed, n_out, gated=gated, fp32_out=True, _impl=impl)
        y16 = kernels.linear_packed(x, packed, n_out, gated=gated, _impl=impl)
        assert y32.shape == (m, n_out) and y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
        # bf16 products are exact in fp32: only the summation order differs from the reference
        assert_close(y32, ref, atol=1e-5 * scale * max(k, 16) ** 0.5, what=f"fp32 out m={m}")
        assert_close(y16, y32, atol=0, rtol=2**-8, what=f"bf16 out m={m}")  # one rounding to bf16


@pytest.mark.skipif(not FAST, reason="only the AVX512-BF16 path has two implementations")
def test_fast_and_portable_paths_agree_and_thread_count_does_not_matter():
    w = torch.randn(3072, 576).bfloat16()
    x = torch.randn(37, 576).bfloat16()
    for gated in (False, True):
        p = kernels.pack_linear(w, gated=gated)
        n = 1536 if gated else 3072
        fast = kernels.linear_packed(x, p, n, gated=gated, fp32_out=True)
        assert_close(fast, kernels.linear_packed(x, p, n, gated=gated, fp32_out=True, _impl=1),
                     atol=1e-5 * fast.abs().max().item())
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = kernels.linear_packed(x, p, n, gated=gated, fp32_out=True)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, fast)  # each output sums over K in the same order whatever the tiling


def test_bad_inputs_are_clear_errors():
    w = torch.randn(32, 8).bfloat16()
    p = kernels.pack_linear(w)
    with pytest.raises(RuntimeError, match="must be even"):
        kernels.pack_linear(torch.randn(32, 7).bfloat16())
    with pytest.raises(RuntimeError, match="bf16"):
        torch.ops.treepo.pack_linear(torch.randn(32, 8), False)  # the launcher converts, the op checks
    with pytest.raises(RuntimeError, match="packed for K=8"):
        kernels.linear_packed(torch.randn(3, 10).bfloat16(), p, 32)
    with pytest.raises(RuntimeError, match="packed blocks"):
        kernels.linear_packed(torch.randn(3, 8).bfloat16(), p, 64)
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.linear_packed(torch.randn(3, 8), p, 32)
    assert kernels.linear_packed(torch.randn(0, 8).bfloat16(), p, 32).shape == (0, 32)


# ------------------------------------------------------------------ the engine's packed forward
needs_fast = pytest.mark.skipif(not FAST, reason="the engine packs only with AVX512-BF16")
FAMILIES = ["llama_gqa4_untied", "llama_bias", "qwen2_bias_gqa3", "qwen3_norms_gqa4", "mistral_gqa4"]


def _step_logits(eng, prompts):
    seqs = [eng.new_sequence(p) for p in prompts]
    first = eng.forward(seqs)
    for s in seqs:
        s.token_ids.append(3)
    second = eng.forward(seqs)  # decode rows over the cached prompt
    for s in seqs:
        eng.free(s)
    return first, second


@needs_fast
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_forward_matches_model_forward(family):
    hf = tiny_hf_model(family, dtype=torch.bfloat16)
    prompts = [[5, 9, 33, 7, 100], list(range(10, 31)), [42]]
    plain = Engine.from_model(hf, num_pages=64, page_size=4, packed_weights=False)
    packed = Engine.from_model(hf, num_pages=64, page_size=4, packed_weights=True)
    assert plain.runner.packed is None and isinstance(packed.runner.packed, PackedModel)
    for a, b in zip(_step_logits(plain, prompts), _step_logits(packed, prompts)):
        # both round every GEMM output to bf16 once; the packed one also fuses silu(gate) * up
        assert_close(b, a, atol=0.05 * a.abs().max().item(), what=f"{family} logits")
        assert (b.argmax(-1) == a.argmax(-1)).float().mean() >= 2 / 3


@needs_fast
def test_packed_engine_repacks_when_weights_change():
    hf = tiny_hf_model("llama_mha_tied", dtype=torch.bfloat16)
    eng = Engine.from_model(hf, num_pages=64, page_size=4)
    assert eng.runner.packed is not None  # auto: on for a bf16 model on a CPU with AVX512-BF16
    prompts = [[5, 9, 33], [7, 7]]
    before = _step_logits(eng, prompts)
    other = tiny_hf_model("llama_mha_tied", seed=1, dtype=torch.bfloat16)
    with torch.no_grad():  # the trainer's sync: copy_ into the engine's parameters
        for name, p in eng.model.state_dict().items():
            p.copy_(other.state_dict()[name])
    after = _step_logits(eng, prompts)
    fresh = _step_logits(Engine.from_model(other, num_pages=64, page_size=4), prompts)
    assert eng.runner.packed.repacks == 2
    for a, f, b in zip(after, fresh, before):
        assert torch.equal(a, f) and not torch.allclose(a, b)
    eng.generate([[5, 9, 33]], SamplingParams(temperature=0.0, max_tokens=4))  # no change: no repack
    assert eng.runner.packed.repacks == 2


def test_packed_weights_true_where_impossible_is_an_error():
    hf = tiny_hf_model("llama_mha_tied")  # fp32
    assert not packed_status(Engine.from_model(hf, num_pages=8).model, "cpu")[0]
    with pytest.raises(ValueError, match="packed_weights=True"):
        Engine.from_model(hf, num_pages=8, packed_weights=True)
    assert Engine.from_model(hf, num_pages=8).runner.packed is None


# ------------------------------------------------------------------ fused layer ops (csrc/layer_ops.cpp)
def test_rms_norm_ops_match_the_model_norm():
    from treepo.engine.model import RMSNorm

    g = torch.Generator().manual_seed(0)
    for T, H in [(1, 8), (5, 48), (37, 576)]:
        norm = RMSNorm(H, 1e-5).to(torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(H, generator=g))
        x = (torch.randn(T, H, generator=g) * 3).bfloat16()
        r = torch.randn(T, H, generator=g).bfloat16()
        ref = norm(x)
        # the same roundings as the model; only the fp32 sum of squares may differ in order
        assert_close(torch.ops.treepo.rms_norm(x, norm.weight, 1e-5), ref, atol=0, rtol=2**-7)
        x2 = x.clone()
        y = torch.ops.treepo.add_rms_norm(x2, r, norm.weight, 1e-5)
        assert torch.equal(x2, x + r)  # the residual stream, in place, rounded as torch rounds
        assert_close(y, norm(x + r), atol=0, rtol=2**-7)
    with pytest.raises(RuntimeError, match="w has"):
        torch.ops.treepo.rms_norm(x, torch.ones(3).bfloat16(), 1e-5)


def test_rope_qkv_matches_the_model_rotary_embedding():
    from treepo.engine.model import rotate_half

    g = torch.Generator().manual_seed(1)
    for T, Hq, Hkv, D in [(1, 2, 1, 4), (7, 9, 3, 64), (3, 8, 8, 16)]:
        qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g).bfloat16()
        ang = torch.rand(T, D // 2, generator=g) * 50
        cos, sin = torch.cat([ang, ang], -1).cos().bfloat16(), torch.cat([ang, ang], -1).sin().bfloat16()
        q, k, v = torch.ops.treepo.rope_qkv(qkv, cos, sin, Hq, Hkv)
        rq, rk, rv = qkv.float().split([Hq * D, Hkv * D, Hkv * D], -1)
        c, s = cos.float()[:, None], sin.float()[:, None]
        for out, x in ((q, rq.view(T, Hq, D)), (k, rk.view(T, Hkv, D))):
            assert_close(out, x * c + rotate_half(x) * s, atol=1e-2, rtol=2**-7)  # fp32 math, one rounding
        assert torch.equal(v, qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D))
    with pytest.raises(RuntimeError, match="not \\(Hq \\+ 2 Hkv\\)"):
        torch.ops.treepo.rope_qkv(qkv, cos, sin, Hq + 1, Hkv)

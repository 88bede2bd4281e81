"""treepo/train/precision.py: how "auto" resolves (CUDA, CPUs with and without native bf16), bad
settings, and that CPU bf16 autocast keeps the DAPO loss, every parameter's gradient and a few
AdamW steps of learning within bf16 tolerance of fp32 on a tiny random model."""
import copy

import pytest
import torch
from helpers import tiny_hf_model

from treepo import Engine
from treepo.losses import policy_loss
from treepo.train import precision
from treepo.train.precision import autocast, cpu_bf16_fast, resolve_autocast, resolve_engine_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# --------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("flags,fast", [("fpu avx2 avx512f avx512_bf16 sse", True), ("fpu amx_bf16 avx2", True),
                                        ("fpu avx avx2 avx512f avx512bw", False), ("", False)])
def test_cpu_bf16_fast_reads_the_flags_line(tmp_path, flags, fast):
    f = tmp_path / "cpuinfo"
    f.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_bf16_fast(str(f)) is fast


def test_cpu_bf16_fast_is_false_when_cpuinfo_is_unreadable(tmp_path):
    assert cpu_bf16_fast(str(tmp_path / "missing")) is False
    assert cpu_bf16_fast(str(tmp_path)) is False  # a directory: OSError too


@pytest.mark.parametrize("fast", [True, False])
def test_auto_resolution(monkeypatch, fast):
    monkeypatch.setattr(precision, "cpu_bf16_fast", lambda: fast)
    assert resolve_autocast("auto", CUDA) == torch.bfloat16
    assert resolve_autocast("auto", CPU) == (torch.bfloat16 if fast else None)
    assert resolve_autocast("auto", "cpu") == resolve_autocast("auto", CPU)
    assert resolve_engine_dtype("auto", CUDA) == "bfloat16"
    assert resolve_engine_dtype("auto", CPU) == ("bfloat16" if fast else "float32")
    for dev in (CPU, CUDA):  # explicit settings ignore the machine
        assert resolve_autocast("bf16", dev) == torch.bfloat16
        assert resolve_autocast("off", dev) is None
        assert resolve_engine_dtype("bfloat16", dev) == "bfloat16"
        assert resolve_engine_dtype("float32", dev) == "float32"


@pytest.mark.parametrize("fn,bad,valid", [(resolve_autocast, "fp16", "auto, bf16, off"),
                                          (resolve_autocast, "bfloat16", "auto, bf16, off"),
                                          (resolve_engine_dtype, "bf16", "auto, bfloat16, float32"),
                                          (resolve_engine_dtype, "float16", "auto, bfloat16, float32")])
def test_bad_settings_name_the_valid_ones(fn, bad, valid):
    with pytest.raises(ValueError, match=f"{bad!r}; valid: {valid}"):
        fn(bad, CPU)


def test_autocast_context():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with autocast(CPU, torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
    with autocast("cpu", None):
        assert lin(x).dtype == torch.float32
    assert lin.weight.dtype == torch.float32  # master weights untouched


# --------------------------------------------------------------------------- numerics
B, LP, LR = 4, 7, 12


def _model(family="llama_gqa4_untied"):
    model = Engine.from_model(tiny_hf_model(family), num_pages=4, page_size=4).model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    T = LP + LR
    input_ids = torch.randint(3, 160, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, LP + 8:] = 0  # right padding of shorter responses
    attention_mask[3, LP + 3:] = 0
    response_mask = attention_mask[:, LP:].float()
    position_ids = torch.arange(T).expand(B, T)
    adv = torch.tensor([1.0, -0.5, 0.8, 1.2])[:, None].expand(B, LR)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                responses=input_ids[:, LP:], mask=response_mask, adv=adv)


def _logp(model, b):
    return model(b["input_ids"], b["position_ids"], attention_mask=b["attention_mask"], labels=b["responses"],
                 label_start=LP)


def _loss_and_grads(model, b, old, dtype):
    model.zero_grad(set_to_none=True)
    with autocast(CPU, dtype):
        logp, ent = _logp(model, b)
        loss, _ = policy_loss(logp, old, b["adv"], b["mask"], entropy=ent)
    assert logp.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama_gqa4_untied", "qwen3_norms_gqa4", "llama_bias"])
def test_bf16_autocast_loss_and_gradients_match_fp32(family):
    model, b = _model(family), _batch()
    with torch.no_grad():
        lp32, _ = _logp(model, b)
        with autocast(CPU, torch.bfloat16):
            lp16, _ = _logp(model, b)
    gap = ((lp16 - lp32).abs() * b["mask"]).max()
    assert 0 < gap < 2e-2, f"max |logp bf16 autocast - fp32| = {gap:.3g} (0 would mean autocast did nothing)"
    # off-policy by a little, so the loss depends on logp (on-policy it is -mean(A) whatever logp is)
    old = (lp32 + 0.05 * torch.randn(lp32.shape, generator=torch.Generator().manual_seed(1))) * b["mask"]
    loss32, g32 = _loss_and_grads(model, b, old, None)
    loss16, g16 = _loss_and_grads(model, b, old, torch.bfloat16)
    assert abs(loss16 - loss32) / abs(loss32) < 2e-2, f"loss fp32 {loss32:.6g} vs bf16 autocast {loss16:.6g}"
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    cos = torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)
    assert cos > 0.99, f"cosine of the flattened gradients {cos:.4f}"
    bad = []
    for n, g in g32.items():
        rel = float((g16[n] - g).norm() / g.norm().clamp(min=1e-12))
        if not torch.isfinite(g16[n]).all() or rel > 0.1:
            bad.append(f"{n}: |g16 - g32| / |g32| = {rel:.3g}")
    assert not bad, "parameter gradients off by more than bf16 tolerance:\n" + "\n".join(bad)
    assert all(g.dtype == torch.float32 for g in g16.values())  # fp32 master grads


def _mean_taken_logp(model, b):
    with torch.no_grad():
        lp, _ = _logp(model, b)
    return float((lp * b["mask"]).sum() / b["mask"].sum())


def _train(model, b, dtype, steps=6):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    adv = torch.ones(B, LR)  # every taken token good: the policy must make them likelier
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with autocast(CPU, dtype):
            logp, _ = _logp(model, b)
            loss, _ = policy_loss(logp, logp.detach(), adv, b["mask"])
        loss.backward()
        opt.step()
    return _mean_taken_logp(model, b)


def test_bf16_autocast_still_learns():
    base, b = _model(), _batch(seed=3)
    start = _mean_taken_logp(base, b)
    end32 = _train(copy.deepcopy(base), b, None)
    end16 = _train(copy.deepcopy(base), b, torch.bfloat16)
    gain32, gain16 = end32 - start, end16 - start
    assert gain32 > 0.05, f"fp32 did not learn: mean log-prob {start:.4f} -> {end32:.4f}"
    assert gain16 > 0.8 * gain32, f"bf16 autocast gained {gain16:.4f} of mean log-prob; fp32 {gain32:.4f}"
    assert abs(gain16 - gain32) < 0.2 * gain32

"""Helpers of the pytest-benchmark suite (bench/conftest.py): provider availability (a clean
`pytest.skip` naming what is missing), the check of a provider's output against the reference, ids."""
import os
import re

import pytest
import torch

# relative Frobenius error allowed against the fp32 reference, by the provider's compute dtype
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def slug(name: str) -> str:
    """A shape's name as a test id: "target: 64 x (2048 shared + 1024 own)" -> "target_64_x_2048_shared_1024_own"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def torch_dtype(device: torch.device) -> torch.dtype:
    """The dtype the torch providers (reference backend, SDPA, FlexAttention) run in: bf16 on CUDA and on
    CPUs with native bf16 dot products, else fp32 - the choice of the engine's and trainer's "auto"
    (treepo/train/precision.py: emulated bf16 matmuls are several times slower than fp32)."""
    from treepo.train.precision import cpu_bf16_fast

    return torch.bfloat16 if device.type == "cuda" or cpu_bf16_fast() else torch.float32


# ------------------------------------------------------------------ provider availability

def need_cpp(device: torch.device):
    """Skip unless the C++ kernels (csrc/, treepo_kernels._C) can run: a CPU run with the extension."""
    if device.type != "cpu":
        pytest.skip(f"the C++ kernels run on the CPU, not {device.type} (--bench-device cpu)")
    from treepo_kernels import cpu

    ok, why = cpu.status()
    if not ok:
        pytest.skip(why)


def need_triton(device: torch.device, shape_set: str) -> bool:
    """Skip unless the Triton kernels can run; True when they run in the interpreter (TRITON_INTERPRET=1
    on a CPU, tiny shapes only: it checks the benchmark file, its times mean nothing)."""
    from treepo_kernels.triton_common import TRITON_ERROR

    if TRITON_ERROR is not None:
        pytest.skip(f"Triton is not installed ({TRITON_ERROR})")
    if device.type == "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1" and shape_set == "tiny":
        return True
    pytest.skip("the Triton kernels need CUDA (on a CPU only the interpreter, TRITON_INTERPRET=1 with "
                "--bench-shapes tiny, to check this file)")


def need_cuda(device: torch.device, what: str):
    if device.type != "cuda":
        pytest.skip(f"{what} needs CUDA")


def need_module(name: str, device: torch.device):
    """A CUDA-only library (flash_attn, flashinfer): skip without CUDA or when it is not installed."""
    need_cuda(device, name)
    return pytest.importorskip(name, reason=f"{name} is not installed")


# ------------------------------------------------------------------ checking and timing

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius, fp32)."""
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(what: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Assert `out` matches the fp32 reference within REL_TOL[dtype]; returns the error."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.1g} ({dtype})"
    return err



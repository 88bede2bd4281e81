"""Mixed precision of the training forward/backward and the dtype of the engine's weight copy.

Why "auto" looks at the CPU: on CUDA bf16 is the fast path for both. On a CPU, torch runs bf16
matmuls at full speed only with AVX512-BF16 or AMX-BF16 instructions; without them (e.g. AVX2-only
EPYCs) it emulates bf16 by converting to fp32 around every GEMM, several times slower than plain
fp32 (bench/bench_precision.py measures both the training step and engine decoding). So "auto"
picks bf16 on CUDA and on CPUs whose /proc/cpuinfo flags show those instructions, else fp32.

Training keeps fp32 master weights (and AdamW state) in every case: autocast runs the matmuls in
bf16 while norms, softmax and the log-probs stay fp32 (losses.selective_logprobs upcasts per
chunk), the usual mixed-precision recipe (Micikevicius et al., arXiv 1710.03740; bf16 needs no
loss scaling).
"""
from __future__ import annotations

import contextlib
import functools

import torch

AUTOCAST_SETTINGS = ("auto", "bf16", "off")
ENGINE_DTYPE_SETTINGS = ("auto", "bfloat16", "float32")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_bf16_fast(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True iff the CPU flags in `cpuinfo` include avx512_bf16 or amx_bf16 (native bf16 dot
    products); False when the file cannot be read (non-Linux: assume emulated bf16)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in BF16_CPU_FLAGS)
    except OSError:
        return False
    return False


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _bf16_fast(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_fast())


def resolve_autocast(setting: str, device) -> torch.dtype | None:
    """The autocast dtype of the training forward/backward: torch.bfloat16 or None (plain fp32).

    setting "auto": bf16 on CUDA, and on a CPU iff cpu_bf16_fast(); "bf16": always; "off": never.
    """
    if setting not in AUTOCAST_SETTINGS:
        raise ValueError(f"autocast={setting!r}; valid: {', '.join(AUTOCAST_SETTINGS)}")
    if setting == "off":
        return None
    if setting == "bf16" or _bf16_fast(_device(device)):
        return torch.bfloat16
    return None


def autocast(device, dtype: torch.dtype | None):
    """A torch.autocast context of `dtype` on `device`'s type, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(device).type, dtype=dtype)


def resolve_engine_dtype(setting: str, device) -> str:
    """The engine's weight dtype name ("bfloat16" | "float32") for loader.load_model.

    setting "auto": "bfloat16" on CUDA, and on a CPU iff cpu_bf16_fast(), else "float32";
    "bfloat16" / "float32": that dtype.
    """
    if setting not in ENGINE_DTYPE_SETTINGS:
        raise ValueError(f"engine_dtype={setting!r}; valid: {', '.join(ENGINE_DTYPE_SETTINGS)}")
    if setting != "auto":
        return setting
    return "bfloat16" if _bf16_fast(_device(device)) else "float32"

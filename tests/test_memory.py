"""treepo/train/memory.py: PeakMemory sees a ~400 MB allocation made inside the block, and a later
block without it reads lower (the per-block reset works)."""
import pytest
import torch

from treepo.train import memory
from treepo.train.memory import PeakMemory

N = 100_000_000  # float32: 400 MB (0.373 GiB)


def _allocate_and_touch():
    x = torch.ones(N)  # written, so every page is resident
    assert float(x[::4096].sum()) == len(range(0, N, 4096))
    del x


def test_peak_sees_an_allocation_and_resets():
    with PeakMemory("cpu") as big:
        _allocate_and_touch()
    assert big.kind in ("rss", "rss_lifetime")
    if big.kind == "rss_lifetime":
        pytest.skip("/proc/self/clear_refs is not writable here: only the process-lifetime peak exists")
    assert big.peak_gb - big.start_gb > 0.35, f"peak {big.peak_gb:.3f} GiB, start {big.start_gb:.3f} GiB"
    with PeakMemory(torch.device("cpu")) as small:
        torch.ones(1000).sum()
    assert small.kind == "rss"
    assert small.peak_gb < big.peak_gb - 0.3, f"second block {small.peak_gb:.3f} GiB, first {big.peak_gb:.3f}"
    assert small.peak_gb - small.start_gb < 0.1


def test_fallback_is_the_lifetime_peak(monkeypatch):
    monkeypatch.setattr(memory, "_reset_rss_peak", lambda: False)
    with PeakMemory("cpu") as pm:
        _allocate_and_touch()
    assert pm.kind == "rss_lifetime"
    assert pm.peak_gb > 0.35  # the lifetime peak includes this block's allocation

"""Peak memory of one block of code (the trainer logs the update phase's as perf/update_peak_mem_gb).

On CUDA it is the caching allocator's peak of allocated tensor bytes (reset at entry). On a CPU
there is no allocator counter, so it is the process's peak resident set (VmHWM): Linux resets
that high-water mark to the current RSS when "5" is written to /proc/self/clear_refs
(Documentation/filesystems/proc.rst, "clear_refs"), so the figure covers this block only. Where
that file cannot be written or /proc/self/status read (not Linux, a locked-down container), the
fallback is getrusage's ru_maxrss: the peak over the whole life of the process, which is only an
upper bound of the block's peak - `kind` says which one a figure is.
"""
from __future__ import annotations

import re
import resource
import sys

import torch

GB = 1 << 30
KINDS = ("cuda_allocated", "rss", "rss_lifetime")


def _vm_kb(field: str) -> int | None:
    """A kB field of /proc/self/status (VmHWM: peak RSS, VmRSS: current), None if unreadable."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _vm_kb("VmHWM") is not None


def _lifetime_peak_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / GB if sys.platform == "darwin" else peak * 1024 / GB


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then pm.peak_gb: the block's peak memory in GiB.

    device: torch.device or str; a CUDA device measures its allocator, anything else this
    process's RSS. Attributes after the block: peak_gb (float), start_gb (the same measure at
    entry: allocated bytes or RSS), kind ("cuda_allocated" | "rss" | "rss_lifetime", the last
    being the process-lifetime peak where the per-block reset is unavailable).
    """

    def __init__(self, device="cpu"):
        self.device = device if isinstance(device, torch.device) else torch.device(device)
        self.kind: str | None = None
        self.start_gb: float | None = None
        self.peak_gb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self.kind = "cuda_allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_gb = torch.cuda.memory_allocated(self.device) / GB
        elif _reset_rss_peak():
            self.kind = "rss"
            self.start_gb = (_vm_kb("VmRSS") or 0) * 1024 / GB
        else:
            self.kind = "rss_lifetime"
            rss = _vm_kb("VmRSS")
            self.start_gb = rss * 1024 / GB if rss is not None else _lifetime_peak_gb()
        return self

    def __exit__(self, *exc) -> bool:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_gb = torch.cuda.max_memory_allocated(self.device) / GB
        elif self.kind == "rss":
            hwm = _vm_kb("VmHWM")
            if hwm is not None:
                self.peak_gb = hwm * 1024 / GB
                return False
            self.kind = "rss_lifetime"
        if self.kind == "rss_lifetime":
            self.peak_gb = _lifetime_peak_gb()
        return False


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def return_freed_tensors_to_the_os(threshold: int = 1 << 20) -> bool:
    """Make glibc malloc serve every allocation of >= `threshold` bytes with its own mmap, so a
    freed activation goes back to the OS at once. By default glibc raises its mmap threshold each
    time a large block is freed (up to 32 MiB), after which tensors come from the heap and stay
    in the process's RSS when freed: a training step's activations then stayed resident into the
    next step, whose peak RSS rose by 2-3 GB (measured: 10.4 GB peak RSS with the default, 8.6
    GB with this, same seconds per step; bench/results/2026-12-02_cpu2_noavx512_bench_train.txt).
    True if set (Linux with glibc); False elsewhere, where it does nothing. The MALLOC_MMAP_THRESHOLD_
    environment variable does the same for any process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False

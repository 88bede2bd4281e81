"""Paged KV cache: one K and one V pool for all layers, fixed-size pages, refcounted sharing.

Layout (docs/kernels.md): k[layer] and v[layer] are [num_pages, num_kv_heads, page_size, head_dim].
A sequence owns a block table (list of page ids); token t of the sequence lives in page
table[t // page_size] at offset t % page_size. `fork` gives a child every full page of the parent
by reference (refcount + 1) and a private copy of the partial tail page, so appends - which only
ever touch the tail page or fresh pages - never write a page that anyone else can read. This is
how the n samples of a prompt and the branches of a TreePO tree share their prefix's KV.

Running out of pages raises KVCacheExhausted before anything is changed; the engine's scheduler
catches it to preempt, and reports it clearly when even one sequence cannot fit.

The bookkeeping (refcounts, free list) is plain Python, so an asynchronous exception - a
KeyboardInterrupt lands between any two bytecodes - can stop an operation half-way (pages popped
from the free list but in no table yet, shared refcounts raised for children never returned).
`snapshot()` / `restore()` make a whole call all-or-nothing instead: the engine snapshots the
accounting when a generate() or tree-sampling call starts and restores it if the call raises.
"""
from __future__ import annotations

from array import array

import torch

from treepo_kernels.common import cdiv


class KVCacheExhausted(RuntimeError):
    """Not enough free KV pages; state is unchanged."""

    def __init__(self, needed: int, free: int, total: int):
        super().__init__(f"KV cache exhausted: need {needed} more pages, {free} of {total} are free; "
                         "raise kv_cache_memory (or num_pages) or lower the batch / max_tokens")
        self.needed, self.free, self.total = needed, free, total


def bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype) -> int:
    return 2 * num_layers * num_kv_heads * page_size * head_dim * torch.empty((), dtype=dtype).element_size()


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int,
                 page_size: int = 16, dtype=torch.float32, device="cpu"):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages} and page_size={page_size} must be >= 1")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_pages, self.page_size = num_pages, page_size
        shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
        # empty, not zeros: a page is zeroed the first time it is handed out (a large pool then
        # costs nothing up front). Slots past a sequence's length must hold finite values, since
        # attention multiplies them by an exact 0 probability - and 0 * NaN is NaN.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self._touched = [False] * num_pages
        # int arrays, not lists: snapshot() / restore() are then one memcpy each (a 500k-page
        # list copy increfs every element: ~10x slower)
        self.refcount = array("i", [0]) * num_pages
        self._free = array("i", range(num_pages - 1, -1, -1))  # a stack: low ids handed out first
        self.peak_used = 0

    @classmethod
    def from_memory(cls, memory_bytes: int, num_layers, num_kv_heads, head_dim, page_size=16,
                    dtype=torch.float32, device="cpu") -> "PagedKVCache":
        """A pool sized to a memory budget in bytes (K and V of every layer)."""
        per_page = bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype)
        num_pages = int(memory_bytes // per_page)
        if num_pages < 1:
            raise ValueError(f"kv_cache_memory={memory_bytes} bytes holds no page ({per_page} bytes each)")
        return cls(num_layers, num_kv_heads, head_dim, num_pages, page_size, dtype, device)

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.page_size)

    def reset_peak(self):
        self.peak_used = self.num_used

    def snapshot(self) -> tuple:
        """The page accounting now (refcounts and free list: two O(num_pages) copies), for restore()."""
        return self.refcount[:], self._free[:]

    def restore(self, snap: tuple) -> None:
        """Put the accounting back as snapshot() saw it: every page taken since is free again and
        the free list is in the same order (so a rerun gets the same page ids). Tables made since
        are stale; the caller drops them. Page contents are left as they are (finite values)."""
        refcount, free = snap
        try:
            self.refcount[:] = refcount  # one C-level copy each: no half-restored list
        finally:
            self._free[:] = free

    def _allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheExhausted(n, len(self._free), self.num_pages)
        pages = list(self._free[:-n - 1:-1])  # what n pop()s would give; taken once they are zeroed
        fresh = [p for p in pages if not self._touched[p]]
        if fresh:
            idx = torch.tensor(fresh, device=self.k.device)
            self.k[:, idx] = 0
            self.v[:, idx] = 0
            for p in fresh:
                self._touched[p] = True
        del self._free[len(self._free) - n:]
        for p in pages:
            self.refcount[p] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return pages

    def _release(self, pages):
        for p in pages:
            rc = self.refcount[p]
            if rc <= 0:
                raise RuntimeError(f"KV page {p} released with refcount {rc}")
            self.refcount[p] = rc - 1
            if rc == 1:
                self._free.append(p)

    # ------------------------------------------------------------------ block tables
    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` in place so it can hold num_tokens tokens."""
        need = self.pages_for(num_tokens) - len(table)
        if need > 0:
            table.extend(self._allocate(need))

    def growth_needed(self, table: list[int], num_tokens: int) -> int:
        return max(self.pages_for(num_tokens) - len(table), 0)

    def fork(self, table: list[int], num_tokens: int, n: int = 1) -> list[list[int]]:
        """n children of a sequence holding num_tokens tokens in `table`.

        Each child shares the full pages and gets its own copy of the partial tail page. All or
        nothing: raises KVCacheExhausted (changing nothing) if the tail copies do not fit."""
        if n <= 0:
            return []
        full, partial = divmod(num_tokens, self.page_size)
        if self.pages_for(num_tokens) > len(table):
            raise ValueError(f"fork of {num_tokens} tokens from a table of {len(table)} pages")
        tails = self._allocate(n) if partial else []
        if partial:
            src = torch.tensor([table[full]] * n, device=self.k.device)
            dst = torch.tensor(tails, device=self.k.device)
            # copy only the filled slots; the rest of the tail page is dead space
            self.k[:, dst, :, :partial] = self.k[:, src, :, :partial]
            self.v[:, dst, :, :partial] = self.v[:, src, :, :partial]
        shared = table[:full]
        for p in shared:
            self.refcount[p] += n
        if partial:
            return [shared + [t] for t in tails]
        return [list(shared) for _ in range(n)]

    def free(self, table: list[int]) -> None:
        """Drop a sequence's references; pages nobody else holds become free. Empties `table`
        first, so an interrupted free can leak pages (restore() takes them back) but never
        releases one twice."""
        pages = table[:]
        table.clear()
        self._release(pages)

    def is_writable(self, table: list[int], start: int, end: int) -> bool:
        """True if the pages holding tokens [start, end) are owned by this table alone."""
        if end <= start:
            return True
        pages = table[start // self.page_size: self.pages_for(end)]
        return all(self.refcount[p] == 1 for p in pages)

    def slots(self, table: list[int], start: int, end: int) -> tuple[list[int], list[int]]:
        """(page ids, offsets) of tokens [start, end) of a sequence."""
        P = self.page_size
        return [table[t // P] for t in range(start, end)], [t % P for t in range(start, end)]

"""Progress of long work (sampling, evaluation, training phases, first-use set-up) on a terminal.

A tqdm bar on stderr when stderr is a terminal, and nothing otherwise, so that logs, pipes and CI
output stay clean; `TREEPO_PROGRESS=1` forces bars on (e.g. under `script` or in a notebook),
`TREEPO_PROGRESS=0` turns them off. Bars disappear when their work is done (the caller prints the
result line), so a training run's terminal keeps one line per step. Long set-up steps also print
one line saying what is happening, terminal or not (`note`).
"""
from __future__ import annotations

import os
import sys
import time


def enabled() -> bool:
    """Whether bars are shown: TREEPO_PROGRESS=1 / 0, else whether stderr is a terminal."""
    v = os.environ.get("TREEPO_PROGRESS", "").strip()
    if v in ("0", "1"):
        return v == "1"
    return sys.stderr.isatty()


class _Off:
    """The bar when bars are off: accepts every call, shows nothing."""

    n = 0

    def update(self, n: int = 1):
        self.n += n

    def set_postfix_str(self, s: str, refresh: bool = True):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(desc: str | None, total: int | None = None, unit: str = "it"):
    """A progress bar (tqdm) for `total` units of work named `desc`; a silent stand-in when `desc`
    is None or bars are off. Use as a context manager, `update(n)` as work finishes."""
    if not desc or not enabled():
        return _Off()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                mininterval=0.5)


class Rate:
    """Tokens per second since construction, for a bar's postfix."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, tokens: int) -> str:
        return f"{tokens / max(time.perf_counter() - self.t0, 1e-9):.0f} tok/s"


def note(message: str) -> None:
    """One line on stderr about a long set-up step, shown whether or not stderr is a terminal."""
    print(f"treepo: {message}", file=sys.stderr, flush=True)

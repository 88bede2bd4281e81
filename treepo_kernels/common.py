"""Tiny helpers shared by the kernels' launchers, the planners and the engine (no Triton here)."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for Python ints, b > 0: e.g. the pages that hold `a` tokens at `b` tokens a page."""
    return -(-a // b)

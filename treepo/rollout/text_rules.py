"""Text rules of the tree sampler's stop checks (docs/algorithm.md section 1 step 3): complete \\boxed{...}
answers with nested braces, and repeated windows. Shared with the reward's answer extraction."""
from __future__ import annotations

from collections import Counter

BOXED = ("\\boxed{", "\\fbox{")


def boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every complete \\boxed{...} (or \\fbox{...}); end is just past its '}'.

    Braces nest; an unclosed box is not complete."""
    spans = []
    i = 0
    while True:
        starts = [(text.find(m, i), m) for m in BOXED]
        starts = [(s, m) for s, m in starts if s >= 0]
        if not starts:
            return spans
        s, m = min(starts)
        depth, j = 1, s + len(m)
        while j < len(text) and depth:
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            j += 1
        if depth:
            return spans  # unclosed: nothing complete after it either
        spans.append((s, j))
        i = j


def has_repetition(seq, window: int, count: int) -> bool:
    """True if some window of `window` consecutive items (characters of a str, or token ids)
    occurs at least `count` times in seq, overlapping occurrences counted. count 0 disables."""
    if count <= 0 or len(seq) < window:
        return False
    if count == 1:
        return True
    if isinstance(seq, str):
        grams = Counter(seq[i:i + window] for i in range(len(seq) - window + 1))
    else:
        seq = tuple(seq)
        grams = Counter(seq[i:i + window] for i in range(len(seq) - window + 1))
    return max(grams.values()) >= count

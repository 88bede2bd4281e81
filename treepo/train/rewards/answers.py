"""Final answers: extract one from a response, normalise it, compare it with the gold answer.

Why this is more than a regex and string equality:
- The answer is the last complete \\boxed{...} (nested braces; text_rules), else the last
  "answer is X" / "Answer: X" / "#### X" / "<answer>X</answer>" form. A response without one
  of these scores -1 (docs/algorithm.md section 4): the model is not credited for a
  number that merely appears in its text.
- The normalised string / exact-number compare (answers_match) runs before math-verify in
  math_reward: a fast path that needs no sympy, and a fallback for the few forms math-verify
  misses (units, thousands commas, percentages).
"""
from __future__ import annotations

import re
from fractions import Fraction

from treepo.rollout.text_rules import boxed_spans

# ---------------------------------------------------------------------------- answer extraction

# Fallback forms, case-insensitive; the capture runs to the end of the line and is cleaned below.
#   "The answer is 42." / "the final answer is: $\frac12$"   ("answer is", optional colon)
#   "Answer: 42" / "**Final Answer:** 42"                     ("answer:")
#   "#### 42"                                                 (GSM8K)
#   "<answer>42</answer>"                                     (reasoning-gym's convention)
_FALLBACK = re.compile(
    r"\banswer\s*(?:is\b\s*:?|:)(?P<a>[^\n]*)"
    r"|####(?P<b>[^\n]*)"
    r"|<answer>(?P<c>.*?)</answer>",
    re.IGNORECASE | re.DOTALL)
_WRAPPERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _clean_fallback(s: str) -> str:
    s = s.strip()
    m = re.search(r"\.\s", s)  # a sentence ends there ("42. Because ..."); "3.5" is untouched
    if m:
        s = s[:m.start()]
    prev = None
    while s != prev:
        prev = s
        s = s.strip().lstrip(":").rstrip(".,;!").strip("*` ")
        for lo, hi in _WRAPPERS:
            if len(s) >= len(lo) + len(hi) and s.startswith(lo) and s.endswith(hi):
                s = s[len(lo):len(s) - len(hi)]
    return s


def extract_answer(text: str) -> str | None:
    """The final answer of a response, or None when it gives none.

    1. The content of the last non-empty complete \\boxed{...} / \\fbox{...} (nested braces).
       Empty boxes are skipped (models echo the instruction "put your answer in \\boxed{}").
    2. Else the last (by position) of: "answer is X" (also "answer is: X"), "Answer: X",
       "#### X", "<answer>X</answer>"; X runs to the end of its line, is cut at a sentence end
       (". "), and loses surrounding $...$, \\(...\\), **...** and a trailing period or comma.
    3. Else None (the reward is then -1).
    """
    if not isinstance(text, str):
        raise TypeError(f"response text must be str, got {type(text).__name__}")
    for s, e in reversed(boxed_spans(text)):
        content = text[text.index("{", s) + 1:e - 1].strip()
        if content:
            return content
    for m in reversed(list(_FALLBACK.finditer(text))):
        ans = _clean_fallback(next(g for g in m.groups() if g is not None))
        if ans:
            return ans
    return None


# ---------------------------------------------------------------------------- string compare

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\s*(?:\{([^{}]*)\}|(\w))\s*(?:\{([^{}]*)\}|(\w))")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/(?:\d+(?:\.\d*)?|\.\d+))?")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
# trailing unit words stripped after a number ("12 cm", "5 apples"); never one letter ("3 x")
_UNIT_TAIL = re.compile(r"^([+-]?[\d.,/]+)\s*((?:[a-zA-Z]{2,}\.?\s*)+)$")
_NOT_UNITS = {"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "exp"}


def normalize_answer(s: str) -> str:
    """A canonical string for comparing short final answers.

    Drops $, \\left/\\right, spacing commands, ^\\circ, a leading \\$; \\dfrac/\\tfrac -> \\frac;
    \\text{..}/\\mathrm{..}/\\mbox{..} -> their content; unit words after a number ("12 cm",
    "12 \\text{ cm}") -> the number; thousands commas (1,000 -> 1000; "1,2" is left alone);
    \\frac{a}{b} / \\frac12 -> a/b; all spaces removed; "%" and "\\%" -> "%" at the end; plain
    words casefolded ("Yes" -> "yes"). Numbers are compared by value in answers_match.
    """
    s = s.strip().replace("\u2212", "-")
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                 ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\ ", " "), ("~", " "),
                 ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("{,}", ","),
                 ("\\$", ""), ("$", ""), ("\\%", "%"), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        s = s.replace(a, b)
    prev = None
    while prev != s:  # inside-out for nested \text / \frac
        prev = s
        s = _TEXT_CMD.sub(lambda m: m.group(1), s)
        s = _FRAC.sub(lambda m: f"{_paren(m.group(1) or m.group(2))}/{_paren(m.group(3) or m.group(4))}", s)
    s = s.strip()
    percent = s.endswith("%")
    s = s.rstrip("%").strip()
    m = _UNIT_TAIL.match(s)
    if m and not set(m.group(2).lower().split()) & _NOT_UNITS:
        s = m.group(1)
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"[A-Za-z]{2,}", s):
        s = s.casefold()
    return s + ("%" if percent else "")


def _paren(x: str) -> str:
    x = x.strip()
    return x if re.fullmatch(r"[+-]?[\w.]+", x) else f"({x})"


def _as_number(s: str) -> Fraction | None:
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(gold: str, pred: str) -> bool:
    """Normalised string compare, then exact value compare for plain numbers (1/2 == 0.5 == 0.50).

    A percentage matches its value either way: "10%" equals "10" and "0.1"."""
    g, p = normalize_answer(gold), normalize_answer(pred)
    if g == p:
        return True
    gv, pv = _as_number(g.rstrip("%")), _as_number(p.rstrip("%"))
    if gv is None or pv is None:
        return False
    cands_g = {gv, gv / 100} if g.endswith("%") else {gv}
    cands_p = {pv, pv / 100} if p.endswith("%") else {pv}
    return bool(cands_g & cands_p)


def _distinct_integers(gold: str, pred: str) -> bool:
    """Both are plain integers and differ: no verifier can call them equal (skips math-verify)."""
    g, p = normalize_answer(gold), normalize_answer(pred)
    return bool(re.fullmatch(r"[+-]?\d+", g) and re.fullmatch(r"[+-]?\d+", p)) and int(g) != int(p)

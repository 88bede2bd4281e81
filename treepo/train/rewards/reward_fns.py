"""The reward functions the trainer picks from: +1.0 for a correct final answer, -1.0 otherwise.

See docs/algorithm.md section 4. Both take the answer that extract_answer finds (none ->
-1) and differ in who judges it:
- math_reward: answers_match (normalised string / exact number), then math-verify in its own
  worker process (verifier.py), so it is safe from any thread and never hangs a training step.
- gym_reward: task datasets with their own checker (reasoning-gym) use that checker, in its own
  worker process too (some checkers run sympy on the answer).
They live apart from verifier.py, which only runs the checkers, and apart from answers.py
because they decide the reward, not what the answer is.
"""
from __future__ import annotations

from . import verifier
from .answers import _distinct_integers, answers_match, extract_answer


def _boxed(s: str) -> str:
    return s if ("\\boxed" in s or "$" in s) else "\\boxed{" + s + "}"


def math_reward(response_text: str, gold: str, timeout_s: float | None = 5.0) -> float:
    """+1.0 if the response's final answer equals `gold`, else -1.0 (docs/algorithm.md, "Reward").

    answer = extract_answer(response_text); None -> -1. Equal if answers_match (normalised
    string / exact number compare, no sympy) or math-verify's verify(parse(gold), parse(answer))
    - gold first - with both wrapped in \\boxed{} so math-verify reads them as LaTeX. Two plain
    integers that differ are -1 without math-verify. Safe from any thread (see verifier.py).

    Raises RewardTimeout when math-verify runs past `timeout_s` seconds (its worker is killed and
    replaced; None: no deadline) and RuntimeError when math-verify itself fails; score_batch
    turns both into -1 and counts them as failures.
    """
    if not isinstance(gold, str):
        gold = str(gold)
    pred = extract_answer(response_text)
    if pred is None:
        return -1.0
    if answers_match(gold, pred):
        return 1.0
    if _distinct_integers(gold, pred):
        return -1.0
    return 1.0 if verifier.math_verify(_boxed(gold.strip()), _boxed(pred), timeout_s) else -1.0


def gym_reward(response_text: str, entry: dict, timeout_s: float | None = 5.0) -> float:
    """+1.0 / -1.0 from a reasoning-gym task's own checker.

    entry: one item of a reasoning-gym dataset ({"question", "answer", "metadata":
    {"source_dataset": name, ...}}). The extracted answer (extract_answer; None -> -1) is scored
    with the dataset's `score_answer(answer, entry)`, which returns a score in [0, 1] (partial
    credit for some tasks); only a full score (>= 1.0) counts as correct: +1, else -1. The checker
    runs in a worker process under a deadline of `timeout_s` seconds; it raises as math_reward does.
    """
    try:
        name = entry["metadata"]["source_dataset"]
    except (KeyError, TypeError):
        raise ValueError("gym entry needs entry['metadata']['source_dataset'] (a reasoning-gym dataset item); "
                         f"got {str(entry)[:200]}") from None
    answer = extract_answer(response_text)
    if answer is None:
        return -1.0
    return 1.0 if verifier.gym_score(name, answer, entry, timeout_s) >= 1.0 else -1.0

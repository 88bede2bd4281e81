"""The reward functions the trainer picks from: +1.0 for a correct final answer, -1.0 otherwise.

See docs/algorithm.md section 4. Both take the answer that extract_answer finds (none ->
-1) and differ in who judges it:
- math_reward: answers_match (normalised string / exact number), then math-verify in its own
  worker process (verifier.py), so it is safe from any thread and never hangs a training step.
- gym_reward: task datasets with their own checker (reasoning-gym) use that checker.
They live apart from verifier.py because gym_reward does not touch math-verify, and apart from
answers.py because they decide the reward, not what the answer is.
"""
from __future__ import annotations

import functools

from .answers import _distinct_integers, answers_match, extract_answer
from .verifier import _verifier


def _boxed(s: str) -> str:
    return s if ("\\boxed" in s or "$" in s) else "\\boxed{" + s + "}"


def math_reward(response_text: str, gold: str, timeout_s: float = 5.0) -> float:
    """+1.0 if the response's final answer equals `gold`, else -1.0 (docs/algorithm.md, "Reward").

    answer = extract_answer(response_text); None -> -1. Equal if answers_match (normalised
    string / exact number compare, no sympy) or math-verify's verify(parse(gold), parse(answer))
    - gold first - with both wrapped in \\boxed{} so math-verify reads them as LaTeX. Two plain
    integers that differ are -1 without math-verify. Safe from any thread (see verifier.py).

    Raises RewardTimeout when math-verify runs past `timeout_s` seconds (its worker is killed and
    restarted) and RuntimeError when math-verify itself fails; score_batch turns both into -1
    and counts them as failures.
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
    return 1.0 if _verifier.verify(_boxed(gold.strip()), _boxed(pred), timeout_s) else -1.0


@functools.lru_cache(maxsize=None)
def _gym_scorer(name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


def gym_reward(response_text: str, entry: dict) -> float:
    """+1.0 / -1.0 from a reasoning-gym task's own checker.

    entry: one item of a reasoning-gym dataset ({"question", "answer", "metadata":
    {"source_dataset": name, ...}}). The extracted answer (extract_answer; None -> -1) is scored
    with the dataset's `score_answer(answer, entry)`, which returns a score in [0, 1] (partial
    credit for some tasks); only a full score (>= 1.0) counts as correct: +1, else -1.
    """
    try:
        name = entry["metadata"]["source_dataset"]
    except (KeyError, TypeError):
        raise ValueError("gym entry needs entry['metadata']['source_dataset'] (a reasoning-gym dataset item); "
                         f"got {str(entry)[:200]}") from None
    answer = extract_answer(response_text)
    if answer is None:
        return -1.0
    score = _gym_scorer(name)(answer, entry)
    return 1.0 if score is not None and float(score) >= 1.0 else -1.0

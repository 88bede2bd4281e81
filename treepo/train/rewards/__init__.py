"""Rewards: +1 for a correct final answer, -1 otherwise (docs/algorithm.md section 4).

answers.py     extract_answer, normalize_answer, answers_match: what the final answer is, and the
               fast string / exact-number compare.
worker.py      WorkerPool: a function run in child processes killed at a deadline and replaced (the
               one mechanism for user reward functions and the checkers); they die with their parent.
verifier.py    math-verify and reasoning-gym's checkers in such workers (safe from any thread);
               checks.py is what those workers load.
reward_fns.py  math_reward (answers_match, then math-verify) and gym_reward (reasoning-gym's checker).
scoring.py     RewardFn, score_batch (each call in a worker under a deadline; failures score -1),
               RewardTimeout.
problems.py    ProblemScorer: the reward of a response to a training / evaluation Problem, with
               `--reward_fn module:function` or the built-in problem_reward (rollouts and evaluation).
"""
from .answers import answers_match, extract_answer, normalize_answer
from .reward_fns import gym_reward, math_reward
from .scoring import RewardFn, RewardTimeout, score_batch

__all__ = ["extract_answer", "normalize_answer", "answers_match", "math_reward", "gym_reward", "RewardFn",
           "score_batch", "RewardTimeout"]

"""The RL trainer: `treepo train` / `torchrun -m treepo.train` (see docs/training.md).

data (problems, prompts) -> rewards -> trainer (rollout, advantages, DAPO loss, FSDP2 update)
-> checkpoint (resumable DCP checkpoints, HF export) -> evaluate (mean@n, maj@n, pass@k).
Nothing heavy is imported here: `python -m treepo.train` runs __main__.py.
"""

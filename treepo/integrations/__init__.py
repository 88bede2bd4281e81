"""treepo inside other projects' trainers.

weight_sync.py  WeightSync: an Engine's weights kept equal to a training model's (shared or copied).
trl.py          Hugging Face TRL: `tree_rollout_func` (a GRPOTrainer rollout_func sampling TreePO
                trees on treepo's engine) and `TreePOGRPOTrainer` (TreePO tree advantages in TRL's
                loss). Imports trl, an optional extra: pip install "treepo[trl]".
For any other loop, `treepo.tree_generate` (treepo/tree_generate.py) is the plain-function API.
"""

"""Graph passes: each rewrites one kind of site and returns how many it rewrote."""

from .branch import insert_lora_branches
from .experts import insert_expert_branches
from .fold import fold_lora_weights
from .mixed import insert_mixed_lora_branch
from .substitute import substitute_tensors

__all__ = ["fold_lora_weights", "insert_expert_branches", "insert_lora_branches", "insert_mixed_lora_branch",
           "substitute_tensors"]

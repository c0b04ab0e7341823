"""Graph passes: each rewrites one kind of site and returns how many it rewrote."""

from .branch import insert_lora_branches
from .fold import fold_lora_weights
from .substitute import substitute_tensors

__all__ = ["fold_lora_weights", "insert_lora_branches", "substitute_tensors"]

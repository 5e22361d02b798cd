"""2:4 semi-structured sparsity: masks and their enforcement (the callback schedules them)."""
from hwaware.sparsity.masks import (
    PRUNABLE_TYPES, cubic_fraction, find_prunable, gradual_mask_24, is_mask_24, magnitude_mask_24, mask_sparsity,
    sr_ste_decay_, weight_2d,
)

__all__ = [
    "PRUNABLE_TYPES", "find_prunable", "weight_2d", "magnitude_mask_24", "gradual_mask_24", "is_mask_24",
    "mask_sparsity", "cubic_fraction", "sr_ste_decay_",
]

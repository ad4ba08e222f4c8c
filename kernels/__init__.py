"""Shared numerical primitives.

Each primitive has a plain torch reference implementation. Fused GPU variants, where they exist, are
selected at call time and tested against the reference on a GPU machine; on CPU the reference runs.
Nothing here imports ComfyUI, so these modules can be tested in isolation.
"""
from .lowrank import lowrank_forward, lowrank_merge, lowrank_delta_weight
from .losses import masked_mse, resize_mask_to
from .attention import attention, attention_reference

__all__ = [
    "lowrank_forward", "lowrank_merge", "lowrank_delta_weight",
    "masked_mse", "resize_mask_to",
    "attention", "attention_reference",
]

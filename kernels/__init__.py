"""Shared numerical primitives, in plain torch: low-rank deltas (bypass and merge), the masked ε-MSE, and
attention (``attention`` = PyTorch's fused ``scaled_dot_product_attention``, ``attention_reference`` = the explicit
softmax with access to the probabilities). There are no custom kernels: on a GPU, SDPA dispatches to PyTorch's
fused flash / memory-efficient kernels and the bypass runs in the base weights' dtype (tests/test_kernels_gpu.py
checks both against the float32 references). Nothing here imports ComfyUI, so these modules
can be tested in isolation.
"""
from .lowrank import lowrank_forward, lowrank_merge, lowrank_delta_weight
from .losses import masked_mse, resize_mask_to
from .attention import attention, attention_reference

__all__ = [
    "lowrank_forward", "lowrank_merge", "lowrank_delta_weight",
    "masked_mse", "resize_mask_to",
    "attention", "attention_reference",
]

"""Socket definitions shared by the node classes (one place for defaults, ranges and tooltips)."""
from __future__ import annotations

CATEGORY = "personalize"
LOSS_MAP = "LOSS_MAP"  # {"loss": [floats]}; the type ComfyUI's own training nodes use, so LossGraph plots it

MIXED_PRECISION = ["auto", "no", "bf16", "fp16"]


def seed(default=0):
    return ("INT", {"default": default, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                    "tooltip": "Seed for image order, timesteps and noise: the same seed gives the same result."})


def steps(default, tooltip="Optimisation steps."):
    return ("INT", {"default": default, "min": 1, "max": 100000, "tooltip": tooltip})


def learning_rate(default):
    return ("FLOAT", {"default": default, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                      "tooltip": "AdamW learning rate."})


def training_options() -> dict:
    """Optional inputs every training node has, in this order."""
    return {
        "mask": ("MASK", {"tooltip": "Subject masks (one per image, or one for all): the loss only counts "
                                     "pixels inside the mask, so backgrounds are not learned."}),
        "gradient_checkpointing": ("BOOLEAN", {"default": False,
                                               "tooltip": "Recompute activations in backward: less memory, ~30% slower."}),
        "mixed_precision": (MIXED_PRECISION, {"default": "auto",
                                              "tooltip": "GPU only: bf16/fp16 autocast ('auto' = bf16 where supported). "
                                                         "Ignored on CPU."}),
        "preview_every": ("INT", {"default": 0, "min": 0, "max": 100000,
                                  "tooltip": "Show a preview of the model's denoised guess every N steps (0 = only "
                                             "at the end)."}),
    }

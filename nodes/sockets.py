"""Socket definitions shared by the node classes (one place for custom types, defaults, ranges and tooltips).

The nodes use ComfyUI's V3 schema from one pinned public API version, ``comfy_api.v0_0_2`` (in ComfyUI since
v0.3.6x; the pack uses only what v0.3.64 and v0.3.75 both have). This module is imported by ``comfy_entrypoint``
(when ComfyUI loads the pack), never at the pack's import.
"""
from __future__ import annotations

import dataclasses

from comfy_api.v0_0_2 import io

CATEGORY = "personalize"

# Custom socket types, declared once. LOSS_MAP is the type ComfyUI's own training nodes output ({"loss": [floats]}),
# so core's LossGraph plots ours and ours plots theirs.
LossMap = io.LossMap
HiFiSubject = io.Custom("HIFI_SUBJECT")  # methods.hifi_tuner.Subject: global + step-wise rows
Inversion = io.Custom("INVERSION")  # methods.inversion.Inversion: trajectory, schedule, per-step null-text embeddings
PromptNet = io.Custom("PROMPTNET")  # networks.promptnet.PromptNet: ProFusion's encoder of S*
ProFusionReference = io.Custom("PROFUSION_REFERENCE")  # methods.profusion.Reference: reference latent + CLIP tokens

MIXED_PRECISION = ["auto", "no", "bf16", "fp16"]

_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def schema(*, search_aliases: list[str] | None = None, **kwargs) -> io.Schema:
    """``io.Schema`` of a pack node: hidden ``unique_id`` (progress bars and previews find their node by it) and
    search aliases where the host's schema has them (feature-detected: neither v0.3.64 nor v0.3.75 has the field,
    newer hosts do)."""
    if search_aliases and "search_aliases" in _SCHEMA_FIELDS:
        kwargs["search_aliases"] = search_aliases
    return io.Schema(**kwargs)


def node_id(cls) -> str | None:
    """The executing node's id (``io.Hidden.unique_id``); None when a script calls the node directly."""
    hidden = getattr(cls, "hidden", None)
    return hidden.unique_id if hidden is not None else None


def seed(default=0) -> io.Int.Input:
    return io.Int.Input("seed", default=default, min=0, max=0xFFFFFFFFFFFFFFFF,
                        tooltip="Seed for image order, timesteps and noise: the same seed gives the same result.")


def steps(default, tooltip="Optimisation steps.", name="steps") -> io.Int.Input:
    return io.Int.Input(name, default=default, min=1, max=100000, tooltip=tooltip)


def learning_rate(default) -> io.Float.Input:
    return io.Float.Input("learning_rate", default=default, min=1e-7, max=1.0, step=1e-5, round=False,
                          tooltip="AdamW learning rate.")


def overwrite() -> io.Boolean.Input:
    return io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name.")


def mask_input() -> io.Mask.Input:
    return io.Mask.Input("mask", optional=True,
                         tooltip="Subject masks (one per image, or one for all): the loss only counts pixels inside "
                                 "the mask, so backgrounds are not learned.")


def gradient_checkpointing() -> io.Boolean.Input:
    return io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                            tooltip="Recompute activations in backward: less memory, ~30% slower.")


def mixed_precision() -> io.Combo.Input:
    return io.Combo.Input("mixed_precision", options=MIXED_PRECISION, default="auto", optional=True,
                          tooltip="GPU only: bf16/fp16 autocast ('auto' = bf16 where supported). Ignored on CPU.")


def preview_every() -> io.Int.Input:
    return io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                        tooltip="Show a preview of the model's denoised guess every N steps (0 = only at the end).")


def training_options() -> list:
    """Optional inputs every training node has, in this order."""
    return [mask_input(), gradient_checkpointing(), mixed_precision(), preview_every()]

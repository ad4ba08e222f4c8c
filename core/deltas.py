"""Weight deltas on UNet and text-encoder layers: train by bypass, apply by the host's own weight patches.

Low rank (:class:`LowRankDeltas`): training attaches each delta to its layer with
:func:`graph_patches.override_forward` (``W x + s·B A x``; only ``A``/``B`` get gradients). Inference never uses
this path: the deltas are saved with kohya key names (``lora_unet_…``/``lora_te…`` + ``.lora_down.weight``/
``.lora_up.weight``/``.alpha``) and applied with the host's own ``comfy.sd.load_lora_for_models`` — the code path
of the stock ``LoraLoader`` in both hosts.

Full rank (:class:`FullRankDeltas`, ProFusion's test-time tuning of q/k/v, methods.md §5.6): one dense ``ΔW`` per
layer, trained by the same bypass (``W x + ΔW x``) and applied to a ``model.clone()`` as plain ModelPatcher weight
patches (``add_patches({key: ("diff", (ΔW,))})``, merged ``W + ΔW`` by the host when it loads the clone and
removed when it unloads it).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

import comfy.lora
import comfy.sd

from ..kernels.lowrank import lowrank_forward
from .graph_patches import override_forward
from .host import PersonalizeError

# Which layers a delta goes on. Patterns match module paths relative to the UNet / a text encoder.
UNET_TARGETS = {
    "attention": re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    "all_linear": re.compile(r"(\.attn[12]\.(to_q|to_k|to_v|to_out\.0)|\.ff\.net\.(0\.proj|2)|\.proj_in|\.proj_out)$"),
    "qkv": re.compile(r"\.attn[12]\.(to_q|to_k|to_v)$"),  # ProFusion (§5.6): q/k/v of self- and cross-attention
}
TEXT_TARGETS = {
    "attention": re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"),
    "all_linear": re.compile(r"(\.self_attn\.(q_proj|k_proj|v_proj|out_proj)|\.mlp\.(fc1|fc2))$"),
}


@dataclass
class DeltaSpec:
    weight_key: str     # state-dict key in the patcher's model, e.g. "diffusion_model.<path>.weight"
    module_path: str    # attribute path relative to patcher.model
    kohya_name: str     # e.g. "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    in_features: int
    out_features: int


def _kohya_names(key_map: dict, prefixes: tuple[str, ...]) -> dict:
    """Invert the host's LoRA key map: weight key -> the first kohya name with one of ``prefixes``."""
    out: dict = {}
    for prefix in prefixes:
        for name, key in key_map.items():
            if isinstance(key, str) and name.startswith(prefix) and key not in out:
                out[key] = name
    return out


def find_unet_targets(model, layers: str) -> list[DeltaSpec]:
    pattern = UNET_TARGETS[layers]
    names = _kohya_names(comfy.lora.model_lora_keys_unet(model.model, {}), ("lora_unet_",))
    specs = []
    for path, mod in model.model.diffusion_model.named_modules():
        if isinstance(mod, torch.nn.Linear) and pattern.search("." + path):
            key = f"diffusion_model.{path}.weight"
            if key in names:
                specs.append(DeltaSpec(key, f"diffusion_model.{path}", names[key], mod.in_features, mod.out_features))
    if not specs:
        raise PersonalizeError(f"No UNet layers matched '{layers}'; is this a Stable Diffusion UNet?")
    return specs


def find_text_targets(clip, layers: str, family: str) -> list[DeltaSpec]:
    pattern = TEXT_TARGETS[layers]
    prefixes = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
    names = _kohya_names(comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}), prefixes)
    specs = []
    for path, mod in clip.cond_stage_model.named_modules():
        if isinstance(mod, torch.nn.Linear) and pattern.search("." + path):
            key = f"{path}.weight"
            if key in names:
                specs.append(DeltaSpec(key, path, names[key], mod.in_features, mod.out_features))
    return specs


class LowRankDeltas(torch.nn.Module):
    """A set of LoRA deltas ``ΔW = (alpha/r)·up @ down`` (Hu et al. 2021, Eq. 3) keyed by kohya name.

    ``down`` starts Kaiming-uniform, ``up`` at zero, so the model is unchanged at step 0.
    """

    def __init__(self, specs: list[DeltaSpec], rank: int, alpha: float | None = None, generator=None):
        super().__init__()
        if rank < 1:
            raise PersonalizeError("LoRA rank must be at least 1.")
        self.specs = {s.kohya_name: s for s in specs}
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        for s in specs:
            bound = 1.0 / math.sqrt(s.in_features)
            d = (torch.rand(rank, s.in_features, generator=generator) * 2 - 1) * bound
            self.down[s.kohya_name] = torch.nn.Parameter(d)
            self.up[s.kohya_name] = torch.nn.Parameter(torch.zeros(s.out_features, rank))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def attach(self, patcher) -> None:
        """Add each delta to its layer's output on ``patcher`` (a clone being trained) by bypass."""
        scale = self.scale
        for name, spec in self.specs.items():
            down, up = self.down[name], self.up[name]

            def fn(base, x, *args, _d=down, _u=up, **kwargs):
                return base(x, *args, **kwargs) + lowrank_forward(x, _d, _u, scale)

            override_forward(patcher, spec.module_path, fn)

    def kohya_state_dict(self, dtype=torch.float16) -> dict:
        sd = {}
        for name in self.specs:
            sd[f"{name}.lora_down.weight"] = self.down[name].detach().to("cpu", dtype).contiguous()
            sd[f"{name}.lora_up.weight"] = self.up[name].detach().to("cpu", dtype).contiguous()
            sd[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return sd


class FullRankDeltas(torch.nn.Module):
    """Dense weight deltas ``ΔW`` [out, in], one per layer (keyed by kohya name), zero at the start so the model
    is unchanged at step 0. ProFusion tunes the UNet's ``to_q``/``to_k``/``to_v`` this way (methods.md §5.6; the
    official notebook trains those weights themselves - ``W + ΔW`` with ``ΔW`` trained is the same optimisation:
    AdamW's update and weight decay act on the trained tensor, so the decay pulls ``ΔW`` to 0, not ``W``).

    * training: :meth:`attach` adds ``ΔW x`` to the layer's output by bypass (``W x + ΔW x``) on a clone being
      trained - the host's weights stay as they are and only ``ΔW`` gets gradients;
    * output: :meth:`patched` returns ``model.clone()`` with ``("diff", (ΔW,))`` weight patches - the host adds
      ``ΔW`` to ``W`` when it loads the clone (as for any LoRA) and removes it when it unloads it, so the input
      MODEL is untouched."""

    def __init__(self, specs: list[DeltaSpec]):
        super().__init__()
        if not specs:
            raise PersonalizeError("No layers to put full-rank deltas on.")
        self.specs = {s.kohya_name: s for s in specs}
        self.delta = torch.nn.ParameterDict(
            {s.kohya_name: torch.nn.Parameter(torch.zeros(s.out_features, s.in_features)) for s in specs})

    def attach(self, patcher) -> None:
        """Add each delta to its layer's output on ``patcher`` (a clone being trained) by bypass."""
        for name, spec in self.specs.items():
            def fn(base, x, *args, _d=self.delta[name], **kwargs):
                return base(x, *args, **kwargs) + torch.nn.functional.linear(x, _d.to(x.dtype))

            override_forward(patcher, spec.module_path, fn)

    def weight_patches(self) -> dict:
        """``{weight key: ("diff", (ΔW,))}``: the deltas as ComfyUI weight patches (float32 CPU copies; the host
        casts them to the weight's device and dtype when it patches)."""
        return {spec.weight_key: ("diff", (self.delta[name].detach().to("cpu", torch.float32).clone(),))
                for name, spec in self.specs.items()}

    def patched(self, model):
        """A clone of ``model`` (ModelPatcher) with every delta added as a removable weight patch."""
        out = model.clone()
        patches = self.weight_patches()
        added = out.add_patches(patches, 1.0)
        if len(added) != len(patches):
            missing = sorted(set(patches) - set(added))
            raise PersonalizeError(f"Full-rank deltas: {len(missing)} layer(s) are not in this MODEL "
                                   f"({', '.join(missing[:2])}…); the deltas were trained on another model.")
        return out


def apply_lora(model, clip, lora_sd: dict, strength_model: float = 1.0, strength_clip: float = 1.0):
    """Apply a kohya-format LoRA exactly as the stock LoraLoader does; returns new (MODEL, CLIP) clones."""
    return comfy.sd.load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip)

"""Thin access to the ComfyUI host (the supported releases: v0.3.64 to v0.3.75 and later).

Whatever differs between supported hosts is resolved here by looking for the feature, never by version numbers;
today the pack's host calls are the same in all of them.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management as mm
import comfy.utils

log = logging.getLogger("comfyui_personalize")

# model_config class name -> family. Families name what the pack's methods support.
_FAMILY_BY_CONFIG = {
    "SD15": "sd1", "SD15Mini": "sd1",  # SD15Mini: the pack's mini family (core/mini_family.py), SD1 architecture
    "SD20": "sd2", "SD21UnclipL": "sd2-unclip", "SD21UnclipH": "sd2-unclip",
    "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl", "KOALA_1B": "sdxl",
    "SDXLRefiner": "sdxl-refiner",
}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


class PersonalizeError(ValueError):
    """A user-facing error: says what is wrong and how to fix it. Raised before any work starts."""


# ComfyUI's error dialog titles an error with execution.full_type_name: ``__module__ + "." + __qualname__``. The
# loader imports the pack under its directory path, so the real module name reads
# ".../custom_nodes/comfyui-personalize.core.host"; users see "personalize.PersonalizeError" instead.
PersonalizeError.__module__ = "personalize"


def join_names(names) -> str:
    """'A', 'A or B', 'A, B or C'."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def model_family(model) -> str:
    """Family of a MODEL (ModelPatcher): 'sd1', 'sd2', 'sdxl', or the model config's class name."""
    config = getattr(model.model, "model_config", None)
    name = type(config).__name__ if config is not None else type(model.model).__name__
    return _FAMILY_BY_CONFIG.get(name, name)


def clip_family(clip) -> str:
    """Family of a CLIP object from the text encoders it holds."""
    csm = clip.cond_stage_model
    if hasattr(csm, "clip_g") and hasattr(csm, "clip_l"):
        return "sdxl"
    if hasattr(csm, "clip_g"):
        return "sdxl-refiner"
    if hasattr(csm, "clip_h"):
        return "sd2"
    if hasattr(csm, "clip_l"):
        return "sd1"
    return type(csm).__name__


def require_family(node: str, model=None, clip=None, supported=("sd1", "sd2", "sdxl")) -> str:
    """Check that MODEL (and CLIP) belong to a supported family and to the same one; return the family."""
    fam_m = model_family(model) if model is not None else None
    fam_c = clip_family(clip) if clip is not None else None
    names = join_names(FAMILY_NAMES.get(s, s) for s in supported)
    for fam, what in ((fam_m, "MODEL"), (fam_c, "CLIP")):
        if fam is not None and fam not in supported:
            raise PersonalizeError(
                f"{node}: the {what} is a '{fam}' model, which this node does not support. "
                f"Load an {names} checkpoint (for example with Load Checkpoint).")
    if fam_m and fam_c and fam_m != fam_c:
        raise PersonalizeError(
            f"{node}: the MODEL is {FAMILY_NAMES.get(fam_m, fam_m)} but the CLIP is {FAMILY_NAMES.get(fam_c, fam_c)}. "
            "Connect the MODEL and CLIP outputs of the same checkpoint loader.")
    return fam_m or fam_c


def model_sampling(model):
    """The model_sampling object a sampler would use (object patches such as ModelSamplingDiscrete included)."""
    return model.get_model_object("model_sampling")


def load_for_compute(*patchers) -> None:
    """Load and patch models on the compute device, fully (no low-VRAM partial load)."""
    mm.load_models_gpu(list(patchers), force_full_load=True)


def release(*patchers) -> None:
    """Unload the given patchers (our private clones) if they are loaded, with the host's own unload call, so no
    patch of ours outlives the node: ``free_memory`` of everything on their devices except the other loaded
    models (``keep_loaded``), which unpatches each of ours (``LoadedModel.model_unload``) and drops it from the
    host's list. Other models stay loaded."""
    ids = {id(p) for p in patchers}
    entries = list(mm.current_loaded_models)  # read only: the host's own call below changes the list
    others = [e for e in entries if id(e.model) not in ids]
    for device in {e.device for e in entries if id(e.model) in ids}:
        mm.free_memory(float("inf"), device, keep_loaded=others)


def progress_bar(total: int, node_id=None):
    return comfy.utils.ProgressBar(total, node_id=node_id)


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()


def intermediate_device() -> torch.device:
    return mm.intermediate_device()


def encode_text(clip, text: str):
    """Encode a prompt with a CLIP object: returns ``(cond [1, 77k, d], pooled or None)``. Portable."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def make_conditioning(cond: torch.Tensor, pooled) -> list:
    """A CONDITIONING list in the form stock CLIPTextEncode returns."""
    extra = {"pooled_output": pooled} if pooled is not None else {}
    return [[cond, extra]]


def uninference(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers of ``module`` by normal tensors with the same values.

    Loader nodes run under ``torch.inference_mode()``, so a checkpoint's weights are inference tensors and
    autograd refuses to save them for backward. Must be called with inference mode
    off. The module is shared with other nodes; values are unchanged, so this is invisible to them.
    Returns the number of tensors replaced.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("uninference() must run outside torch.inference_mode()")
    n = 0
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and _lacks_version_counter(p):
                m._parameters[k] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                n += 1
        for k, b in list(m._buffers.items()):
            if b is not None and _lacks_version_counter(b):
                m._buffers[k] = b.detach().clone()
                n += 1
    return n


def _lacks_version_counter(t: torch.Tensor) -> bool:
    """True for inference tensors and for the half-converted ones ``Module.to(device)`` leaves behind.

    Moving a module assigns ``param.data = moved`` (``set_data``): a Parameter created under inference mode then
    reports ``is_inference() == False`` but still has no version counter, so autograd fails on it with
    "Inference tensors do not track version counter". That happens whenever the host moves a loader's weights to
    the GPU outside inference mode (on the CPU nothing moves and the weights stay plain inference tensors)."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False

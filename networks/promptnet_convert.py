"""The ProFusion authors' released PromptNet (a diffusers ``PromptNetModel``, the ``promptnet`` folder of their
``StableDiffusionPromptNetPipeline.save_pretrained`` output) as this pack's :class:`~.promptnet.PromptNet`.
Specification: ../shared/docs/methods.md §5.3 (architecture) and §5.8 (released weights).

The official model is a diffusers UNet encoder half (``conv_in``, ``time_embedding``, ``down_blocks``, ``mid_block``)
with ProFusion's additions; ours is ComfyUI's own ``UNetModel`` encoder half with the same additions
(networks/promptnet.py), so the conversion is a renaming plus the UNet config written the way ComfyUI's model
detection writes it:

* UNet tensors: diffusers names → ``encoder.`` + ComfyUI (ldm) names, through the host's own
  ``comfy.utils.unet_to_diffusers`` map for the UNet config (restricted to the encoder half);
* ``promptnet_cond_embedding.conv_in/conv_out`` → ``cond_embedding.*``; ``vision_embedding`` → ``vision_proj``;
  ``first_prompt_projection`` → ``prompt_projections.0``; ``down_prompt_projections.{i}`` →
  ``prompt_projections.{i+1}``; ``mid_prompt_projection`` → ``prompt_projections.{levels+1}``;
  ``region_prompt_output`` → ``prompt_out``;
* ``residual_projections*``, ``residual_projections_2*``, ``mid_residual_projection*``: the ControlNet-like residual
  outputs, computed but unused by the official pipeline (``res_scale = 0``), are dropped.

Anything else (an unknown tensor, a shape that does not fit, a config our network cannot express) is refused with a
:class:`PersonalizeError` saying what and why, never converted approximately.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..core.host import PersonalizeError
from .promptnet import PromptNet, encoder_config

log = logging.getLogger("comfyui_personalize")

#: the official ``PromptNetModel.__init__`` defaults (diffusers fills a missing config key with them)
OFFICIAL_DEFAULTS = {
    "in_channels": 4, "region_kernel_size": 8, "region_proj_channel": 128, "prompt_channel": 1024,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "block_out_channels": [160, 320, 640, 640], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1024, "attention_head_dim": 8, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "with_noise": False,
}

#: config entries ComfyUI's UNetModel (and so our PromptNet) has fixed: official name → the one value it can take
FIXED = {
    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3,
}

DOWN_BLOCKS = {"CrossAttnDownBlock2D": 1, "DownBlock2D": 0}  # → transformer depth of the level

#: official head/embedding module → ours
HEAD_NAMES = {"promptnet_cond_embedding.": "cond_embedding.", "vision_embedding.": "vision_proj.",
              "first_prompt_projection.": "prompt_projections.0.", "region_prompt_output.": "prompt_out."}

#: the unused residual outputs (``res_scale = 0``), dropped
UNUSED = re.compile(r"^(residual_projections|residual_projections_2|mid_residual_projection|"
                    r"mid_residual_projection_2)\.")

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _refuse(what: str) -> PersonalizeError:
    return PersonalizeError(f"ProFusion converter: {what}")


def _heads(channels: list[int], heads: list[int], attention_levels: list[int]) -> tuple[int, int]:
    """ComfyUI's ``(num_heads, num_head_channels)`` for diffusers' per-level head counts (diffusers'
    ``attention_head_dim`` is the number of heads: SD2 ``[5, 10, 20, 20]``, SD1 ``8``), written as ComfyUI's own
    configs write them: a fixed head width of 64 as SD2/SDXL (``num_heads -1, num_head_channels 64``), else a fixed
    number of heads as SD1 (``num_heads 8, num_head_channels -1``), else a fixed head width of another size."""
    dims, counts = set(), set()
    for level in attention_levels:
        if heads[level] <= 0 or channels[level] % heads[level]:
            raise _refuse(f"level {level} has {channels[level]} channels, not divisible into {heads[level]} "
                          "attention heads; this is not a Stable-Diffusion UNet.")
        dims.add(channels[level] // heads[level])
        counts.add(heads[level])
    if not attention_levels:
        raise _refuse("the UNet has no cross-attention level; PromptNet reads the CLIP vision tokens through one.")
    if dims == {64}:
        return -1, 64
    if len(counts) == 1:
        return counts.pop(), -1
    if len(dims) == 1:
        return -1, dims.pop()
    raise _refuse(f"attention heads {heads} over channels {channels} give neither a fixed number of heads nor a "
                  "fixed head width, which ComfyUI's UNet cannot express.")


def unet_config_from_official(config: dict) -> dict:
    """The ComfyUI ``unet_config`` (encoder half, :func:`~.promptnet.encoder_config` form) of an official PromptNet
    ``config.json`` (or a diffusers UNet's); refuses one our network cannot express."""
    c = {**OFFICIAL_DEFAULTS, **config}
    for key, value in FIXED.items():
        if c[key] != value and not (isinstance(value, float) and abs(float(c[key]) - value) < 1e-12):
            raise _refuse(f"config.json sets {key} = {c[key]!r}; ComfyUI's Stable-Diffusion UNet (and so the pack's "
                          f"PromptNet) only has {key} = {value!r}. This is not an SD1/SD2-style PromptNet.")
    channels = [int(x) for x in c["block_out_channels"]]
    types = list(c["down_block_types"])
    levels = len(channels)
    if len(types) != levels:
        raise _refuse(f"config.json has {len(types)} down_block_types for {levels} block_out_channels.")
    unknown = sorted(set(types) - set(DOWN_BLOCKS))
    if unknown:
        raise _refuse(f"down block type(s) {unknown} are not supported (only {sorted(DOWN_BLOCKS)}).")
    only_cross = c["only_cross_attention"]
    if only_cross is True or (isinstance(only_cross, (list, tuple)) and any(only_cross)):
        raise _refuse("config.json sets only_cross_attention, which ComfyUI's SD UNet does not have.")
    base = channels[0]
    if any(ch % base for ch in channels):
        raise _refuse(f"block_out_channels {channels} are not multiples of the first ({base}).")
    if any(ch % 32 for ch in channels):
        raise _refuse(f"block_out_channels {channels} are not multiples of 32 (ComfyUI's UNet normalises in 32 "
                      "groups).")
    heads = c["attention_head_dim"]
    heads = [int(heads)] * levels if isinstance(heads, int) else [int(h) for h in heads]
    if len(heads) != levels:
        raise _refuse(f"attention_head_dim {heads} does not have one entry per level ({levels}).")
    attention_levels = [i for i, t in enumerate(types) if DOWN_BLOCKS[t]] + [levels - 1]  # + the middle block
    num_heads, head_channels = _heads(channels, heads, sorted(set(attention_levels)))
    layers = int(c["layers_per_block"])
    unet = {
        "in_channels": int(c["in_channels"]),
        "model_channels": base,
        "num_res_blocks": [layers] * levels,
        "channel_mult": [ch // base for ch in channels],
        "transformer_depth": [DOWN_BLOCKS[t] for t in types for _ in range(layers)],
        "transformer_depth_middle": 1,
        "context_dim": int(c["cross_attention_dim"]),
        "num_heads": num_heads,
        "num_head_channels": head_channels,
        "use_linear_in_transformer": bool(c["use_linear_projection"]),
    }
    return encoder_config(unet)


def family_of(unet: dict) -> str:
    """'sd2' for a UNet with linear transformer projections (SD2.x), 'sd1' for one with 1×1 convolutions (SD1.x),
    as ComfyUI's model detection tells them apart."""
    return "sd2" if unet["use_linear_in_transformer"] else "sd1"


def unet_key_map(unet: dict, encoder_keys) -> dict[str, str]:
    """diffusers UNet tensor name → ComfyUI ``encoder.`` name, for the tensors of the encoder half: the host's own
    ``comfy.utils.unet_to_diffusers`` map of the full UNet, restricted to ``encoder_keys``."""
    import comfy.utils
    full = dict(unet, transformer_depth_output=[0] * sum(b + 1 for b in unet["num_res_blocks"]))
    wanted = set(encoder_keys)
    return {diffusers: "encoder." + ldm for diffusers, ldm in comfy.utils.unet_to_diffusers(full).items()
            if ldm in wanted}


def head_key(key: str, levels: int) -> str | None:
    """Our name of an official PromptNet head/embedding tensor, None if ``key`` is none of them."""
    for theirs, ours in HEAD_NAMES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    m = re.match(r"^down_prompt_projections\.(\d+)\.(.+)$", key)
    if m:
        return f"prompt_projections.{int(m.group(1)) + 1}.{m.group(2)}"
    if key.startswith("mid_prompt_projection."):
        return f"prompt_projections.{levels + 1}." + key[len("mid_prompt_projection."):]
    return None


def _shape(state_dict: dict, key: str, what: str) -> torch.Size:
    if key not in state_dict:
        raise _refuse(f"the weights have no '{key}' ({what}); this is not a ProFusion PromptNet.")
    return state_dict[key].shape


def convert_official(state_dict: dict, config: dict) -> PromptNet:
    """Our PromptNet (float32) holding the official PromptNet's weights: ``state_dict`` the official
    ``PromptNetModel.state_dict()``, ``config`` its ``config.json``. Every official tensor is used except the
    unused residual projections; every one of ours is filled; anything else is refused."""
    unet = unet_config_from_official(config)
    levels = len(unet["channel_mult"])
    c = {**OFFICIAL_DEFAULTS, **config}
    vision = _shape(state_dict, "vision_embedding.weight", "the CLIP-vision projection")
    head = _shape(state_dict, "first_prompt_projection.weight", "the first prompt projection")
    out = _shape(state_dict, "region_prompt_output.weight", "the prompt output")
    downsize = max(2 ** (levels - 1), 8)  # the official PromptNetModel's
    region_kernel = int(c["region_kernel_size"])
    if (head[2], out[2]) != (downsize, region_kernel):
        raise _refuse(f"the prompt head's kernels ({head[2]}, {out[2]}) are not the official ({downsize}, "
                      f"{region_kernel}) for a UNet of {levels} levels and region_kernel_size {region_kernel}.")
    if not c.get("with_noise", False):
        log.warning("ProFusion converter: config.json does not set with_noise; the pack's PromptNet always reads "
                    "the noisy latent x_t through promptnet_cond_embedding (the released model has with_noise=True)")
    net = PromptNet(family=family_of(unet), unet=unet, vision_width=int(vision[1]), text_width=int(out[0]),
                    head_width=int(head[0]), downsize=downsize, region_kernel=region_kernel)
    ours = net.state_dict()
    unet_map = unet_key_map(unet, net.encoder.state_dict().keys())
    converted, dropped, unknown, wrong = {}, [], [], []
    for key, value in state_dict.items():
        target = unet_map.get(key) or head_key(key, levels)
        if target is None:
            (dropped if UNUSED.match(key) else unknown).append(key)
            continue
        if target not in ours:
            unknown.append(key)
        elif ours[target].shape != value.shape:
            wrong.append(f"{key} {tuple(value.shape)} ≠ {tuple(ours[target].shape)}")
        else:
            converted[target] = value
    missing = sorted(set(ours) - set(converted))
    if unknown or wrong or missing:
        parts = [f"{what}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''} ({len(keys)})"
                 for what, keys in (("unknown tensors", sorted(unknown)), ("wrong shapes", sorted(wrong)),
                                    ("missing tensors", [k for k in missing])) if keys]
        raise _refuse("the weights do not fit the PromptNet their config.json describes (" + "; ".join(parts) +
                      "). Give the promptnet folder of the official ProFusion pipeline (drboog/ProFusion, "
                      "'Download a model pre-trained on FFHQ') as it was released.")
    if dropped:
        log.info("ProFusion converter: dropped %d tensors of the unused residual projections (residual_projections*, "
                 "mid_residual_projection*; the official pipeline uses them with res_scale = 0)", len(dropped))
    with torch.no_grad():
        net.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()})
    log.info("ProFusion converter: %d official tensors → %s", len(converted), net.describe())
    return net


def read_official_folder(folder) -> tuple[dict, dict]:
    """``(state_dict, config)`` of the PromptNet in an official pipeline folder (or of a ``promptnet`` folder
    itself): ``config.json`` and ``diffusion_pytorch_model.safetensors`` or ``.bin`` (read with
    ``torch.load(weights_only=True)``: tensors only, no code)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise _refuse(f"{folder} is not a folder. Give the folder of the downloaded ProFusion pipeline (the one "
                      "holding promptnet/, unet/, vae/, ...), unpacked.")
    sub = folder / "promptnet"
    if not sub.is_dir():
        if (folder / "config.json").is_file() and any((folder / f).is_file() for f in WEIGHT_FILES):
            sub = folder
        else:
            raise _refuse(f"{folder} has no promptnet/ folder. Give the folder of the downloaded ProFusion pipeline "
                          "(it holds promptnet/, unet/, vae/, ...; unpack the download first).")
    try:
        config = json.loads((sub / "config.json").read_text())
    except FileNotFoundError:
        raise _refuse(f"{sub} has no config.json; the download is incomplete. Download the pipeline again.") from None
    except ValueError as e:
        raise _refuse(f"{sub / 'config.json'} is not valid JSON ({e}). Download the pipeline again.") from e
    if config.get("_class_name", "PromptNetModel") != "PromptNetModel":
        raise _refuse(f"{sub / 'config.json'} describes a {config['_class_name']}, not a PromptNetModel.")
    for name in WEIGHT_FILES:
        path = sub / name
        if path.is_file():
            break
    else:
        raise _refuse(f"{sub} has no weights ({' or '.join(WEIGHT_FILES)}); the download is incomplete. Download "
                      "the pipeline again.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise many types
        raise _refuse(f"{path} could not be read ({type(e).__name__}: {e}). Download the pipeline again.") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _refuse(f"{path} does not hold a plain state dict of tensors.")
    log.info("ProFusion converter: read %d tensors from %s", len(state), path)
    return state, config


def convert_folder(folder) -> PromptNet:
    """:func:`convert_official` of the PromptNet in an official pipeline folder."""
    state, config = read_official_folder(folder)
    return convert_official(state, config)

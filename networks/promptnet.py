"""ProFusion's PromptNet (Zhou et al. 2023, arXiv 2305.13579, §3.1 and Fig. 2; the official
``diffusers/models/promptnet.py``), built from the host UNet's own encoder half. Specification:
../shared/docs/methods.md §5.3.

``S* = PromptNet(x_ref, t, c_img, x_t)``: one word embedding from the clean reference latent ``x_ref``, the timestep
``t``, the reference image's CLIP-vision tokens ``c_img`` and the current noisy latent ``x_t``:

* **encoder** - ComfyUI's ``UNetModel`` with its decoder removed: ``time_embed``, ``input_blocks`` (``conv_in``, the
  down levels) and ``middle_block`` of the MODEL's own architecture, initialised from the MODEL's weights like a
  ControlNet. Its cross-attention reads ``vision_proj(c_img)``, a linear map from the CLIP-vision width to the
  UNet's context width (official ``vision_embedding``: 1280 → 1024 for OpenCLIP ViT-H/14 on SD2);
* **noisy-latent embedding** (official ``promptnet_cond_embedding``): ``conv 3×3 (C→w) · SiLU · conv 3×3 (w→w)`` of
  ``x_t``, **added** to ``conv_in(x_ref)``;
* **prompt head**: the ``conv_in`` output, every down level's output (after its downsampler) and the middle block's
  output, each reduced by ``Conv2d(C_k → head_width, kernel = stride = s_k)`` to the same grid
  (``s_0 = downsize``, halved after every level that downsamples; official ``first_prompt_projection``,
  ``down_prompt_projections``, ``mid_prompt_projection``), concatenated and reduced by
  ``Conv2d(n·head_width → text_width, kernel = stride = region_kernel)`` (``region_prompt_output``) to one token per
  ``region_kernel``² cell: one token of the text encoder's width for latents of ``latent_size = downsize ·
  region_kernel`` (64 for the official SD2 model: ``downsize = region_kernel = 8``).

The official model's ControlNet-like residual outputs are computed but unused (``res_scale = 0``); they are not
built here (the converter drops them, scripts/convert_profusion.py).

Supported base models: SD1.x, SD2.x (ε and v) and the mini family - any ``UNetModel`` without class/ADM conditioning.
SDXL (ADM conditioning) is refused with a clear error.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core import artifacts
from ..core.host import FAMILY_NAMES, PersonalizeError
from .base import Network

PACK_MODELS = Path(__file__).resolve().parents[1] / "models"

PROMPTNET_FILE = artifacts.kind(
    kind="promptnet", title="PromptNet", folder="promptnet", subdir=("promptnet",),
    shipped=PACK_MODELS / "promptnet",
    made_by="scripts/pretrain_promptnet.py (make mini-world), ProFusion Tune, or scripts/convert_profusion.py")

#: the UNet-config entries that fix the encoder half's architecture (the rest - decoder, dtype - do not)
ENCODER_KEYS = ("in_channels", "model_channels", "num_res_blocks", "channel_mult", "transformer_depth",
                "transformer_depth_middle", "context_dim", "num_heads", "num_head_channels", "use_linear_in_transformer")
#: their values where a config does not state them (ComfyUI's ``UNetModel`` defaults)
ENCODER_DEFAULTS = {"num_heads": -1, "num_head_channels": -1, "use_linear_in_transformer": False,
                    "transformer_depth_middle": None}


def encoder_config(unet_config: dict) -> dict:
    """The JSON-able entries of a ComfyUI ``unet_config`` that fix the encoder half (lists, not tuples)."""
    out = {}
    for key in ENCODER_KEYS:
        value = unet_config.get(key, ENCODER_DEFAULTS.get(key))
        if value is None and key not in ENCODER_DEFAULTS:
            raise PersonalizeError(f"PromptNet: the UNet config has no '{key}'; it is not a Stable-Diffusion UNet.")
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    if isinstance(out["num_res_blocks"], int):
        out["num_res_blocks"] = [out["num_res_blocks"]] * len(out["channel_mult"])
    if isinstance(out["transformer_depth"], int):
        out["transformer_depth"] = [out["transformer_depth"]] * len(out["channel_mult"])
    return out


def base_model(model):
    """The host's ``BaseModel`` of a MODEL: a ModelPatcher's ``.model``, or the BaseModel itself (what a sampler's
    guider holds as ``inner_model``)."""
    return model if hasattr(model, "diffusion_model") else getattr(model, "model", model)


def model_unet_config(model) -> dict:
    """The ``unet_config`` of a MODEL (ModelPatcher, or its ``BaseModel``), refused unless it is a ``UNetModel``
    PromptNet can copy."""
    base = base_model(model)
    config = getattr(getattr(base, "model_config", None), "unet_config", None)
    unet = getattr(base, "diffusion_model", None)
    if config is None or unet is None or not hasattr(unet, "input_blocks") or not hasattr(unet, "middle_block"):
        raise PersonalizeError(f"PromptNet: this MODEL ({type(base).__name__}) is not a Stable-Diffusion-style "
                               "UNet. PromptNet supports SD1.x, SD2.x and the mini family; load such a checkpoint.")
    if config.get("adm_in_channels") or config.get("num_classes"):
        raise PersonalizeError("PromptNet: this MODEL has class/ADM conditioning (SDXL and its relatives), which "
                               "PromptNet does not support yet. Use an SD1.x or SD2.x checkpoint.")
    return config


def level_layout(config: dict) -> list[int]:
    """Index in ``input_blocks`` of the last block of every down level (its downsampler where it has one): the
    blocks whose outputs the prompt head reads (``input_blocks[0]`` is ``conv_in``)."""
    n, out = 0, []
    levels = len(config["channel_mult"])
    for level, blocks in enumerate(config["num_res_blocks"]):
        n += blocks
        if level < levels - 1:
            n += 1  # the downsampler
        out.append(n)
    return out


def level_channels(config: dict) -> list[int]:
    """Channels of the features the prompt head reads: conv_in, every level, the middle block."""
    ch = [config["model_channels"] * m for m in config["channel_mult"]]
    return [config["model_channels"]] + ch + [ch[-1]]


def head_kernels(config: dict, downsize: int) -> list[int]:
    """Kernel (= stride) of each feature's reduction to the common grid (official ``downsize``, halved after every
    level that downsamples, i.e. all but the last)."""
    levels = len(config["channel_mult"])
    ks, k = [downsize], downsize
    for level in range(levels):
        if level < levels - 1:
            k //= 2
        ks.append(k)
    ks.append(k)  # the middle block
    return ks


class NoisyLatentEmbedding(torch.nn.Module):
    """Official ``PromptEmbedding``: ``conv_out(SiLU(conv_in(x_t)))``, 3×3 convolutions."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.conv_in(x)))


def build_encoder(config: dict, device=None) -> torch.nn.Module:
    """ComfyUI's ``UNetModel`` for ``config`` with the decoder removed, its tensors uninitialised on ``device``
    (built on the meta device, so the decoder never allocates; the caller loads weights)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    full = dict(config, image_size=32, out_channels=config["in_channels"], use_spatial_transformer=True,
                legacy=False, transformer_depth_output=[0] * sum(b + 1 for b in config["num_res_blocks"]))
    unet = UNetModel(**full, device="meta", operations=comfy.ops.disable_weight_init)
    for name in ("output_blocks", "out", "id_predictor"):
        if hasattr(unet, name):
            delattr(unet, name)
    return unet.to_empty(device=device or "cpu")


class PromptNet(Network):
    """PromptNet for one base model (its encoder half's config) and one CLIP vision width (module docstring).

    Widths (the file's metadata): ``unet`` (:func:`encoder_config`), ``vision_width`` (CLIP-vision hidden width),
    ``text_width`` (the text encoder's width, S*'s size), ``head_width`` (official ``region_proj_channel``, 128),
    ``downsize`` and ``region_kernel`` (official 8 and 8), ``cond_width`` (the noisy-latent embedding's width,
    official ``block_out_channels[0]`` = the UNet's ``model_channels``)."""
    kind = PROMPTNET_FILE

    def __init__(self, *, family: str | None = None, unet: dict, vision_width: int, text_width: int,
                 head_width: int = 128, downsize: int = 8, region_kernel: int = 8, seed: int | None = None):
        super().__init__(family=family, unet=dict(unet), vision_width=int(vision_width), text_width=int(text_width),
                         head_width=int(head_width), downsize=int(downsize), region_kernel=int(region_kernel))
        levels = len(unet["channel_mult"])
        if downsize < 2 ** (levels - 1) or downsize & (downsize - 1):
            raise PersonalizeError(f"PromptNet: downsize {downsize} must be a power of two ≥ 2^(levels−1) = "
                                   f"{2 ** (levels - 1)} for a UNet of {levels} levels.")
        self.unet_config = dict(unet)
        self.layout = level_layout(unet)
        self.encoder = build_encoder(unet)
        self.cond_embedding = NoisyLatentEmbedding(unet["in_channels"], unet["model_channels"])
        self.vision_proj = torch.nn.Linear(vision_width, unet["context_dim"])
        kernels = head_kernels(unet, downsize)
        self.prompt_projections = torch.nn.ModuleList(
            torch.nn.Conv2d(c, head_width, k, stride=k) for c, k in zip(level_channels(unet), kernels))
        self.prompt_out = torch.nn.Conv2d(len(kernels) * head_width, text_width, region_kernel, stride=region_kernel)
        if seed is not None:
            self.initialise(seed)

    # -- sizes ------------------------------------------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        """The latent side for which S* is one token (official 64: 512-pixel images)."""
        return self.config["downsize"] * self.config["region_kernel"]

    @property
    def vision_width(self) -> int:
        return self.config["vision_width"]

    @property
    def text_width(self) -> int:
        return self.config["text_width"]

    def describe(self) -> str:
        fam = FAMILY_NAMES.get(self.family, self.family or "an unnamed family")
        return (f"PromptNet for {fam} (UNet width {self.unet_config['model_channels']}, text width "
                f"{self.text_width}, CLIP vision width {self.vision_width}, {self.latent_size}×{self.latent_size} "
                "latents)")

    # -- initialisation ---------------------------------------------------------------------------------------
    def initialise(self, seed: int) -> None:
        """New layers: PyTorch's default initialisation from ``seed`` (the encoder's weights come from a MODEL or a
        file; until then they are drawn the same way, so the network is usable and deterministic)."""
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for module in self.modules():
                for name, p in module.named_parameters(recurse=False):
                    if name == "weight" and p.dim() > 1:
                        fan_in = p[0].numel()
                        p.copy_(torch.empty_like(p, device="cpu").uniform_(-1, 1, generator=gen)
                                / math.sqrt(fan_in))
                    elif name == "weight":
                        p.fill_(1.0)
                    else:
                        p.zero_()

    @classmethod
    def from_model(cls, model, *, family: str | None, vision_width: int, text_width: int | None = None,
                   head_width: int = 128, downsize: int | None = None, region_kernel: int | None = None,
                   seed: int = 0) -> "PromptNet":
        """A new PromptNet for a MODEL (ModelPatcher): the encoder half copied from the MODEL's UNet weights
        (ControlNet-style, §5.3), the new layers initialised from ``seed``. ``downsize``/``region_kernel`` default
        to the official 8/8 for UNets of 4 levels; for fewer levels ``downsize = 2^(levels−1)`` and
        ``region_kernel = 2`` (the mini family: 8×8 latents)."""
        config = encoder_config(model_unet_config(model))
        levels = len(config["channel_mult"])
        if downsize is None:
            downsize = max(2 ** (levels - 1), 8) if levels >= 4 else 2 ** (levels - 1)
        if region_kernel is None:
            region_kernel = 8 if levels >= 4 else 2
        net = cls(family=family, unet=config, vision_width=vision_width,
                  text_width=text_width or config["context_dim"], head_width=head_width, downsize=downsize,
                  region_kernel=region_kernel, seed=seed)
        source = base_model(model).diffusion_model.state_dict()
        own = net.encoder.state_dict()
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(source[key].to(value.dtype))
        return net

    # -- compatibility ----------------------------------------------------------------------------------------
    def check_model(self, model, what: str = "PromptNet") -> None:
        """Refuse a MODEL (ModelPatcher or its ``BaseModel``) whose UNet is not the one this PromptNet was built for
        (family, widths), naming the fix."""
        theirs = encoder_config(model_unet_config(model))
        if theirs != self.unet_config:
            diff = sorted(k for k in set(theirs) | set(self.unet_config) if theirs.get(k) != self.unet_config.get(k))
            shown = ", ".join(f"{k} {self.unet_config.get(k)} ≠ {theirs.get(k)}" for k in diff[:3])
            raise PersonalizeError(f"{what}: {self.describe()} does not fit this MODEL ({shown}). Use a PromptNet "
                                   "made for this checkpoint's family (pre-train or convert one for it), or load "
                                   "the checkpoint it was made for.")

    def check_vision(self, width: int, what: str = "PromptNet") -> None:
        if int(width) != self.vision_width:
            raise PersonalizeError(f"{what}: {self.describe()} reads CLIP vision tokens of width {self.vision_width}, "
                                   f"but this CLIP_VISION gives width {width}. Load the CLIP vision model it was "
                                   "trained with (ViT-H/14 for the official SD2 PromptNet; Load Mini CLIP Vision for "
                                   "the mini world's).")

    def check_text(self, width: int, what: str = "PromptNet") -> None:
        if int(width) != self.text_width:
            raise PersonalizeError(f"{what}: {self.describe()} writes words of width {self.text_width}, but this "
                                   f"CLIP's text encoder has width {width}. Use the CLIP of the checkpoint the "
                                   "PromptNet was made for.")

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, ref_latent: torch.Tensor, timestep: torch.Tensor, vision_tokens: torch.Tensor,
                noisy_latent: torch.Tensor) -> torch.Tensor:
        """``S*`` [B, n, text_width] (n = 1 for ``latent_size`` latents) from model-space latents ``ref_latent``
        [B|1, C, h, w] (clean) and ``noisy_latent`` [B, C, h, w] (the VP ``x_t``), ``timestep`` [B] (the model's
        0..999 timestep) and ``vision_tokens`` [B|1, N, vision_width] (official forward: ``sample``,
        ``timestep``, ``encoder_hidden_states``, ``promptnet_cond``)."""
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
        enc = self.encoder
        batch = noisy_latent.shape[0]
        dtype = self.prompt_out.weight.dtype
        if ref_latent.shape[0] != batch:
            ref_latent = ref_latent.expand(batch, *ref_latent.shape[1:])
        if vision_tokens.shape[0] != batch:
            vision_tokens = vision_tokens.expand(batch, *vision_tokens.shape[1:])
        t = timestep.reshape(-1).to(device=noisy_latent.device, dtype=torch.float32).expand(batch)
        emb = enc.time_embed(timestep_embedding(t, self.unet_config["model_channels"]).to(dtype))
        context = self.vision_proj(vision_tokens.to(dtype))
        h = enc.input_blocks[0](ref_latent.to(dtype), emb, context) + self.cond_embedding(noisy_latent.to(dtype))
        feats = [self.prompt_projections[0](h)]
        level = 0
        for i, block in enumerate(enc.input_blocks[1:], start=1):
            h = block(h, emb, context)
            if level < len(self.layout) and i == self.layout[level]:
                feats.append(self.prompt_projections[1 + level](h))
                level += 1
        h = enc.middle_block(h, emb, context)
        feats.append(self.prompt_projections[-1](h))
        out = self.prompt_out(torch.cat(feats, dim=1))
        return out.flatten(2).transpose(1, 2)

    def copy(self) -> "PromptNet":
        """An independent copy (weights and config), for test-time tuning."""
        new = copy.deepcopy(self)
        new.path = getattr(self, "path", None)
        return new


def load_promptnet(name_or_path, dtype: torch.dtype = torch.float32) -> PromptNet:
    """A PromptNet file (pack folder ``promptnet`` or a path), checked against its checksum sidecar when shipped."""
    path = PROMPTNET_FILE.resolve(name_or_path)
    artifacts.check_file_checksum(path, "scripts/pretrain_promptnet.py --export (make mini-world)")
    net = PromptNet.load(path, dtype=dtype)
    net.requires_grad_(False)
    return net.eval()

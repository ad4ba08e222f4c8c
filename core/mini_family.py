"""The mini model family: an SD1-architecture text-to-image model with small widths, built from ComfyUI's own
classes, so that every node runs the code path it runs on Stable Diffusion 1.x.

* UNet: ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`` in a ``comfy.model_base.BaseModel`` whose
  model config is an ``SD15`` subclass (ε-prediction, SD1.5's latent layout: 4 channels, 8× downsampling, the
  discrete 1000-step schedule) - so :func:`core.host.model_family` reports ``sd1``.
* Text encoder: ComfyUI's ``SD1ClipModel``/``SD1Tokenizer`` (the CLIP BPE tokenizer, 77 tokens) with a small
  CLIP text transformer (``MINI_CLIP_CONFIG``), wrapped in ``comfy.sd.CLIP``.
* VAE: ComfyUI's ``AutoencoderKL`` with a small ``ddconfig`` in ``comfy.sd.VAE``.

The stock checkpoint loader cannot build these (it matches SD1.5's full widths, comfy/model_detection.py), so the pack's
loader node reads the file with :func:`load_checkpoint`. File format (one safetensors file): ``model.diffusion_model.*``
(UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.*`` (the CLIP object's ``cond_stage_model`` state dict),
except the 49408-row token-embedding table, stored sparsely as the rows of the tokens the model was trained on
(``cond_stage_model.token_rows`` + ``.token_ids``); the other rows are a fixed, seeded N(0, 0.02²) table, as at
initialisation. The JSON configs, the latent scale factor and a format tag are in the metadata.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("comfyui_personalize")

FORMAT = "personalize-mini-sd/1"
PACK_MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED_NAME = "mini_world.safetensors"
"""The committed, trained family (``make mini-world`` reproduces it): ``<pack>/models/mini_world.safetensors``."""
VOCAB_SIZE = 49408
TOKEN_TABLE_SEED = 20261122

MINI_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 8, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 64,
    "num_res_blocks": [1, 1, 1], "transformer_depth": [1, 1, 1], "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "channel_mult": [1, 2, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 128, "use_temporal_resblock": False, "use_temporal_attention": False,
}
MINI_CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 128, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 512, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 4, "num_hidden_layers": 3, "pad_token_id": 1,
    "projection_dim": 128, "torch_dtype": "float32", "vocab_size": VOCAB_SIZE,
}
MINI_VAE_CONFIG = {
    "embed_dim": 4,
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
}


def vae_config(ch: int = MINI_VAE_CONFIG["ddconfig"]["ch"],
               num_res_blocks: int = MINI_VAE_CONFIG["ddconfig"]["num_res_blocks"],
               ch_mult=tuple(MINI_VAE_CONFIG["ddconfig"]["ch_mult"])) -> dict:
    """The mini VAE's configuration at another width / depth (same latent layout: 4 channels, 8x down). ``ch``:
    a multiple of 32 (the autoencoder's GroupNorm has 32 groups); ``ch_mult``: the width of each of the 4 levels
    (64, 32, 16, 8 px) in units of ``ch``, 1 to 8 (e.g. (1, 2, 4, 4) widens only the low resolutions, where a
    level's cost per channel² is 4-64x lower than at full resolution)."""
    try:
        mult = [int(m) for m in ch_mult]
    except (TypeError, ValueError):
        mult = []
    if (ch % 32 or not 32 <= ch <= 256 or not 1 <= num_res_blocks <= 4 or len(mult) != 4
            or list(ch_mult) != mult or not all(1 <= m <= 8 for m in mult)):
        raise ValueError(f"VAE width {ch} / blocks {num_res_blocks} / ch_mult {tuple(ch_mult)}: the width must be 32, "
                         "64, ... 256, the blocks per level 1 to 4 and ch_mult 4 whole numbers from 1 to 8")
    cfg = copy.deepcopy(MINI_VAE_CONFIG)
    cfg["ddconfig"].update(ch=int(ch), num_res_blocks=int(num_res_blocks), ch_mult=mult)
    return cfg


def _is_mini_vae_config(cfg) -> bool:
    """A :func:`vae_config` variant: only the width, the blocks per level and the level widths may differ from
    the default."""
    if not isinstance(cfg, dict) or set(cfg) != set(MINI_VAE_CONFIG) or not isinstance(cfg.get("ddconfig"), dict):
        return False
    dd = cfg["ddconfig"]
    try:
        return vae_config(dd["ch"], dd["num_res_blocks"], dd["ch_mult"]) == cfg
    except (KeyError, TypeError, ValueError):
        return False


DEFAULT_SCALE_FACTOR = 0.18215  # replaced by the trained VAE's measured 1/std in the file's metadata


def _sd15_subclass(scale_factor: float):
    """An ``SD15`` model config with the mini widths' head layout and the trained VAE's latent scale."""
    import comfy.latent_formats
    import comfy.supported_models

    class MiniLatentFormat(comfy.latent_formats.SD15):
        def __init__(self):
            super().__init__(scale_factor=scale_factor)

    class SD15Mini(comfy.supported_models.SD15):
        unet_config = {"context_dim": MINI_UNET_CONFIG["context_dim"],
                       "model_channels": MINI_UNET_CONFIG["model_channels"]}
        unet_extra_config = {"num_heads": -1, "num_head_channels": 32}
        latent_format = MiniLatentFormat

        def clip_target(self, *args, **kwargs):
            return mini_clip_target()
    return SD15Mini


def mini_clip_target():
    import comfy.sd1_clip
    import comfy.supported_models_base
    tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=functools.partial(
        comfy.sd1_clip.SDTokenizer, embedding_size=MINI_CLIP_CONFIG["hidden_size"]))
    # SDClipModel named explicitly: newer hosts default SD1ClipModel to a subclass with a fixed config.
    encoder = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=copy.deepcopy(MINI_CLIP_CONFIG))
    clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=encoder)
    return comfy.supported_models_base.ClipTarget(tokenizer, clip)


# ---------------------------------------------------------------------------------------------------------
# Construction

def initialise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fresh initial weights for a module built with ComfyUI's ``disable_weight_init`` operations (which skip
    initialisation): PyTorch's default init for linear/conv layers, unit/zero norms, N(0, 0.02²) embeddings, and
    zeros for the UNet's output-side convolutions (ResBlock outputs, transformer ``proj_out``, the final conv), as
    the ``zero_module`` calls of the reference implementation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d)):
                bound = 1.0 / max(1, m.weight[0].numel()) ** 0.5
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=g))
                if m.bias is not None:
                    m.bias.copy_(torch.empty_like(m.bias).uniform_(-bound, bound, generator=g))
            elif isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
            elif isinstance(m, torch.nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
        for name, m in module.named_modules():
            if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
                for p in m.parameters():
                    p.zero_()
    return module


def _token_table(width: int) -> torch.Tensor:
    return torch.randn(VOCAB_SIZE, width, generator=torch.Generator().manual_seed(TOKEN_TABLE_SEED)) * 0.02


def build(state_dict: dict | None = None, *, scale_factor: float = DEFAULT_SCALE_FACTOR, seed: int = 0,
          embedding_directory=None, vae_cfg: dict | None = None):
    """ComfyUI ``(MODEL, CLIP, VAE)`` of the mini family: from ``state_dict`` (file layout, sparse token table
    expanded), or freshly initialised with ``seed`` when it is None. ``vae_cfg``: a :func:`vae_config` variant
    (default :data:`MINI_VAE_CONFIG`); the VAE object remembers it as ``mini_vae_config`` for the file."""
    with torch.no_grad():  # the hosts' constructors write weights in place (loaders run under inference mode)
        return _build(state_dict, scale_factor, seed, embedding_directory, vae_cfg or MINI_VAE_CONFIG)


def _build(state_dict, scale_factor, seed, embedding_directory, vae_cfg):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    config_cls = _sd15_subclass(scale_factor)
    model_config = config_cls(copy.deepcopy(MINI_UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, "model.diffusion_model.")
    vae_sd = {}
    if state_dict is not None:
        base.load_model_weights(state_dict, "model.diffusion_model.")
        vae_sd = {k[len("first_stage_model."):]: v for k, v in state_dict.items() if k.startswith("first_stage_model.")}
    else:
        initialise(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    if state_dict is None:
        from comfy.ldm.models.autoencoder import AutoencoderKL
        vae_sd = initialise(AutoencoderKL(**copy.deepcopy(vae_cfg)), seed + 1).state_dict()
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": copy.deepcopy(vae_cfg)})
    vae.mini_vae_config = copy.deepcopy(vae_cfg)
    clip = comfy.sd.CLIP(mini_clip_target(), embedding_directory=embedding_directory)
    if state_dict is None:
        initialise(clip.cond_stage_model, seed + 2)
        _text_embedding(clip).weight.data.copy_(_token_table(MINI_CLIP_CONFIG["hidden_size"]))
    else:
        clip_sd = {k[len("cond_stage_model."):]: v for k, v in state_dict.items()
                   if k.startswith("cond_stage_model.") and k not in ("cond_stage_model.token_rows",
                                                                      "cond_stage_model.token_ids")}
        table = _token_table(MINI_CLIP_CONFIG["hidden_size"])
        ids = state_dict["cond_stage_model.token_ids"].long()
        table[ids] = state_dict["cond_stage_model.token_rows"].float()
        clip_sd[_TOKEN_KEY] = table
        missing, unexpected = clip.cond_stage_model.load_state_dict(clip_sd, strict=False)
        missing = [k for k in missing if not k.endswith(("position_ids", "logit_scale"))]
        if missing:
            raise ValueError(f"mini checkpoint lacks text-encoder weights: {missing[:5]}")
    return model, clip, vae


_TOKEN_KEY = "clip_l.transformer.text_model.embeddings.token_embedding.weight"


def _text_embedding(clip) -> torch.nn.Embedding:
    return clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding


def state_dict_for_file(model, clip, vae, token_ids: torch.Tensor, dtype=torch.float16) -> dict:
    """The file layout of :func:`build` (sparse token table: rows of ``token_ids`` only)."""
    out = {}
    for k, v in model.model.diffusion_model.state_dict().items():
        out["model.diffusion_model." + k] = v
    for k, v in vae.first_stage_model.state_dict().items():
        out["first_stage_model." + k] = v
    for k, v in clip.cond_stage_model.state_dict().items():
        if k == _TOKEN_KEY:
            continue
        out["cond_stage_model." + k] = v
    ids = torch.as_tensor(sorted(set(int(i) for i in token_ids)), dtype=torch.int64)
    table = _text_embedding(clip).weight.detach()
    out["cond_stage_model.token_rows"] = table[ids.to(table.device)]
    out["cond_stage_model.token_ids"] = ids
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
            for k, v in out.items()}


def file_metadata(scale_factor: float, extra: dict | None = None, vae_cfg: dict | None = None) -> dict:
    meta = {"format": FORMAT, "unet_config": json.dumps(MINI_UNET_CONFIG), "clip_config": json.dumps(MINI_CLIP_CONFIG),
            "vae_config": json.dumps(vae_cfg or MINI_VAE_CONFIG), "scale_factor": repr(float(scale_factor))}
    meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (extra or {}).items()})
    return meta


def shipped_checkpoint() -> Path:
    """Path of the committed mini-world family (:data:`SHIPPED_NAME` in the pack's models folder)."""
    return PACK_MODELS / SHIPPED_NAME


def load_checkpoint(path, embedding_directory=None):
    """``(MODEL, CLIP, VAE)`` from a mini-family file (configs checked against this version of the pack)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .artifacts import check_file_checksum
    from .host import PersonalizeError
    path = Path(path)
    if not path.is_file():
        raise PersonalizeError(f"{path} does not exist. Train the mini family with `make mini-world`, or restore the "
                               "shipped file with `git checkout -- models/`.")
    check_file_checksum(path, "`make mini-world`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any read failure is a damaged file for the user
        raise PersonalizeError(f"{path.name} cannot be read as a safetensors file ({e}). Re-create it with "
                               "`make mini-world`, or restore it with `git checkout -- models/`.") from e
    if meta.get("format") != FORMAT:
        raise PersonalizeError(f"{path.name} is not a mini-world checkpoint (format {meta.get('format')!r}, expected "
                               f"{FORMAT!r}). Load SD checkpoints with Load Checkpoint instead.")
    file_vae = json.loads(meta.get("vae_config", "null"))
    for key, ok in (("unet_config", json.loads(meta.get("unet_config", "null")) == MINI_UNET_CONFIG),
                    ("clip_config", json.loads(meta.get("clip_config", "null")) == MINI_CLIP_CONFIG),
                    ("vae_config", _is_mini_vae_config(file_vae))):
        if not ok:
            raise PersonalizeError(f"{path.name} was made with another mini-family configuration ({key}); re-create "
                                   "it with `make mini-world` for this version of the pack.")
    return build({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                 scale_factor=float(meta["scale_factor"]), embedding_directory=embedding_directory,
                 vae_cfg=file_vae)


def save_checkpoint(path, model, clip, vae, token_ids: torch.Tensor, scale_factor: float,
                    extra: dict | None = None) -> str:
    """Write the file atomically (temporary file, then rename) and its ``.sha256`` beside it; returns the digest."""
    from safetensors.torch import save_file

    from .artifacts import give_plain_mode, write_file_checksum
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state_dict_for_file(model, clip, vae, token_ids), str(tmp), metadata=file_metadata(scale_factor, extra,
                                                                               getattr(vae, "mini_vae_config", None)))
    give_plain_mode(tmp)
    os.replace(tmp, path)
    return write_file_checksum(path)

"""Tiny random-weight checkpoints (SD1.5, SD2.x v-prediction, SDXL) for tests, demos and benchmarks.

:func:`ensure_checkpoint` builds, once, a deterministic checkpoint that ComfyUI's stock loader
(``CheckpointLoaderSimple`` / ``comfy.sd.load_checkpoint_guess_config``) accepts in both supported host trees
(v0.3.75 and v0.3.64) and caches it. Nothing is downloaded; the weights are seeded noise.

What the files contain (original/ldm key layout, safetensors, fp16; ``docs/comfyui-host.md`` section 10):

* ``sd15`` detected as ``SD15`` / EPS. UNet: 320 channels, 2 levels (``channel_mult [1, 1]``), one res block per
  level, a depth-1 cross-attention transformer (context 768, conv ``proj_in``) on every level of the input and
  output side and in the middle block. Full 12-layer CLIP-L under ``cond_stage_model.transformer.text_model.``.
* ``sd2`` detected as ``SD20`` / V_PREDICTION. UNet: 320 channels, 4 levels x 2 res blocks (so there are 12 output
  blocks, as the v-prediction probe of SD20 needs), linear ``proj_in``, context 1024, depth-1 transformers on levels 0
  and 1 (input and output side) and in the middle block. ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` is
  drawn with std 0.15: the host calls the model v-prediction when that tensor's std exceeds 0.09. Full 24-layer OpenCLIP ViT-H text tower in open_clip layout under
  ``cond_stage_model.model.`` (``transformer.resblocks.N.attn.in_proj_weight``, ``text_projection``, ...).
* ``sdxl`` detected as ``SDXL`` / EPS. UNet: 320 channels, 3 levels x 2 res blocks, input transformer depths
  ``[0, 0, 2, 2, 10, 10]`` (the SDXL class matches on exactly this list; other lists select SSD1B, Segmind_Vega,
  KOALA...), depth-1 transformers on the output side of levels 1 and 2 and in the middle, linear ``proj_in``,
  context 2048, ``label_emb`` with 2816 ADM inputs. Full CLIP-L (``conditioner.embedders.0.transformer.``) and
  full 32-layer CLIP-G with ``text_projection`` (``conditioner.embedders.1.model.``, open_clip layout).
* All three use a TAESD VAE under ``first_stage_model.taesd_encoder.`` / ``taesd_decoder.`` (both hosts switch
  to TAESD when ``taesd_decoder.1.weight`` is present) plus ``vae_scale`` / ``vae_shift`` set like ComfyUI's
  ``VAELoader`` does for real TAESD weights, so decoding costs milliseconds.

Shapes come from the host's own module classes (``UNetModel``, the ``SD1ClipModel`` / ``SD2ClipModel`` /
``SDXLClipModel`` text encoders, ``TAESD``) instantiated on the meta device; the builder checks the result against
the host's detection and its checkpoint-to-text-encoder key conversion before it writes anything. Values are drawn
per tensor from a generator seeded with ``(SEED, FORMAT_VERSION, kind, key)`` as integers and scaled with plain
IEEE float ops, so the bytes depend neither on the host tree, the tensor order nor the CPU's vector unit.
Initialisation (uniform noise with the stds below) gives finite, input-dependent outputs through text encode ->
UNet -> VAE decode; no trainable tensor is exactly zero.

Files are written as ``tiny-<kind>-v<FORMAT_VERSION>-<spec digest>.safetensors`` through a temporary file and
``os.replace`` under an advisory file lock, so concurrent builders and killed builds never expose a partial file.
Bump :data:`FORMAT_VERSION` whenever the layout or the initialisation changes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

try:  # POSIX advisory locks; elsewhere the atomic rename alone keeps readers safe.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: Bump when keys, shapes, dtypes or the initialisation change: the file name and metadata carry it.
FORMAT_VERSION = 1
#: Base seed; every tensor gets its own generator seeded from (SEED, FORMAT_VERSION, kind, key).
SEED = 1234
KINDS = ("sd15", "sd2", "sdxl")

#: What each kind must be detected as (``type(model_config).__name__``, ``ModelType`` name, context dim,
#: cross-attention width of the conditioning, pooled width or None).
EXPECTED = {
    "sd15": {"config": "SD15", "model_type": "EPS", "context_dim": 768, "cond_dim": 768, "pooled_dim": None},
    "sd2": {"config": "SD20", "model_type": "V_PREDICTION", "context_dim": 1024, "cond_dim": 1024, "pooled_dim": None},
    "sdxl": {"config": "SDXL", "model_type": "EPS", "context_dim": 2048, "cond_dim": 2048, "pooled_dim": 1280},
}

_UNET_COMMON = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_checkpoint": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

#: UNet constructor arguments (what ``detect_unet_config`` reads back, plus the heads the matched config adds).
#: Both depth lists run from the highest-resolution level down: ``transformer_depth_output[0]`` is the LAST output
#: block (``UNetModel`` pops that list from the end while it builds output blocks deepest level first).
UNET_CONFIGS = {
    "sd15": dict(
        _UNET_COMMON,
        num_res_blocks=[1, 1],
        channel_mult=[1, 1],
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        context_dim=768,
        use_linear_in_transformer=False,
        adm_in_channels=None,
        num_heads=8,
        num_head_channels=-1,
    ),
    "sd2": dict(
        _UNET_COMMON,
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 1, 1, 1],
        transformer_depth=[1, 1, 1, 1, 0, 0, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        transformer_depth_middle=1,
        context_dim=1024,
        use_linear_in_transformer=True,
        adm_in_channels=None,
        num_heads=-1,
        num_head_channels=64,
    ),
    "sdxl": dict(
        _UNET_COMMON,
        num_res_blocks=[2, 2, 2],
        channel_mult=[1, 1, 1],
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
        transformer_depth_middle=1,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
        num_classes="sequential",
        num_heads=-1,
        num_head_channels=64,
    ),
}

#: The tensor the host reads to tell SD2 v-prediction from eps (std > 0.09 means v-prediction).
SD2_VPRED_MARKER = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_VPRED_MARKER_STD = 0.15

#: ``vae_scale`` as ComfyUI's VAELoader sets it for real TAESD weights (latent_format.scale_factor).
_TAESD_SCALE = {"sd15": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}

# Initialisation constants (uniform noise with these standard deviations).
_BIAS_STD = 0.01
_NORM_STD = 0.02  # norm weights 1 +- this, norm biases +- this
_TOKEN_EMB_STD = 0.02
_POS_EMB_STD = 0.01
_UNET_RESIDUAL_GAIN = 0.5  # layers that real UNets zero-initialise (res-block conv2, proj_out, attention/ff outputs)
_TAESD_BLOCK_OUT_GAIN = 0.5
_TAESD_RGB_GAIN = 0.5  # last decoder conv: small variation around mid-grey (bias 0.5) instead of clipped black

_DTYPES = {"F16": 2, "F32": 4, "I64": 8}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: key, shape, safetensors dtype and how its values are made.

    ``init`` is ``("uniform", mean, std)`` (uniform noise with that mean and standard deviation),
    ``("const", value)`` or ``("arange",)`` (0..n-1, for ``position_ids``).
    """

    key: str
    shape: tuple
    dtype: str
    init: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype]


# --------------------------------------------------------------------------------------------------------------
# public API


def default_cache_dir() -> Path:
    """``$PERSONALIZE_FIXTURES_DIR``, else ``<repo>/.cache/fixtures`` (git-ignored)."""
    env = os.environ.get("PERSONALIZE_FIXTURES_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / ".cache" / "fixtures"


def checkpoint_name(kind: str) -> str:
    """File name ensure_checkpoint uses for ``kind`` (needs ComfyUI importable: the digest covers the spec)."""
    return _file_name(kind, spec_digest(build_spec(kind)))


def ensure_checkpoint(kind: str, cache_dir: Path | str | None = None) -> Path:
    """Return the path of the tiny ``kind`` checkpoint in ``cache_dir``, building it first if needed.

    ``kind`` is one of :data:`KINDS`. A ComfyUI tree must be importable (``import comfy`` works; boot the host
    first). A cached file is reused when its name (format version + spec digest) matches and its header is
    intact; otherwise it is rebuilt under a lock, written to a temporary file and moved into place atomically.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown fixture kind {kind!r}; expected one of {KINDS}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    spec = build_spec(kind)
    digest = spec_digest(spec)
    path = cache_dir / _file_name(kind, digest)
    if _header_ok(path, kind, digest):
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{path.name}.lock"):
        if _header_ok(path, kind, digest):  # another process built it while we waited
            return path
        if fcntl is not None:  # only the lock holder writes temp files: any other one is from a killed builder
            for stale in cache_dir.glob(f".{path.name}.tmp-*"):
                with contextlib.suppress(OSError):
                    stale.unlink()
        _require_free_space(cache_dir, sum(s.nbytes for s in spec), kind)
        tmp = cache_dir / f".{path.name}.tmp-{os.getpid()}"
        try:
            write_checkpoint(kind, spec, tmp, digest)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return path


def _require_free_space(cache_dir: Path, nbytes: int, kind: str) -> None:
    """Refuse to start a fixture that cannot fit (a full disk would otherwise fail mid-write, once per test that
    asks for it), naming the size, the folder and the ways out."""
    import shutil
    free = shutil.disk_usage(cache_dir).free
    margin = 256 << 20
    if free < nbytes + margin:
        raise OSError(
            f"the tiny {kind} fixture needs {nbytes / 2**30:.2f} GiB (+0.25 GiB margin) in {cache_dir}, which has "
            f"{free / 2**30:.2f} GiB free: free disk space there, or point PERSONALIZE_FIXTURES_DIR at a disk "
            "with room")


# --------------------------------------------------------------------------------------------------------------
# spec: keys, shapes and init rules derived from the host's own modules


def build_spec(kind: str) -> list[TensorSpec]:
    """All tensors of the ``kind`` checkpoint, sorted by key, checked against the host's loader conventions."""
    if kind not in KINDS:
        raise ValueError(f"unknown fixture kind {kind!r}; expected one of {KINDS}")
    cached = _SPEC_CACHE.get(kind)
    if cached is not None:
        return cached
    _require_comfy()
    specs: dict[str, TensorSpec] = {}

    def add(items):
        for s in items:
            if s.key in specs:
                raise AssertionError(f"duplicate key {s.key}")
            specs[s.key] = s

    add(_unet_specs(kind))
    add(_text_encoder_specs(kind))
    add(_taesd_specs(kind))
    spec = [specs[k] for k in sorted(specs)]
    _check_spec_against_host(kind, spec)
    _SPEC_CACHE[kind] = spec
    return spec


_SPEC_CACHE: dict[str, list[TensorSpec]] = {}


def spec_digest(spec: list[TensorSpec]) -> str:
    """sha256 over format version, seed and every (key, shape, dtype, init). Values are a pure function of
    (seed, version, kind, key, init), so for one kind equal digests mean byte-identical files."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "seed": SEED}, sort_keys=True).encode())
    for s in spec:
        h.update(json.dumps([s.key, list(s.shape), s.dtype, list(s.init)]).encode())
    return h.hexdigest()


def _require_comfy():
    try:
        import comfy.ops  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the caller's environment
        raise RuntimeError(
            "harness.fixtures needs a ComfyUI tree on sys.path (boot the host first, e.g. harness.host.boot())"
        ) from e


def _linear_like(module) -> bool:
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))


def _norm_like(module) -> bool:
    import torch

    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))


def _uniform(std: float, mean: float = 0.0) -> tuple:
    return ("uniform", float(mean), float(std))


def _module_tensors(root, prefix: str = "") -> Iterator[tuple[str, object, str, tuple]]:
    """(full key, owning module, local name, shape) for every parameter and persistent buffer of ``root``."""
    for mod_name, module in root.named_modules():
        persistent = [n for n, _ in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        names = [n for n, _ in module.named_parameters(recurse=False)] + persistent
        for local in names:
            t = getattr(module, local)
            full = f"{mod_name}.{local}" if mod_name else local
            yield prefix + full, module, local, tuple(t.shape)


def _generic_init(key: str, module, local: str, shape: tuple, out_gain: float = 1.0) -> tuple:
    """Fan-in scaled weights, small biases, norms near identity. ``out_gain`` multiplies residual outputs."""
    if _norm_like(module):
        return _uniform(_NORM_STD, 1.0) if local == "weight" else _uniform(_NORM_STD)
    if _linear_like(module):
        if local == "bias":
            return _uniform(_BIAS_STD)
        fan_in = math.prod(shape[1:])
        return _uniform(out_gain / math.sqrt(fan_in))
    raise AssertionError(f"no init rule for {key} ({type(module).__name__}.{local}, shape {shape})")


_UNET_RESIDUAL_OUT = ("out_layers.3.weight", "proj_out.weight", "to_out.0.weight", "ff.net.2.weight")


def _unet_specs(kind: str) -> list[TensorSpec]:
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"), torch.no_grad():
        unet = UNetModel(**UNET_CONFIGS[kind], dtype=torch.float32, device="meta",
                         operations=comfy.ops.disable_weight_init)
    out = []
    for key, module, local, shape in _module_tensors(unet, "model.diffusion_model."):
        gain = _UNET_RESIDUAL_GAIN if key.endswith(_UNET_RESIDUAL_OUT) else 1.0
        init = _generic_init(key, module, local, shape, gain)
        if kind == "sd2" and key == SD2_VPRED_MARKER:
            init = _uniform(_SD2_VPRED_MARKER_STD)
        out.append(TensorSpec(key, shape, "F16", init))
    return out


def _host_text_encoder(kind: str):
    """The host's own text-encoder wrapper for ``kind`` on the meta device (keys ``clip_l.`` / ``clip_h.`` /
    ``clip_g.`` exactly as ``process_clip_state_dict`` produces them)."""
    import torch
    import comfy.sd1_clip
    import comfy.sdxl_clip

    from comfy.text_encoders import sd2_clip
    cls = {"sd15": comfy.sd1_clip.SD1ClipModel, "sd2": sd2_clip.SD2ClipModel,
           "sdxl": comfy.sdxl_clip.SDXLClipModel}[kind]
    with torch.device("meta"), torch.no_grad():
        return cls(device="meta", dtype=torch.float32)


def _clip_tower_specs(tensors: dict, host_prefix: str, layout: str, ckpt_prefix: str, with_projection: bool):
    """Specs for one CLIP text tower.

    ``tensors`` maps host keys (``<host_prefix>transformer.text_model....``) to (module, local, shape).
    ``layout`` "hf": keys kept as ``<ckpt_prefix>text_model....`` (CLIP-L in SD1 and SDXL checkpoints).
    ``layout`` "open_clip": the inverse of ComfyUI's ``clip_text_transformers_convert`` (SD2 / SDXL CLIP-G).
    """
    tm = host_prefix + "transformer.text_model."
    layers = tm + "encoder.layers."
    n_layers = 1 + max(int(k[len(layers):].split(".")[0]) for k in tensors if k.startswith(layers))
    width = tensors[tm + "final_layer_norm.weight"][2][0]
    residual_gain = 1.0 / math.sqrt(2 * n_layers)
    out = []
    qkv = {}
    for key, (module, local, shape) in tensors.items():
        if not key.startswith(tm):
            continue
        rest = key[len(tm):]
        if rest == "embeddings.token_embedding.weight":
            init = _uniform(_TOKEN_EMB_STD)
        elif rest == "embeddings.position_embedding.weight":
            init = _uniform(_POS_EMB_STD)
        else:
            gain = residual_gain if rest.endswith(("self_attn.out_proj.weight", "mlp.fc2.weight")) else 1.0
            init = _generic_init(key, module, local, shape, gain)
        if layout == "hf":
            out.append(TensorSpec(ckpt_prefix + "text_model." + rest, shape, "F16", init))
            continue
        # open_clip layout
        simple = {
            "embeddings.token_embedding.weight": "token_embedding.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "final_layer_norm.weight": "ln_final.weight",
            "final_layer_norm.bias": "ln_final.bias",
        }
        if rest in simple:
            out.append(TensorSpec(ckpt_prefix + simple[rest], shape, "F16", init))
            continue
        assert rest.startswith("encoder.layers."), key
        layer, sub = rest[len("encoder.layers."):].split(".", 1)
        block = f"{ckpt_prefix}transformer.resblocks.{layer}."
        renames = {
            "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
            "self_attn.out_proj.": "attn.out_proj.",
        }
        for src, dst in renames.items():
            if sub.startswith(src):
                out.append(TensorSpec(block + dst + sub[len(src):], shape, "F16", init))
                break
        else:
            proj, what = sub.rsplit(".", 1)  # self_attn.q_proj / weight
            assert proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), key
            qkv.setdefault((block, what), []).append((proj, shape, init))
    for (block, what), parts in qkv.items():
        assert len(parts) == 3 and len({p[2] for p in parts}) == 1, parts
        shape = (3 * parts[0][1][0],) + tuple(parts[0][1][1:])
        out.append(TensorSpec(f"{block}attn.in_proj_{what}", shape, "F16", parts[0][2]))
    if with_projection:
        # open_clip stores text_projection as a bare [width, width] matrix (x @ P); ComfyUI transposes it.
        proj_shape = tensors[host_prefix + "transformer.text_projection.weight"][2]
        out.append(TensorSpec(ckpt_prefix + "text_projection", tuple(reversed(proj_shape)), "F16",
                              _uniform(1.0 / math.sqrt(width))))
        out.append(TensorSpec(ckpt_prefix + "logit_scale", (), "F16", ("const", 4.6052)))
    return out


def _text_encoder_specs(kind: str) -> list[TensorSpec]:
    te = _host_text_encoder(kind)
    tensors = {key: (module, local, shape) for key, module, local, shape in _module_tensors(te)}
    pos_ids = lambda p: TensorSpec(p + "text_model.embeddings.position_ids", (1, 77), "I64", ("arange",))  # noqa: E731
    if kind == "sd15":
        # Real SD1.x files carry HF CLIPTextModel keys (+ position_ids) and no text_projection / logit_scale.
        p = "cond_stage_model.transformer."
        return _clip_tower_specs(tensors, "clip_l.", "hf", p, False) + [pos_ids(p)]
    if kind == "sd2":
        return _clip_tower_specs(tensors, "clip_h.", "open_clip", "cond_stage_model.model.", True)
    p = "conditioner.embedders.0.transformer."
    return (_clip_tower_specs(tensors, "clip_l.", "hf", p, False) + [pos_ids(p)]
            + _clip_tower_specs(tensors, "clip_g.", "open_clip", "conditioner.embedders.1.model.", True))


def _taesd_specs(kind: str) -> list[TensorSpec]:
    import torch
    import comfy.taesd.taesd

    with torch.device("meta"), torch.no_grad():
        taesd = comfy.taesd.taesd.TAESD()
    rgb = [n for n, m in taesd.taesd_decoder.named_modules() if isinstance(m, torch.nn.Conv2d)][-1]
    rgb = f"first_stage_model.taesd_decoder.{rgb}."
    out = []
    for key, module, local, shape in _module_tensors(taesd, "first_stage_model."):
        if local in ("vae_scale", "vae_shift"):
            continue
        if key == rgb + "bias":  # decoder output is the image in 0..1 (ComfyUI clamps it): centre on grey
            init = _uniform(_BIAS_STD, 0.5)
        else:
            gain = _TAESD_RGB_GAIN if key == rgb + "weight" else _TAESD_BLOCK_OUT_GAIN if ".conv.4." in key else 1.0
            init = _generic_init(key, module, local, shape, gain)
        out.append(TensorSpec(key, shape, "F16", init))
    # vae_scale and vae_shift, like VAELoader.load_taesd writes them.
    out.append(TensorSpec("first_stage_model.vae_scale", (), "F16", ("const", _TAESD_SCALE[kind])))
    out.append(TensorSpec("first_stage_model.vae_shift", (), "F16", ("const", 0.0)))
    return out


def _check_spec_against_host(kind: str, spec: list[TensorSpec]) -> None:
    """Run the host's detection and text-encoder key conversion on meta tensors of the spec (no data needed)."""
    import torch
    import comfy.model_detection

    dt = {"F16": torch.float16, "F32": torch.float32, "I64": torch.int64}
    sd = {s.key: torch.empty(s.shape, dtype=dt[s.dtype], device="meta") for s in spec}
    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    want = EXPECTED[kind]["config"]
    if config is None or type(config).__name__ != want:
        raise AssertionError(f"{kind}: host detects {type(config).__name__ if config else None}, want {want}")
    for k in ("context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels", "num_res_blocks",
              "channel_mult", "transformer_depth", "transformer_depth_output", "transformer_depth_middle"):
        if config.unet_config.get(k) != UNET_CONFIGS[kind].get(k):
            raise AssertionError(f"{kind}: detected {k}={config.unet_config.get(k)}, built {UNET_CONFIGS[kind].get(k)}")
    if kind == "sd2" and SD2_VPRED_MARKER not in sd:  # without it SD20.model_type falls back to EPS
        raise AssertionError(f"sd2: {SD2_VPRED_MARKER} missing")
    clip_sd = config.process_clip_state_dict(dict(sd))
    te = _host_text_encoder(kind)
    host = {k: tuple(v.shape) for k, v in te.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in clip_sd.items()}
    # Real SD1.x / SDXL CLIP-L weights have no projection / logit_scale; the host tolerates that.
    allowed_missing = {"clip_l.transformer.text_projection.weight", "clip_l.logit_scale"}
    missing = set(host) - set(got) - allowed_missing
    unexpected = {k for k in set(got) - set(host) if not k.endswith("embeddings.position_ids")}
    wrong = {k for k in set(host) & set(got) if host[k] != got[k]}
    if missing or unexpected or wrong:
        raise AssertionError(f"{kind}: text encoder keys missing={sorted(missing)[:5]} "
                             f"unexpected={sorted(unexpected)[:5]} wrong shape={sorted(wrong)[:5]}")
    vae_keys = {s.key[len("first_stage_model."):] for s in spec if s.key.startswith("first_stage_model.")}
    if "taesd_decoder.1.weight" not in vae_keys:
        raise AssertionError(f"{kind}: no TAESD decoder keys")


# --------------------------------------------------------------------------------------------------------------
# writing


def _file_name(kind: str, digest: str) -> str:
    return f"tiny-{kind}-v{FORMAT_VERSION}-{digest[:12]}.safetensors"


def _tensor_seed(kind: str, key: str) -> int:
    d = hashlib.sha256(f"{SEED}:{FORMAT_VERSION}:{kind}:{key}".encode()).digest()
    return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)


def make_tensor(kind: str, s: TensorSpec):
    """The values of one tensor (fp16 / int64 CPU tensor), a pure function of (SEED, FORMAT_VERSION, kind, s)."""
    import torch

    if s.init[0] == "arange":
        return torch.arange(s.numel, dtype=torch.int64).reshape(s.shape)
    if s.init[0] == "const":
        return torch.full(s.shape, s.init[1], dtype=torch.float32).to(torch.float16)
    _, mean, std = s.init
    g = torch.Generator().manual_seed(_tensor_seed(kind, s.key))
    # Integers from the generator (exact everywhere), then (2k - 32767) / 32767 * std * sqrt(3): uniform on
    # [-std*sqrt(3), std*sqrt(3)], i.e. standard deviation ``std``. Separate IEEE ops, no FMA: bit-stable.
    k = torch.empty(s.shape, dtype=torch.int16).random_(0, 32768, generator=g)
    x = k.to(torch.float32).mul_(2.0).sub_(32767.0).mul_(std * math.sqrt(3.0) / 32767.0)
    if mean:
        x.add_(mean)
    return x.to(torch.float16)


def _header(kind: str, spec: list[TensorSpec], digest: str) -> bytes:
    meta = {
        "format": "comfyui-personalize-tiny-checkpoint",
        "kind": kind,
        "format_version": str(FORMAT_VERSION),
        "seed": str(SEED),
        "spec_sha256": digest,
        "note": "random weights for tests; not a usable model",
    }
    header: dict = {"__metadata__": meta}
    offset = 0
    for s in spec:
        header[s.key] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return raw


def write_checkpoint(kind: str, spec: list[TensorSpec], path: Path, digest: str | None = None) -> None:
    """Stream the checkpoint to ``path`` (safetensors). Tensors are generated by a small thread pool (each is a
    pure function of its spec, so order and threading do not change the bytes) and written in spec order, with at
    most a few tensors in memory."""
    from concurrent.futures import ThreadPoolExecutor

    digest = digest or spec_digest(spec)
    header = _header(kind, spec, digest)

    def produce(s: TensorSpec) -> bytes:
        t = make_tensor(kind, s).contiguous()
        assert tuple(t.shape) == s.shape, s
        if kind == "sd2" and s.key == SD2_VPRED_MARKER:
            # Both trees: torch.std(norm1.bias, unbiased=False) > 0.09 means v-prediction.
            assert float(t.float().std(unbiased=False)) > 0.09
        a = t.reshape(-1).numpy()
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            a = a.byteswap()
        b = a.tobytes()
        assert len(b) == s.nbytes, s
        return b

    workers = max(1, min(4, os.cpu_count() or 1))
    window = 2 * workers
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=workers) as pool:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        pending = []
        for s in spec:
            pending.append(pool.submit(produce, s))
            if len(pending) >= window:
                f.write(pending.pop(0).result())
        for fut in pending:
            f.write(fut.result())


def _read_header(path: Path) -> tuple[dict, int] | None:
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100 * 1024 * 1024:
                return None
            return json.loads(f.read(n)), 8 + n
    except (OSError, ValueError, struct.error):
        return None


def _header_ok(path: Path, kind: str, digest: str) -> bool:
    """The file exists, names the expected spec and is as long as its header says."""
    if not path.is_file():
        return False
    parsed = _read_header(path)
    if parsed is None:
        return False
    header, data_start = parsed
    meta = header.get("__metadata__", {})
    if meta.get("kind") != kind or meta.get("spec_sha256") != digest:
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size == data_start + end


@contextlib.contextmanager
def _locked(lock_path: Path):
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------------------
# command line: python -m harness.fixtures --host PATH [--cache-dir DIR] [kind ...]


def _boot_minimal(host: str) -> None:
    sys.path.insert(0, str(Path(host).resolve()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.fp32_text_enc = True


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the tiny random-weight checkpoints used by the tests.")
    ap.add_argument("kinds", nargs="*", metavar="kind", help=f"any of {', '.join(KINDS)} (default: all)")
    ap.add_argument("--host", help="ComfyUI tree to put first on sys.path (default: whatever imports as comfy)")
    ap.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    ap.add_argument("--sha256", action="store_true", help="also print each file's sha256")
    args = ap.parse_args(argv)
    kinds = args.kinds or list(KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        ap.error(f"unknown kind(s) {bad}; expected {KINDS}")
    if args.host:
        _boot_minimal(args.host)
    for kind in kinds:
        t0 = time.perf_counter()
        path = ensure_checkpoint(kind, Path(args.cache_dir) if args.cache_dir else None)
        dt = time.perf_counter() - t0
        line = f"{kind}: {path} {path.stat().st_size / 1e6:.1f} MB in {dt:.1f} s"
        if args.sha256:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            line += f" sha256={h.hexdigest()}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

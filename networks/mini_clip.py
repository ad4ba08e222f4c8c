"""The mini family's CLIP: a vision tower that *is* ComfyUI's own CLIP vision model (``comfy.clip_vision.ClipVisionModel``,
what the stock **Load CLIP Vision** returns) at a small configuration, plus a small text tower of its own used only to
pre-train it contrastively (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", §2.3 and Fig. 3: symmetric cross-entropy over the in-batch image × caption cosine similarities with a
learned temperature).

* Vision tower: ``comfy.clip_model.CLIPVisionModelProjection`` built from :data:`VISION_CONFIG` (64×64 input, 8×8
  patches → 64 patch tokens + a class token, 4 layers of width 128, projection to 128), the exact module the host
  runs for ViT-L/14 or ViT-H/14, so the stock **CLIP Vision Encode** node and every node that reads a CLIP_VISION
  handle it as a real one: ``image_embeds`` [B, 128], ``last_hidden_state`` [B, 65, 128],
  ``penultimate_hidden_states`` [B, 65, 128].
* Text tower (:class:`TextTower`, not shipped): token + position embeddings over the CLIP BPE ids, a pre-norm
  transformer with a causal mask, the end-of-text token's feature projected to the joint space (CLIP's text
  encoder, §2.4, at a small size).

Nothing here is built from, distilled from or initialised by ``miniworld/evaluators.py`` (the benchmark's judges).
The shipped file (``models/clip_vision/mini_world_clip_vision.safetensors``) holds the vision tower only, in fp16, as
an artefact file (:data:`CLIP_VISION_FILE`) whose ``widths`` are the vision config; ``make mini-world`` re-trains it
(scripts/pretrain_clip_vision.py).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core import artifacts

PACK_MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED_NAME = "mini_world_clip_vision.safetensors"

VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 128, "image_size": 64,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 512, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 4,
    "patch_size": 8, "projection_dim": 128, "torch_dtype": "float32",
}
TEXT_CONFIG = {"width": 128, "layers": 2, "heads": 4, "context": 32, "projection_dim": 128}

CLIP_VISION_FILE = artifacts.kind(
    kind="mini_clip_vision", title="mini CLIP vision", folder="personalize_clip_vision",
    subdir=("personalize", "clip_vision"), shipped=PACK_MODELS / "clip_vision",
    made_by="scripts/pretrain_clip_vision.py (make mini-world)")


def vision_tokens(config: dict = VISION_CONFIG) -> int:
    """Tokens of the vision tower's hidden states: the patches plus the class token."""
    return (config["image_size"] // config["patch_size"]) ** 2 + 1


def build_vision(config: dict = VISION_CONFIG, seed: int | None = 0, device=None) -> torch.nn.Module:
    """ComfyUI's ``CLIPVisionModelProjection`` for ``config`` in fp32 with plain layers, trainable (its layers'
    in-place residual adds made out-of-place: :func:`core.graph_patches.make_module_differentiable`); ``seed``
    initialises it (:func:`core.mini_family.initialise`, class and position embeddings N(0, 0.02²)), None leaves the
    weights to a ``load_state_dict``."""
    import comfy.clip_model
    import comfy.ops

    from ..core.graph_patches import make_module_differentiable
    from ..core.mini_family import initialise
    model = comfy.clip_model.CLIPVisionModelProjection(dict(config), torch.float32, device,
                                                       comfy.ops.disable_weight_init)
    make_module_differentiable(model)
    if seed is not None:
        initialise(model, seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            emb = model.vision_model.embeddings
            emb.class_embedding.copy_(torch.randn(emb.class_embedding.shape, generator=g) * 0.02)
    return model


def pixel_values(images: torch.Tensor, config: dict = VISION_CONFIG) -> torch.Tensor:
    """``[B, H, W, 3]`` images in [0, 1] to the tower's input, with the host's own preprocessing (the same function
    the stock CLIP Vision Encode node calls: resize/centre-crop to the input size, 8-bit rounding, CLIP's mean/std)."""
    import comfy.clip_vision
    mean = config.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
    std = config.get("image_std", [0.26862954, 0.26130258, 0.27577711])
    return comfy.clip_vision.clip_preprocess(images, size=config["image_size"], mean=mean, std=std).float()


class TextTower(torch.nn.Module):
    """A small CLIP text encoder (Radford et al. 2021, §2.4): BPE ids → token + position embeddings → pre-norm
    transformer with a causal mask → final LayerNorm → the end-of-text token's feature → linear projection."""

    def __init__(self, vocab_size: int = 49408, width: int = 128, layers: int = 2, heads: int = 4,
                 context: int = 32, projection_dim: int = 128, eot_token: int = 49407):
        super().__init__()
        self.context, self.eot_token = context, eot_token
        self.token_embedding = torch.nn.Embedding(vocab_size, width)
        self.position_embedding = torch.nn.Parameter(torch.randn(context, width) * 0.01)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True)
        self.transformer = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = torch.nn.LayerNorm(width)
        self.projection = torch.nn.Linear(width, projection_dim, bias=False)
        torch.nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [B, L ≤ context] (start token first, end token then padding) → [B, projection_dim]."""
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.position_embedding[:n]
        mask = torch.triu(torch.full((n, n), float("-inf"), device=tokens.device), diagonal=1)
        x = self.ln_final(self.transformer(x, mask=mask, is_causal=True))
        eot = (tokens == self.eot_token).int().argmax(dim=1)
        return self.projection(x[torch.arange(x.shape[0], device=x.device), eot])


class Tokenizer:
    """The CLIP BPE tokenizer of the host's SD1 text encoder (``comfy/sd1_tokenizer``), to ids padded with the end
    token and cut at ``context`` (the end token kept)."""

    def __init__(self, context: int = TEXT_CONFIG["context"]):
        import comfy.sd1_clip
        from transformers import CLIPTokenizer
        folder = os.path.join(os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__)), "sd1_tokenizer")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.context = context
        self.eot = self.tokenizer.eos_token_id

    def __call__(self, captions: list[str]) -> torch.Tensor:
        rows = [self.tokenizer(c)["input_ids"][:self.context] for c in captions]
        rows = [r if r[-1] == self.eot else r[:-1] + [self.eot] for r in rows]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.eot] * (width - len(r)) for r in rows], dtype=torch.long)


class ContrastiveCLIP(torch.nn.Module):
    """Vision tower + text tower + learned temperature, trained with CLIP's symmetric InfoNCE (Radford et al. 2021,
    Fig. 3). Captions that are equal within a batch are all positives for each other (the mini world repeats
    captions: a subject in a scene), so the targets are the row-normalised caption-equality matrix."""

    def __init__(self, vision_config: dict = VISION_CONFIG, text_config: dict = TEXT_CONFIG, seed: int = 0):
        super().__init__()
        self.vision = build_vision(vision_config, seed)
        torch.manual_seed(seed + 2)
        self.text = TextTower(**text_config)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.vision_config = dict(vision_config)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision(pixel_values=pixels, intermediate_output=-2)[2], dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, same: torch.Tensor | None = None):
        """Loss and accuracy on a batch: ``same`` [B, B] marks equal captions (identity when None).

        Under DDP the features of every rank are gathered (with their gradients, as OpenCLIP's ``gather_with_grad``)
        so that each rank computes the loss of the whole global batch, and ``same`` is then the global
        [W·B, W·B] matrix: the objective and its gradient are the single-process ones whatever the rank count."""
        img, txt = self.encode_image(pixels), self.encode_text(tokens)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            from torch.distributed.nn.functional import all_gather
            img, txt = torch.cat(all_gather(img)), torch.cat(all_gather(txt))
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.T
        target = torch.eye(len(img), device=img.device) if same is None else same.float()
        target = target / target.sum(dim=1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, dim=1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, dim=1), 1).mean())
        acc = (target.gather(1, logits.argmax(1, keepdim=True)) > 0).float().mean()
        return loss, {"accuracy": float(acc), "temperature": float(1 / self.logit_scale.detach().exp())}


def vision_state_dict(model: ContrastiveCLIP | torch.nn.Module) -> dict:
    """The vision tower's weights in the layout ``ClipVisionModel.load_sd`` reads (``vision_model.*``,
    ``visual_projection.weight``)."""
    tower = model.vision if isinstance(model, ContrastiveCLIP) else model
    return {k: v.detach().cpu() for k, v in tower.state_dict().items()}


def save_vision(model, path, *, metadata: dict | None = None, overwrite: bool = True) -> Path:
    """Write the vision tower as a mini CLIP vision file (fp16, widths = its config, tensor checksum) and a
    ``.sha256`` of the file beside it, like the family's checkpoint."""
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in vision_state_dict(model).items()}
    config = model.vision_config if isinstance(model, ContrastiveCLIP) else VISION_CONFIG
    path = CLIP_VISION_FILE.save(tensors, path, family=None, widths=config, metadata=metadata or {},
                                 overwrite=overwrite)
    artifacts.write_file_checksum(path)
    return path


def load_clip_vision(name_or_path):
    """A ComfyUI ``ClipVisionModel`` (the CLIP_VISION object) from a mini CLIP vision file: the kind's checks
    (kind, format, tensor checksum) and, where a ``.sha256`` sits beside it, the file's checksum."""
    import comfy.clip_vision

    from ..core.host import PersonalizeError
    path = CLIP_VISION_FILE.resolve(name_or_path)
    artifacts.check_file_checksum(path, "`make clip-vision` (a part of `make mini-world`)")
    art = CLIP_VISION_FILE.load(path)
    config = dict(art.widths)
    if config.get("model_type") != "clip_vision_model" or "hidden_size" not in config:
        raise PersonalizeError(f"{path.name} does not describe a CLIP vision tower (its widths: {config}). Write it "
                               f"again with {CLIP_VISION_FILE.made_by}.")
    fd, json_path = tempfile.mkstemp(suffix=".json", prefix="mini_clip_vision_")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        clip_vision = comfy.clip_vision.ClipVisionModel(json_path)  # the host's class reads its config from a file
    finally:
        os.unlink(json_path)
    missing, unexpected = clip_vision.load_sd({k: v.float() for k, v in art.tensors.items()})
    if missing or unexpected:
        raise PersonalizeError(f"{path.name} does not fit the CLIP vision tower its widths describe (missing "
                               f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}). Write it again with "
                               f"{CLIP_VISION_FILE.made_by}.")
    clip_vision.path = path
    return clip_vision


class ContrastiveTask:
    """The pre-training task of the mini CLIP (core/pretrain.py's interface): CLIP's loss on a source's images and
    captions. ``validation``: an optional ``validate(module) -> dict`` (e.g. caption retrieval on base-subject
    renders the training stream never draws)."""
    name = "mini_clip_vision"

    def __init__(self, vision_config: dict = VISION_CONFIG, text_config: dict = TEXT_CONFIG, seed: int = 0,
                 validation=None):
        self.vision_config, self.text_config, self.seed = dict(vision_config), dict(text_config), seed
        self.validation = validation
        self._tokenizer = None

    @property
    def tokenizer(self) -> "Tokenizer":
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.text_config["context"])
        return self._tokenizer

    def config(self) -> dict:
        return {"vision": self.vision_config, "text": self.text_config, "seed": self.seed}

    def build(self, device) -> ContrastiveCLIP:
        return ContrastiveCLIP(self.vision_config, self.text_config, self.seed).to(device)

    def inputs(self, batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixels, token ids, caption-equality matrix) of a SubjectBatch; under DDP the matrix is over the captions
        of every rank (rank order), as ContrastiveCLIP.forward gathers the features."""
        pixels = pixel_values(batch.images, self.vision_config).to(device)
        tokens = self.tokenizer(batch.captions).to(device)
        captions = list(batch.captions)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, captions)
            captions = [c for part in gathered for c in part]
        same = torch.tensor([[a == b for b in captions] for a in captions], device=device)
        return pixels, tokens, same

    def loss(self, module, batch, generator):
        device = next(module.parameters()).device
        return module(*self.inputs(batch, device))

    def validate(self, module) -> dict:
        return self.validation(module) if self.validation is not None else {}

    def enable_gradient_checkpointing(self, module: ContrastiveCLIP) -> None:
        """Checkpoint each vision layer (recomputed in the backward pass)."""
        import torch.utils.checkpoint
        for layer in module.vision.vision_model.encoder.layers:
            forward = layer.forward
            layer.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False,
                                                                                         **k))(forward)

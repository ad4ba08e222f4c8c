"""The tuning engine: in-process training on ComfyUI models, shared by every method.

:class:`TrainingSession` owns the host side: private clones of MODEL/CLIP, the patches that make the host's
graph differentiable, optional gradient checkpointing, loading through ComfyUI's model management, inference
tensors turned into normal ones, and — whatever happens — unloading the clones so no patch leaks into later
workflows. :func:`run_loop` owns the optimisation: seeded, a ProgressBar with previews, an interruption check
every step, NaN detection, optional mixed precision on GPU, and the loss history (a LOSS_MAP).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from . import graph_patches, host
from .host import PersonalizeError

log = logging.getLogger("comfyui_personalize")

MIXED_PRECISION = ["auto", "no", "bf16", "fp16"]


@dataclass
class TuningConfig:
    steps: int
    learning_rate: float
    batch_size: int = 1
    seed: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    preview_every: int = 0
    weight_decay: float = 0.0

    def validate(self, node: str) -> None:
        if self.steps < 1:
            raise PersonalizeError(f"{node}: steps must be at least 1.")
        if not self.learning_rate > 0:
            raise PersonalizeError(f"{node}: the learning rate must be positive.")
        if self.batch_size < 1:
            raise PersonalizeError(f"{node}: batch size must be at least 1.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise PersonalizeError(f"{node}: mixed_precision must be one of {MIXED_PRECISION}.")


@dataclass
class TuningResult:
    losses: list = field(default_factory=list)
    preview_latents: list = field(default_factory=list)  # (step, latent [1,4,h,w] user space)
    seconds: float = 0.0

    def loss_map(self) -> dict:
        """The LOSS_MAP socket value ({"loss": [...]}), the format ComfyUI's own LossGraph node plots."""
        return {"loss": list(self.losses)}


class TrainingSession:
    """Context manager preparing private, differentiable clones of MODEL (and CLIP) for training.

    Usage::

        with TrainingSession(model, clip, train_text=True, gradient_checkpointing=gc) as s:
            deltas.attach(s.model)          # add the trainable patches to the clones
            s.load()                        # load + make weights autograd-safe
            ...                             # run_loop(...)
    """

    def __init__(self, model, clip=None, *, train_text: bool = False, gradient_checkpointing: bool = False):
        self._src_model, self._src_clip = model, clip
        self.train_text = train_text
        self.gradient_checkpointing = gradient_checkpointing
        self._stack = contextlib.ExitStack()
        self.model = None
        self.clip = None

    def __enter__(self):
        self._stack.enter_context(torch.inference_mode(False))
        self._stack.enter_context(torch.enable_grad())
        self.model = self._src_model.clone()
        graph_patches.make_unet_differentiable(self.model)
        # CPU only: fused SDPA instead of the hosts' sub-quadratic/basic attention (same maths, far less saved
        # for backward); patches added later on s.model (e.g. attention-map capture) take precedence.
        graph_patches.use_fused_attention(self.model)
        if self.gradient_checkpointing:
            graph_patches.add_gradient_checkpointing(self.model)
        if self._src_clip is not None:
            self.clip = self._src_clip.clone()
            if self.train_text:
                graph_patches.make_text_encoder_differentiable(self.clip.patcher)
                graph_patches.use_fused_text_attention(self.clip.patcher)
        return self

    def load(self) -> None:
        """Load the clones with every patch applied and make their weights safe for autograd."""
        patchers = [self.model] + ([self.clip.patcher] if self.clip is not None and self.train_text else [])
        host.load_for_compute(*patchers)
        host.uninference(self.model.model)
        self.model.model.requires_grad_(False)
        if self.clip is not None and self.train_text:
            host.uninference(self.clip.cond_stage_model)
            self.clip.cond_stage_model.requires_grad_(False)

    def adopt(self, module: torch.nn.Module, device=None) -> torch.nn.Module:
        """Make ``module``'s parameters normal (non-inference) trainable tensors on ``device`` (default: the
        model's). Needed for anything created while the executor's inference mode was on."""
        device = device or self.device
        for sub in module.modules():
            for k, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[k] = torch.nn.Parameter(p.detach().to(device).clone(), requires_grad=p.requires_grad)
        return module

    @property
    def device(self) -> torch.device:
        return self.model.load_device

    def __exit__(self, *exc):
        try:
            host.release(*(p for p in (self.model, getattr(self.clip, "patcher", None)) if p is not None))
        finally:
            self._stack.close()
        return False


def _autocast(mode: str, device: torch.device):
    if device.type != "cuda" or mode == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    if mode == "auto" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast("cuda", dtype=dtype)


def latent_preview_image(model, latent: torch.Tensor):
    """A cheap RGB preview of a user-space latent with the latent format's linear factors (no VAE load)."""
    from PIL import Image
    factors = getattr(model.model.latent_format, "latent_rgb_factors", None)
    x = latent[0].float().cpu()
    if factors is not None:
        rgb = torch.einsum("chw,cr->hwr", x, torch.tensor(factors, dtype=torch.float32))
        rgb = ((rgb + 1) / 2).clamp(0, 1)
    else:
        rgb = ((x[:3].permute(1, 2, 0) + 1) / 2).clamp(0, 1)
    img = Image.fromarray((rgb.numpy() * 255).astype("uint8"))
    return img.resize((img.width * 8, img.height * 8))


def make_optimizer(params: list, cfg: TuningConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer :func:`run_loop` uses: AdamW with the multi-tensor (``foreach``) implementation on CUDA and
    CPU. A LoRA has a hundred-odd small tensors; the per-tensor loop costs ~10 kernels each per step, the foreach
    path a handful in all (CPU, 80 rank-4 tensors: 3.5 -> 1.6 ms/step) and updates bit-identically."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             foreach=torch.device(device).type in ("cuda", "cpu"))


def train_step(node: str, step: int, step_fn, opt: torch.optim.Optimizer, cfg: TuningConfig,
               device: torch.device):
    """One optimisation step of :func:`run_loop`: interruption check, forward under the configured
    precision, non-finite check, backward, optimizer step. Returns ``(loss value, denoised or None)``."""
    host.check_interrupt()
    with _autocast(cfg.mixed_precision, device):
        loss, denoised = step_fn(step)
    value = float(loss.detach())
    if value != value or value in (float("inf"), float("-inf")):
        raise PersonalizeError(
            f"{node}: the loss became {value} at step {step + 1}; training stopped and nothing was saved. "
            f"Lower the learning rate (now {cfg.learning_rate:g}) or use mixed_precision 'no'.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value, denoised


def run_loop(node: str, params: list, step_fn, cfg: TuningConfig, *, device: torch.device, node_id=None,
             preview_model=None) -> TuningResult:
    """Optimise ``params`` with AdamW for ``cfg.steps`` steps.

    ``step_fn(step) -> (loss, denoised_model_space or None)``. Raises :class:`PersonalizeError` on a non-finite
    loss and ComfyUI's InterruptProcessingException when the user cancels (checked before every step).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise PersonalizeError(f"{node}: nothing to train.")
    opt = make_optimizer(params, cfg, device)
    pbar = host.progress_bar(cfg.steps, node_id)
    result = TuningResult()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        value, denoised = train_step(node, step, step_fn, opt, cfg, device)
        result.losses.append(value)
        preview = None
        last = step + 1 == cfg.steps
        if denoised is not None and (last or (cfg.preview_every and (step + 1) % cfg.preview_every == 0)):
            latent = preview_model.model.process_latent_out(denoised[:1].detach().float()).cpu()
            result.preview_latents.append((step + 1, latent))
            if cfg.preview_every:
                preview = ("JPEG", latent_preview_image(preview_model, latent), 512)
        pbar.update_absolute(step + 1, cfg.steps, preview)
    result.seconds = time.perf_counter() - t0
    k = max(1, len(result.losses) // 10)
    first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
    log.info("%s: %d steps in %.1f s, loss %.4f -> %.4f (mean of first/last %d)",
             node, cfg.steps, result.seconds, first, last, k)
    return result


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)

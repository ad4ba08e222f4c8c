"""The tuning engine: in-process training on ComfyUI models, shared by every method.

:class:`TrainingSession` owns the host side: private clones of MODEL/CLIP, the patches that make the host's
graph differentiable, optional gradient checkpointing, loading through ComfyUI's model management, inference
tensors turned into normal ones, and — whatever happens — unloading the clones so no patch leaks into later
workflows. :func:`run_loop` owns the optimisation, as a list of :class:`Phase` objects (parameters, optimiser,
learning rate, steps, loss function) run one after the other: one ProgressBar with previews over all of them, an
interruption check every step, the non-finite-loss guard of :func:`optimiser_step`, optional mixed precision on
GPU, and the loss history (a LOSS_MAP). Methods never drive an optimiser or a progress bar themselves.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

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


def decode_previews(vae, result: TuningResult) -> torch.Tensor:
    """Decode the preview latents :func:`run_loop` recorded into one IMAGE batch."""
    latents = torch.cat([lat for _step, lat in result.preview_latents], dim=0)
    with torch.no_grad():  # a report, not part of any loss (and the VAE's weights may be inference tensors)
        return vae.decode(latents)


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


def make_optimizer(params: list, config: TuningConfig, device: torch.device,
                   learning_rate: float | None = None) -> torch.optim.Optimizer:
    """The default optimiser of a :class:`Phase`: AdamW (``config.learning_rate`` unless ``learning_rate`` is
    given, ``config.weight_decay``) with the multi-tensor (``foreach``) implementation on CUDA and CPU. A LoRA has a
    hundred-odd small tensors; the per-tensor loop costs ~10 kernels each per step, the foreach path a handful in
    all (CPU, 80 rank-4 tensors: 3.5 -> 1.6 ms/step) and updates bit-identically."""
    lr = config.learning_rate if learning_rate is None else learning_rate
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay,
                             foreach=torch.device(device).type in ("cuda", "cpu"))


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, nonfinite_message: Callable[[float], str]) -> float:
    """The pack's one optimiser step: refuse a non-finite loss (raise :class:`PersonalizeError` with
    ``nonfinite_message(value)``, before anything is updated), else zero the gradients, backward, step. Returns the
    loss value. Used by :func:`run_loop` and by the per-sampling-step inner optimisations (null-text inversion,
    reference guidance)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise PersonalizeError(nonfinite_message(value))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


def train_step(node: str, step: int, step_fn, opt: torch.optim.Optimizer, config: TuningConfig,
               device: torch.device, learning_rate: float | None = None):
    """One step of :func:`run_loop`: interruption check, forward under the configured precision, then
    :func:`optimiser_step`. Returns ``(loss value, denoised or None)``."""
    host.check_interrupt()
    with _autocast(config.mixed_precision, device):
        loss, denoised = step_fn(step)
    lr = config.learning_rate if learning_rate is None else learning_rate
    value = optimiser_step(loss, opt, lambda v: (
        f"{node}: the loss became {v} at step {step + 1}; training stopped and nothing was saved. "
        f"Lower the learning rate (now {lr:g}) or use mixed_precision 'no'."))
    return value, denoised


@dataclass
class Phase:
    """One stretch of :func:`run_loop`: ``steps`` optimiser steps of ``step_fn(step) -> (loss, denoised or None)``
    on ``params`` (those with ``requires_grad``), with a fresh optimiser made by ``make_optimizer(params, config,
    device, learning_rate)`` (default AdamW, :func:`make_optimizer`). ``learning_rate`` None takes the config's.
    ``label`` names the phase in error messages; ``on_end()`` runs when the phase is done (e.g. a snapshot)."""
    params: list
    steps: int
    step_fn: Callable
    learning_rate: float | None = None
    label: str = ""
    make_optimizer: Callable = make_optimizer
    on_end: Callable | None = None


def run_loop(node: str, phases: list, config: TuningConfig, *, device: torch.device, node_id=None,
             preview_model=None) -> TuningResult:
    """Run ``phases`` (a list of :class:`Phase`) one after the other; ``step`` counts across all of them.

    One ProgressBar covers every step; with ``preview_model`` the ``denoised`` of every ``config.preview_every``-th
    step and of the last one is recorded (and shown). Raises :class:`PersonalizeError` on a non-finite loss and
    ComfyUI's InterruptProcessingException when the user cancels (checked before every step).
    """
    plans = []
    for phase in phases:
        params = [p for p in phase.params if p.requires_grad]
        if not params:
            raise PersonalizeError(f"{node}: nothing to train.")
        plans.append((phase, params))
    total = sum(phase.steps for phase in phases)
    pbar = host.progress_bar(total, node_id)
    result = TuningResult()
    t0 = time.perf_counter()
    step = 0
    for phase, params in plans:
        opt = phase.make_optimizer(params, config, device, phase.learning_rate)
        name = f"{node} ({phase.label})" if phase.label else node
        for _ in range(phase.steps):
            value, denoised = train_step(name, step, phase.step_fn, opt, config, device, phase.learning_rate)
            result.losses.append(value)
            step += 1
            pbar.update_absolute(step, total, _preview(result, preview_model, denoised, step, total, config))
        if phase.on_end is not None:
            phase.on_end()
    result.seconds = time.perf_counter() - t0
    k = max(1, len(result.losses) // 10)
    first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
    log.info("%s: %d steps in %.1f s, loss %.4f -> %.4f (mean of first/last %d)",
             node, total, result.seconds, first, last, k)
    return result


def _preview(result: TuningResult, preview_model, denoised, step: int, total: int, config: TuningConfig):
    """Record the preview latent of this step if it is due; returns the ProgressBar preview (or None)."""
    due = step == total or (config.preview_every and step % config.preview_every == 0)
    if preview_model is None or denoised is None or not due:
        return None
    latent = preview_model.model.process_latent_out(denoised[:1].detach().float()).cpu()
    result.preview_latents.append((step, latent))
    return ("JPEG", latent_preview_image(preview_model, latent), 512) if config.preview_every else None


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)

"""Image inversion for HiFi Tuner (Wang et al. 2023, arXiv 2312.00079, §3.4 / Algorithm 3): deterministic DDIM
inversion (paper Eq. 3) and null-text optimisation (paper Eq. 4, after Mokady et al. 2023, "Null-text
Inversion"), written in ComfyUI's σ-space on the sampling core (core/sampling.py).

Conventions (core/sampling.py). The sampler state is ``x = x0 + σ·ε`` (model space, after
``process_latent_in``); a MODEL gives the denoised estimate ``D(x, σ)`` through ``BaseModel.apply_model`` and
``ε̂ = (x − D(x, σ))/σ`` for every parametrisation (ε or v: the host's ``model_sampling`` converts), so SD2's
v-prediction needs nothing special. With ``ᾱ = 1/(1+σ²)`` the VP state of the paper is ``x_t = x/√(1+σ²)``, and

* Eq. 1, one deterministic DDIM step (η = 0) with CFG from σ to σ' < σ, is the Euler step
  ``x' = x + (σ' − σ)·ε̃``, ``ε̃ = ε̂_∅ + w(ε̂_c − ε̂_∅)``. Because ε̂ is affine in D this equals
  ``x' = x + (σ' − σ)(x − D̃)/σ`` with ``D̃ = D_∅ + w(D_c − D_∅)``, what ComfyUI's CFG computes
  (:func:`ddim_step`).
* Eq. 3, DDIM inversion, runs the same step upwards, σ_a → σ_b > σ_a, with ε̂ evaluated at the *target* noise
  level on the *current* VP state ("x_{t+1} ≈ x_t", the standard approximation; the public null-text inversion
  code queries ``ε_θ(x_{t−1}, t)``). That works from the clean latent (σ = 0) and is :func:`ddim_invert` with
  ``fixed_point_iterations=0``. With iterations > 0 each step is refined by fixed-point iteration on
  ``x_b = x_a + (σ_b − σ_a)·ε̂(x_b, σ_b)``, the exact inverse of the Euler step (Pan et al. 2023, "AIDI";
  Garibi et al. 2024, "ReNoise"); converged, the DDIM sampler retraces the trajectory exactly.
* Eq. 4, null-text optimisation: walking down the schedule from the sampler's own state ``x_t`` (starting at
  ``x*_T``), optimise the unconditional embedding ``ϕ_t`` so that the CFG step lands on ``x*_{t−1}``:
  ``ϕ_t = argmin ‖x*_{t−1} − F^(t)(x_t, c, ϕ_t)‖²`` (VP units), initialised from ``ϕ_{t+1}``. The
  conditional branch does not depend on ϕ and is evaluated once per step (:func:`null_text_optimise`).

The replay sampler (:func:`sample_inverted`, a stock ``comfy.samplers.KSAMPLER`` through
:func:`core.sampling.sampler_from_function`) is the same DDIM/Euler step; it puts ``ϕ_t`` into the unconditional
branch through the per-call ``model_options`` every KSAMPLER sampler function receives in ``extra_args`` and hands
back to ``model(x, σ, **extra_args)``: a ``model_function_wrapper`` that swaps the ``c_crossattn`` of the batch
chunks that ``cond_or_uncond`` marks as negative (1), chaining any wrapper the MODEL already has. The conds
themselves live in the guider, out of a sampler's reach; ``extra_args["model_options"]`` goes through
``KSamplerX0Inpaint`` → CFG → ``calc_cond_batch`` (comfy/samplers.py), which calls
``model_function_wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})`` with the batched cond and
uncond chunks. Doing it in the sampler keys ϕ by the step index (no matching of σ values) and needs no patch on the
MODEL, so the SAMPLER output alone carries the inversion, with SamplerCustom and SamplerCustomAdvanced + CFGGuider.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from ..core import host
from ..core.host import PersonalizeError
from ..core.sampling import (UNCOND, InterruptibleProgress, ModelPrediction, check_same_schedule, check_sigmas,
                             check_single_conditioning, ddim_step, denoise, guided_denoised, report_step,
                             sampler_from_function, sigma_batch, sigma_list, with_model_function_wrapper)
from ..core.tuning import TrainingSession, optimiser_step

log = logging.getLogger("comfyui_personalize")

NODE = "Invert Image"

# ---------------------------------------------------------------------------------------------------------
# The maths on any denoiser ``model(x, sigma[B], context, uncond=False) -> D(x, σ)`` (model space; the protocol of
# core.sampling.ModelPrediction).


def ddim_invert(model, latent: torch.Tensor, cond: torch.Tensor, sigmas, cfg: float = 1.0,
                uncond: torch.Tensor | None = None, *, fixed_point_iterations: int = 0,
                progress: InterruptibleProgress | None = None) -> torch.Tensor:
    """DDIM inversion (paper Eq. 3): the trajectory ``[x*_0 … x*_T]`` of ``latent`` along ``sigmas``.

    ``latent``: model-space state at ``sigmas[-1]`` (normally 0: the clean latent); ``sigmas``: the *sampling*
    schedule, strictly descending (what SIGMAS sockets carry). Returns a tensor ``[N+1, *latent.shape]`` whose
    entry ``k`` is the state at ``sigmas.flip(0)[k]`` (ascending noise; entry N is the inverted noise at
    ``sigmas[0]``). Paper default ``cfg = 1`` (conditional branch only, "pivotal" inversion).

    Step σ_a → σ_b: the UNet sees the current VP state ``x_a/√(1+σ_a²)`` at noise level σ_b (Eq. 3's
    approximation, i.e. the σ-space input ``g = x_a·√(1+σ_b²)/√(1+σ_a²)``), and
    ``x_b = x_a + (σ_b − σ_a)·ε̃(g, σ_b)``. Each of ``fixed_point_iterations`` then re-evaluates
    ``x_b ← x_a + (σ_b − σ_a)·ε̃(x_b, σ_b)``, converging to the exact inverse of :func:`ddim_step`.
    ``progress`` advances by one per model evaluation.
    """
    sig = sigma_list(sigmas)
    asc = sig[::-1]
    progress = progress or InterruptibleProgress()
    evaluations = 1 + max(0, int(fixed_point_iterations))
    x = latent
    traj = [x]
    with torch.no_grad():
        for k in range(len(asc) - 1):
            a, b = asc[k], asc[k + 1]
            guess = x * math.sqrt((1.0 + b * b) / (1.0 + a * a))
            for _ in range(evaluations):
                progress.check()
                d = guided_denoised(model, guess, b, cond, uncond, cfg)
                guess = x + (b - a) * (guess - d) / b
            x = guess
            traj.append(x)
            progress.advance(evaluations)
    return torch.stack(traj)


def ddim_sample(model, x: torch.Tensor, cond: torch.Tensor, uncond, sigmas, cfg: float) -> torch.Tensor:
    """Deterministic DDIM sampling (paper Eq. 1 per step) from ``x`` at ``sigmas[0]`` down to ``sigmas[-1]``.

    ``uncond``: one unconditional context for every step, or a list with one per step (null-text embeddings).
    The reference the replay sampler (:func:`sample_inverted`) implements inside ComfyUI's sampling.
    """
    sig = sigma_list(sigmas)
    with torch.no_grad():
        for i in range(len(sig) - 1):
            u = uncond[i] if isinstance(uncond, (list, tuple)) else uncond
            x = ddim_step(x, guided_denoised(model, x, sig[i], cond, u, cfg), sig[i], sig[i + 1])
    return x


@dataclass
class NullTextResult:
    embeddings: list            # ϕ_t per sampling step i (σ_i → σ_{i+1}), each [B, L, d], detached
    losses: list                # last inner-loop loss per step (VP units)
    residuals: list             # ‖x − x*_{t−1}‖² (mean, VP units) of the optimised step actually taken
    inner_steps_run: list = field(default_factory=list)
    final: torch.Tensor | None = None  # the state the optimised steps reach at sigmas[-1]
    states: list = field(default_factory=list)  # x_i the optimised steps reach, i = 0..N (x_0 = x*_T, x_N = final)


def null_text_optimise(model, trajectory: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, sigmas,
                       cfg: float, inner_steps: int = 10, lr: float = 1e-2, early_stop: float = 1e-5, *,
                       progress: InterruptibleProgress | None = None) -> NullTextResult:
    """Null-text optimisation (paper Eq. 4): per sampling step ``i`` (σ_i → σ_{i+1}) the unconditional embedding
    ``ϕ_i = argmin_ϕ ‖x*_{i+1} − F(x_i, c, ϕ)‖² / (1+σ_{i+1}²)`` where ``F`` is the CFG DDIM step
    (:func:`ddim_step` of :func:`guided_denoised`) and ``x_i`` the state the previous optimised steps reached
    (``x_0 = x*_T``), so errors do not accumulate.

    ``trajectory`` as returned by :func:`ddim_invert` (ascending), ``sigmas`` the descending schedule it was
    made on. The loss is the mean squared error of the VP states (σ-space error / (1+σ²)), the units of the
    public implementation, whose schedule this follows for N = 50 steps: Adam, ``lr·(1 − i/(2N))``, at most
    ``inner_steps`` updates, stop once the loss is below ``early_stop·(1 + 100·i/N)``; ϕ_i starts from ϕ_{i−1}
    (from ``uncond`` at i = 0). The conditional prediction ``D_c(x_i, σ_i)`` is computed once per step.
    """
    sig = sigma_list(sigmas)
    n = len(sig) - 1
    if trajectory.shape[0] != n + 1:
        raise ValueError(f"trajectory has {trajectory.shape[0]} states for {n} steps")
    progress = progress or InterruptibleProgress()
    x = trajectory[n].detach()
    phi = uncond.detach()
    if phi.shape[0] != x.shape[0]:
        phi = phi.expand(x.shape[0], *phi.shape[1:])
    result = NullTextResult([], [], [])
    result.states.append(x)
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        target = trajectory[n - 1 - i].detach()
        scale = 1.0 / (1.0 + s_next * s_next)
        sb = sigma_batch(s, x)
        progress.check()
        with torch.no_grad():
            d_c = model(x, sb, cond)  # cached: the conditional branch does not depend on ϕ
        phi = phi.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([phi], lr=lr * (1.0 - i / (2.0 * n)))
        threshold = early_stop * (1.0 + 100.0 * i / n)
        loss_value, ran = float("nan"), 0
        for _ in range(max(0, int(inner_steps))):
            progress.check()
            x_prev = ddim_step(x, guided_denoised(model, x, s, cond, phi, cfg, cond_denoised=d_c), s, s_next)
            loss = (x_prev - target).pow(2).mean() * scale
            loss_value = optimiser_step(loss, opt, lambda v: (
                f"{NODE}: the null-text loss became {v} at step {i + 1}; lower the learning rate (now {lr:g})."))
            ran += 1
            if loss_value < threshold:
                break
        phi = phi.detach()
        with torch.no_grad():
            x = ddim_step(x, guided_denoised(model, x, s, cond, phi, cfg, cond_denoised=d_c), s, s_next)
        result.embeddings.append(phi)
        result.losses.append(loss_value)
        result.residuals.append(float((x - target).pow(2).mean()) * scale)
        result.inner_steps_run.append(ran)
        result.states.append(x)
        progress.advance()
    result.final = x
    return result


# ---------------------------------------------------------------------------------------------------------
# The node's work: validation, inversion, null-text optimisation.

@dataclass
class Inversion:
    """What the INVERSION socket carries. Tensors on the intermediate device, model space."""
    sigmas: torch.Tensor                 # the descending schedule [N+1]
    trajectory: torch.Tensor             # [N+1, B, C, h, w], entry k at sigmas.flip(0)[k]
    cond: torch.Tensor                   # the positive context used
    cfg: float                           # guidance the null-text embeddings were optimised for
    null_embeddings: list | None = None  # ϕ per sampling step, each [B, L, d]; None = plain inversion
    states: torch.Tensor | None = None   # [N+1, B, C, h, w] the states CFG replay with ϕ_t visits (null-text only)
    losses: list = field(default_factory=list)
    residuals: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    def check_replay(self, sigmas: torch.Tensor, x: torch.Tensor) -> None:
        """The replay sampler needs the schedule and batch the embeddings were made for."""
        check_same_schedule(NODE, self.sigmas, sigmas, "the null-text embeddings were made for")
        batch = self.trajectory.shape[1]
        if x.shape[0] != batch:
            raise PersonalizeError(f"{NODE}: the inversion is of {batch} latent(s) but the sampler got a batch of "
                                   f"{x.shape[0]}. Sample the node's own LATENT output.")


def check_inputs(model, positive, negative, latent, sigmas, cfg: float, null_text_steps: int,
                 learning_rate: float, fixed_point_iterations: int = 0) -> None:
    """Every user-facing check, before any model work (raises :class:`PersonalizeError`)."""
    host.require_family(NODE, model)
    check_single_conditioning(NODE, positive, "positive")
    check_single_conditioning(NODE, negative, "negative")
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None or samples.ndim != 4 or samples.numel() == 0:
        shape = tuple(samples.shape) if samples is not None else None
        raise PersonalizeError(f"{NODE}: the LATENT is empty (samples {shape}). Connect VAE Encode of the image "
                               "to invert.")
    if not torch.isfinite(samples).all():
        raise PersonalizeError(f"{NODE}: the LATENT contains NaN or infinite values.")
    if not bool(samples.abs().amax() > 0):
        raise PersonalizeError(f"{NODE}: the LATENT is all zeros (an Empty Latent Image?). Connect VAE Encode of "
                               "the image to invert.")
    check_sigmas(NODE, sigmas, "Do not connect Flip Sigmas: this node walks the schedule upwards itself.")
    if not math.isfinite(cfg):
        raise PersonalizeError(f"{NODE}: cfg must be a finite number.")
    if null_text_steps < 0 or fixed_point_iterations < 0:
        raise PersonalizeError(f"{NODE}: null_text_steps and fixed_point_iterations must be 0 or more.")
    if null_text_steps > 0:
        if cfg == 1.0:
            raise PersonalizeError(
                f"{NODE}: null-text optimisation needs cfg ≠ 1 (at cfg 1 the negative prompt has no effect). Set "
                "cfg to the guidance you will sample with, or null_text_steps to 0 for plain inversion.")
        if not learning_rate > 0:
            raise PersonalizeError(f"{NODE}: the learning rate must be positive.")


def invert_image(model, positive: list, negative: list, latent: dict, sigmas: torch.Tensor, *, cfg: float,
                 null_text_steps: int, learning_rate: float, fixed_point_iterations: int = 0,
                 early_stop: float = 1e-5, node_id=None) -> Inversion:
    """Invert a LATENT along ``sigmas`` (Eq. 3, conditional branch only) and, if ``null_text_steps > 0``,
    optimise per-step null-text embeddings for guidance ``cfg`` (Eq. 4). Runs on a private clone of MODEL
    (TrainingSession: differentiable UNet, released afterwards)."""
    check_inputs(model, positive, negative, latent, sigmas, cfg, null_text_steps, learning_rate,
                 fixed_point_iterations)
    n = sigmas.shape[0] - 1
    total = n * (1 + fixed_point_iterations) + (n if null_text_steps > 0 else 0)
    progress = InterruptibleProgress(total, node_id)
    t0 = time.perf_counter()
    with TrainingSession(model) as s:
        s.load()
        device = s.device
        x0 = s.model.model.process_latent_in(latent["samples"].float().clone()).to(device)
        pos = [[positive[0][0].detach().clone().float().to(device), positive[0][1]]]
        neg = [[negative[0][0].detach().clone().float().to(device), negative[0][1]]]
        denoiser = ModelPrediction.for_conditioning(s.model, pos, neg, x0, NODE)
        sig = sigmas.detach().double().cpu()
        traj = ddim_invert(denoiser, x0, pos[0][0], sig, fixed_point_iterations=fixed_point_iterations,
                           progress=progress)
        result = None
        if null_text_steps > 0:
            result = null_text_optimise(denoiser, traj, pos[0][0], neg[0][0], sig, cfg, inner_steps=null_text_steps,
                                        lr=learning_rate, early_stop=early_stop, progress=progress)
    out = host.intermediate_device()
    inv = Inversion(sigmas=sigmas.detach().float().cpu(), trajectory=traj.detach().to(out),
                    cond=positive[0][0].detach().clone(), cfg=float(cfg),
                    null_embeddings=[e.to(out) for e in result.embeddings] if result else None,
                    states=torch.stack(result.states).detach().to(out) if result else None,
                    losses=result.losses if result else [], residuals=result.residuals if result else [],
                    seconds=time.perf_counter() - t0)
    if result:
        log.info("%s: %d steps, null-text %d inner steps (ran %d), residual %.3g -> final %.3g, %.1f s", NODE, n,
                 null_text_steps, sum(result.inner_steps_run), result.residuals[0], result.residuals[-1],
                 inv.seconds)
    else:
        log.info("%s: %d steps of DDIM inversion in %.1f s", NODE, n, inv.seconds)
    return inv


def inverted_latent(model, inv: Inversion, latent: dict) -> dict:
    """The LATENT a stock SamplerCustom with ``add_noise=False`` starts from to retrace the inversion.

    ``KSAMPLER.sample`` starts at ``noise_scaling(σ_0, noise=0, latent) = latent`` (both hosts) after the
    sampler's ``process_latent_in``, so the socket holds ``process_latent_out(x*_T)`` in user (VAE) space.
    """
    out = {"samples": model.model.process_latent_out(inv.trajectory[-1].float().clone()).cpu()}
    if "batch_index" in latent:
        out["batch_index"] = latent["batch_index"]
    return out


# ---------------------------------------------------------------------------------------------------------
# The replay sampler.

def _fit_context(phi: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ϕ [B or 1, L, d] shaped like a batch chunk's context [B, L·k, d] (the host repeats shorter contexts to the
    least common multiple of the lengths when it batches conds; repeating keys leaves attention unchanged)."""
    if like.shape[1] % phi.shape[1] != 0 or like.shape[2] != phi.shape[2]:
        raise PersonalizeError(
            f"{NODE}: the negative prompt's context has shape {tuple(like.shape[1:])} in sampling but the null-text "
            f"embeddings have {tuple(phi.shape[1:])}. Sample with the MODEL and prompts used for the inversion.")
    phi = phi.to(device=like.device, dtype=like.dtype)
    if phi.shape[1] != like.shape[1]:
        phi = phi.repeat(1, like.shape[1] // phi.shape[1], 1)
    if phi.shape[0] != like.shape[0]:
        if phi.shape[0] != 1:
            raise PersonalizeError(f"{NODE}: null-text embeddings for a batch of {phi.shape[0]} met a batch of "
                                   f"{like.shape[0]} in sampling. Sample the node's own LATENT output.")
        phi = phi.expand(like.shape[0], -1, -1)
    return phi


def uncond_swap_wrapper(phi: torch.Tensor, inner=None):
    """A ``model_function_wrapper`` that replaces the cross-attention context of every negative chunk
    (``cond_or_uncond == 1``) of the batch with ``phi``, then calls ``inner`` (the MODEL's own wrapper) or
    ``apply_model``. Signature as both hosts call it:
    ``f(apply_model, {"input", "timestep", "c", "cond_or_uncond"})``."""
    def wrapper(apply_model, args):
        tags = list(args["cond_or_uncond"])
        c = dict(args["c"])
        context = c.get("c_crossattn")
        if context is not None and UNCOND in tags:
            size = context.shape[0] // len(tags)
            chunks = list(context.split(size))
            for k, tag in enumerate(tags):
                if tag == UNCOND:
                    chunks[k] = _fit_context(phi, chunks[k])
            c["c_crossattn"] = torch.cat(chunks)
        args = dict(args, c=c)
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **c)
    return wrapper


def sample_inverted(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion: Inversion | None = None):
    """KSAMPLER sampler function: deterministic DDIM (Euler in σ, :func:`ddim_step`) that, for an inversion with
    null-text embeddings, uses ϕ_i as the negative context of step i. Same k-diffusion signature as ComfyUI's
    samplers; ``extra_args`` is passed through with only ``model_options`` replaced per step by a copy whose
    ``model_function_wrapper`` is :func:`uncond_swap_wrapper` (chaining the MODEL's own wrapper)."""
    extra_args = {} if extra_args is None else extra_args
    embeddings = inversion.null_embeddings if inversion is not None else None
    if embeddings is not None:
        inversion.check_replay(sigmas, x)
    for i in range(len(sigmas) - 1):
        args = extra_args
        if embeddings is not None:
            args = with_model_function_wrapper(extra_args, lambda inner: uncond_swap_wrapper(embeddings[i], inner))
        denoised = denoise(model, x, sigmas[i], args)
        report_step(callback, x, i, sigmas[i], denoised)
        x = ddim_step(x, denoised, sigmas[i], sigmas[i + 1])
    return x


def replay_sampler(inv: Inversion | None):
    """A SAMPLER for SamplerCustom / SamplerCustomAdvanced that replays ``inv``."""
    return sampler_from_function(sample_inverted, inversion=inv)

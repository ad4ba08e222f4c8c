"""HiFi Tuner reference-guided generation (Wang et al. 2023, arXiv 2312.00079, §3.3, Algorithm 2), as a ComfyUI
SAMPLER.

The maths, in the σ-space of core/sampling.py (paper step ``t`` counts down from ``T = N`` sampling steps;
sampler step ``i = N − t`` goes σ_i → σ_{i+1}):

* at ``t = t_s`` paste the aligned reference's inverted latent into the subject region: ``x ← (1−M)·x + M·x*_t``;
* every step is the deterministic DDIM step of the CFG prediction (Eq. 1), ``x' = F(x, [c, c_s^t], ϕ)``;
* for ``t_e ≤ t ≤ t_s``, J Adam steps on the null embedding ``ϕ_h`` minimise (Eq. 10)
  ``L_h = ‖M ⊙ (x*_{t−1} − F(x, [c, c_s^t], ϕ_h))‖²`` (VP units, mean over the masked elements), then only the
  subject region takes the guided step: ``x' ← (1−M)·x' + M·F(x, [c, c_s^t], ϕ_h)``. ``ϕ_h`` starts as the
  negative prompt's context at ``t_s`` and is carried from step to step (Algorithm 2); each step gets a fresh Adam
  (the paper does not say; null-text inversion does the same).

Cost (the issue's requirement, and the paper's remark): ``ϕ_h`` enters only the unconditional branch. With the
sampler's CFG result ``D̃ = D_∅ + w(D_c − D_∅)`` computed once per step by the host,
``F(·, ϕ_h)`` uses ``D̃_h = D̃ + (1 − w)·(D_∅(ϕ_h) − D_∅(ϕ))``, which is exactly CFG with ϕ_h; so each inner step
costs one forward and backward of the unconditional branch only, never the conditional one.

Inside ComfyUI the unconditional branch is reached through the per-call ``model_options`` of the sampler's
``extra_args``: a ``model_function_wrapper`` (:class:`UncondCapture`) records the negative chunk's inputs - the
batched call the host makes in ``calc_cond_batch`` - and the bound ``apply_model`` it was
given, which is then called again with ϕ_h under autograd. The positive prompt (with HiFi Subject Conditioning's
step-wise rows, model patches, ControlNets) is whatever the guider has; the sampler never needs to see it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from ..core import graph_patches, host
from ..core.host import PersonalizeError
from ..core.sampling import (UNCOND, check_same_schedule, check_sigmas, check_single_conditioning, ddim_step, denoise,
                             report_step, with_cond_scale_capture, sampler_from_function, sigma_list,
                             with_model_function_wrapper)
from ..core.tuning import optimiser_step

log = logging.getLogger("comfyui_personalize")

NODE = "HiFi Reference-Guided Sampler"


# ---------------------------------------------------------------------------------------------------------
# The guided step, on any differentiable unconditional branch.

class UncondBranch:
    """The unconditional branch at one step: ``context`` (the ϕ it was evaluated with), ``denoised`` (D_∅(ϕ)),
    ``__call__(phi) -> D_∅(phi)``, differentiable in ``phi``, and ``cond_scale``, the guidance scale of the CFG
    evaluation it was captured from (None when the caller gives the scale)."""

    def __init__(self, fn, context: torch.Tensor, denoised: torch.Tensor, cond_scale: float | None = None):
        self.fn, self.context, self.denoised, self.cond_scale = fn, context, denoised, cond_scale

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        return self.fn(phi)


def guided_step(x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor, branch: UncondBranch,
                phi: torch.Tensor, cfg: float, target: torch.Tensor, mask: torch.Tensor, inner_steps: int, lr: float):
    """One guided step of Algorithm 2 (``t_e ≤ t ≤ t_s``): returns ``(x', ϕ_h, losses)``.

    ``denoised`` is the host's CFG prediction D̃ (with ϕ), ``target`` the reference trajectory's state at
    ``sigma_next`` (x*_{t−1}), ``mask`` the aligned reference mask at latent resolution, broadcastable to ``x``.
    The loss is Eq. 10 in VP units, ``Σ M·(x*_{t−1} − F_h)² / (ΣM·C) / (1+σ'²)``.
    """
    scale = 1.0 / (1.0 + sigma_next * sigma_next)
    losses = []
    with torch.inference_mode(False), torch.enable_grad():  # tensors made by the sampler are inference tensors
        base, d_u, xx, tgt = (t.detach().clone() for t in (denoised, branch.denoised, x, target))
        weight = mask.expand_as(x).clone()
        count = float(weight.sum().clamp_min(1e-8))
        phi = phi.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([phi], lr=lr)
        for _ in range(inner_steps):
            host.check_interrupt()
            d_h = base + (1.0 - cfg) * (branch(phi) - d_u)
            x_h = ddim_step(xx, d_h, sigma, sigma_next)
            loss = ((x_h - tgt).pow(2) * weight).sum() / count * scale
            losses.append(optimiser_step(loss, opt, lambda v: (
                f"{NODE}: the guidance loss became {v}; lower the learning rate (now {lr:g}).")))
        phi = phi.detach()
        with torch.no_grad():
            d_h = base + (1.0 - cfg) * (branch(phi) - d_u) if inner_steps > 0 else base
    x_plain = ddim_step(x, denoised, sigma, sigma_next)
    x_guided = ddim_step(x, d_h.to(x.dtype), sigma, sigma_next)
    return x_plain + mask * (x_guided - x_plain), phi, losses


@dataclass
class ReferenceGuidance:
    """What the sampler carries: the inverted, aligned reference and the guidance settings (model space)."""
    sigmas: torch.Tensor         # descending schedule [N+1] the trajectory was made on
    trajectory: torch.Tensor     # [N+1, 1|B, C, h, w], entry k at sigmas.flip(0)[k]
    mask: torch.Tensor           # [1|B, 1, h, w] aligned reference mask M_r* at latent resolution, in [0, 1]
    t_start: int                 # paper t_s (counted down from N)
    t_end: int                   # paper t_e
    inner_steps: int = 10
    lr: float = 1e-2
    reference_index: int = 0
    alignment_iou: float = float("nan")
    losses: list = field(default_factory=list)  # filled by the last run: per guided step, last inner loss

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    @property
    def start_index(self) -> int:
        return self.steps - self.t_start

    @property
    def end_index(self) -> int:
        return self.steps - self.t_end

    def target(self, i: int) -> torch.Tensor:
        """x* at σ_i (entry N − i of the ascending trajectory)."""
        return self.trajectory[self.steps - i]

    def check(self, sigmas: torch.Tensor, x: torch.Tensor) -> None:
        check_same_schedule(NODE, self.sigmas, sigmas, "the reference was inverted on")
        if tuple(x.shape[-2:]) != tuple(self.trajectory.shape[-2:]):
            h, w = self.trajectory.shape[-2:]
            raise PersonalizeError(
                f"{NODE}: the generated mask is {w * 8}x{h * 8} pixels but the latent being sampled is "
                f"{x.shape[-1] * 8}x{x.shape[-2] * 8}. Give the mask of the image this latent makes.")


def reference_guided_sample(evaluate, x: torch.Tensor, sigmas, guidance: ReferenceGuidance, cfg: float | None,
                            callback=None) -> torch.Tensor:
    """Algorithm 2 over the whole schedule. ``evaluate(x, i, need_branch) -> (D̃, UncondBranch | None)`` is the
    CFG prediction at step i (and, when asked, its unconditional branch). ``cfg`` None: each branch carries the
    scale it was evaluated with (``UncondBranch.cond_scale``)."""
    sig = sigma_list(sigmas)
    mask = guidance.mask.to(device=x.device, dtype=x.dtype)
    phi = None
    guidance.losses = []
    for i in range(len(sig) - 1):
        host.check_interrupt()
        if i == guidance.start_index:
            x = x + mask * (guidance.target(i).to(device=x.device, dtype=x.dtype) - x)
        guided = guidance.start_index <= i <= guidance.end_index
        denoised, branch = evaluate(x, i, guided)
        report_step(callback, x, i, sig[i], denoised)
        if guided:
            if phi is None:
                phi = branch.context
            target = guidance.target(i + 1).to(device=x.device, dtype=x.dtype)
            scale = cfg if cfg is not None else branch.cond_scale
            x, phi, losses = guided_step(x, sig[i], sig[i + 1], denoised, branch, phi, scale, target, mask,
                                         guidance.inner_steps, guidance.lr)
            guidance.losses.append(losses[-1] if losses else float("nan"))
        else:
            x = ddim_step(x, denoised, sig[i], sig[i + 1])
    return x


# ---------------------------------------------------------------------------------------------------------
# Inside ComfyUI's sampling.

def _chunk(obj, k: int, n: int, total: int):
    """Chunk ``k`` of ``n`` along the batch of every tensor in ``obj`` whose first dimension is ``total``."""
    if torch.is_tensor(obj):
        return obj.chunk(n)[k] if obj.ndim and obj.shape[0] == total else obj
    if isinstance(obj, dict):
        return {key: _chunk(v, k, n, total) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_chunk(v, k, n, total) for v in obj)
    return obj


def _normal(obj):
    """Normal-tensor copies (outside inference mode) of the tensors in ``obj``, so autograd may save them."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {key: _normal(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_normal(v) for v in obj)
    return obj


class UncondCapture:
    """A ``model_function_wrapper`` that runs the call as usual (through ``inner``, the MODEL's own wrapper, if
    any) and keeps the negative chunk: its input, timestep, conditioning dict and output, and the ``apply_model``
    the host passed. Both hosts call ``f(apply_model, {"input", "timestep", "c", "cond_or_uncond"})``."""

    def __init__(self, inner=None):
        self.inner = inner
        self.captured = []

    def __call__(self, apply_model, args):
        out = self.inner(apply_model, args) if self.inner is not None else \
            apply_model(args["input"], args["timestep"], **args["c"])
        tags = list(args["cond_or_uncond"])
        n, total = len(tags), args["input"].shape[0]
        for k, tag in enumerate(tags):
            if tag == UNCOND:
                c = _chunk(dict(args["c"]), k, n, total)
                to = dict(c.get("transformer_options", {}))
                to["cond_or_uncond"] = [UNCOND]
                if isinstance(to.get("uuids"), (list, tuple)) and len(to["uuids"]) == n:
                    to["uuids"] = [to["uuids"][k]]
                c["transformer_options"] = to
                self.captured.append((apply_model, args["input"].chunk(n)[k], args["timestep"].chunk(n)[k], c,
                                      out.chunk(n)[k]))
        return out

    def branch(self) -> UncondBranch:
        if not self.captured:
            raise PersonalizeError(
                f"{NODE}: the sampler saw no negative-prompt evaluation, so there is no null-text embedding to "
                "guide. Use cfg above 1 (at cfg 1 ComfyUI skips the negative prompt) and a CFGGuider.")
        if len(self.captured) > 1:
            raise PersonalizeError(
                f"{NODE}: the negative CONDITIONING has {len(self.captured)} entries active at one step; reference "
                "guidance optimises one null-text embedding. Connect a single CLIP Text Encode as negative.")
        apply_model, x_in, t_in, c, out = self.captured[0]
        with torch.inference_mode(False):
            base = getattr(apply_model, "__self__", None)
            if base is not None and hasattr(base, "diffusion_model"):
                host.uninference(base)  # weights loaded under inference mode cannot be saved for backward
            x_in, t_in, c = _normal(x_in), _normal(t_in), _normal(c)
            context = c["c_crossattn"]
            if base is not None and hasattr(base, "diffusion_model"):
                # CPU: fused SDPA keeps far less for backward than the host's sub-quadratic attention
                c["transformer_options"] = graph_patches.with_fused_attention(c.get("transformer_options", {}),
                                                                              base.diffusion_model, x_in)

        inner = self.inner

        def fn(phi: torch.Tensor) -> torch.Tensor:
            cc = dict(c, c_crossattn=phi.to(context.dtype).expand(context.shape[0], -1, -1))
            if inner is not None:  # the MODEL's own wrapper, as the host would call it for this chunk
                return inner(apply_model, {"input": x_in, "timestep": t_in, "c": cc, "cond_or_uncond": [UNCOND]})
            return apply_model(x_in, t_in, **cc)
        return UncondBranch(fn, context, out)


def sample_reference_guided(model, x, sigmas, extra_args=None, callback=None, disable=None,
                            guidance: ReferenceGuidance | None = None):
    """KSAMPLER sampler function (k-diffusion signature) running :func:`reference_guided_sample` through the host's
    CFG model; only ``model_options`` is replaced, per guided step, to add :class:`UncondCapture`."""
    extra_args = {} if extra_args is None else extra_args
    guidance.check(sigmas, x)
    t0 = time.perf_counter()

    def evaluate(xx, i, need_branch):
        if not need_branch:
            return denoise(model, xx, sigmas[i], extra_args), None
        capture = {}

        def install(inner):  # UncondCapture chained in front of the MODEL's own wrapper
            capture["wrapper"] = UncondCapture(inner)
            return capture["wrapper"]
        step_args = with_cond_scale_capture(with_model_function_wrapper(extra_args, install), capture)
        denoised = denoise(model, xx, sigmas[i], step_args)
        branch = capture["wrapper"].branch()
        if "cond_scale" not in capture:
            raise PersonalizeError(f"{NODE}: this guider has no single cfg scale; use SamplerCustom, or "
                                   "SamplerCustomAdvanced with a CFGGuider.")
        branch.cond_scale = capture["cond_scale"]
        return denoised, branch

    out = reference_guided_sample(evaluate, x, sigmas, guidance, None, callback)
    log.info("%s: %d steps, guided t=%d..%d with %d inner steps each, last guidance loss %.3g, %.1f s", NODE,
             len(sigmas) - 1, guidance.t_start, guidance.t_end, guidance.inner_steps,
             guidance.losses[-1] if guidance.losses else float("nan"), time.perf_counter() - t0)
    return out


def reference_guided_sampler(guidance: ReferenceGuidance):
    """A SAMPLER for SamplerCustom / SamplerCustomAdvanced."""
    return sampler_from_function(sample_reference_guided, guidance=guidance)


# ---------------------------------------------------------------------------------------------------------
# The node's work before sampling: validation, reference choice, alignment, inversion.

def _mask_batch(mask: torch.Tensor) -> torch.Tensor:
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    return mask.float().clamp(0, 1)


def check_inputs(model, subject, sigmas, reference_images, reference_masks, generated_mask, t_start: int,
                 t_end: int, inner_steps: int, lr: float, reference_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every user-facing check, before any model work. Returns the reference and generated masks ``[B, H, W]``."""
    from ..core.inputs import prepare_masks
    from .hifi_tuner import wrong_family_message
    family = host.require_family(NODE, model)
    if subject is not None and subject.family != family:
        raise PersonalizeError(wrong_family_message(f"{NODE}: the subject", subject.family, family))
    check_sigmas(NODE, sigmas)
    n = sigmas.shape[0] - 1
    if t_start < t_end:
        raise PersonalizeError(
            f"{NODE}: t_start ({t_start}) is below t_end ({t_end}). Steps count down from {n} (pure noise) to 0 "
            "(the image): guidance runs from t_start down to t_end, so t_start must be the larger (paper: 40 and "
            "10 of 50).")
    if t_end < 1 or t_start > n:
        raise PersonalizeError(
            f"{NODE}: t_start and t_end must lie in 1..{n} (the number of steps of SIGMAS); got {t_start} and "
            f"{t_end}. For 50 steps the paper uses 40 and 10; scale them for other step counts.")
    if inner_steps < 0 or not lr > 0:
        raise PersonalizeError(f"{NODE}: inner_steps must be 0 or more and the learning rate positive.")
    if reference_masks is None:
        raise PersonalizeError(f"{NODE}: the reference images need masks of the subject (connect a MASK, e.g. "
                               "from a segmentation node or Load Image's alpha), one per reference image.")
    masks = prepare_masks(NODE + " (reference)", reference_images, reference_masks)
    if not 0 <= reference_index < reference_images.shape[0]:
        raise PersonalizeError(f"{NODE}: reference_index {reference_index} but only {reference_images.shape[0]} "
                               "reference image(s) (the first is 0).")
    gen = _mask_batch(generated_mask)
    if gen.shape[0] != 1:
        raise PersonalizeError(f"{NODE}: {gen.shape[0]} generated masks; give the one mask of the image to guide "
                               "(guide one image at a time).")
    if float(gen.max()) <= 1e-3:
        raise PersonalizeError(f"{NODE}: the generated-subject mask is empty (no subject pixels). Check the "
                               "segmentation of the first, unguided image.")
    if gen.shape[1] % 8 or gen.shape[2] % 8:
        raise PersonalizeError(f"{NODE}: the generated mask is {gen.shape[2]}x{gen.shape[1]}; it must be the size of "
                               "the generated image (a multiple of 8 on each side).")
    return masks, gen


def choose_reference(reference_images: torch.Tensor, index: int, clip_vision=None, generated_image=None) -> int:
    """The reference to guide with: the highest cosine similarity of CLIP vision image embeddings to the first,
    unguided image (the paper uses DINO ViT-S/16 embeddings the same way) when both are given, else ``index``."""
    if clip_vision is None or generated_image is None:
        return index
    emb_ref = clip_vision.encode_image(reference_images).image_embeds.float()
    emb_gen = clip_vision.encode_image(generated_image[:1]).image_embeds.float()
    sims = torch.nn.functional.cosine_similarity(emb_ref, emb_gen.expand_as(emb_ref), dim=-1)
    choice = int(sims.argmax())
    log.info("%s: reference similarities %s -> reference %d", NODE, [round(float(v), 3) for v in sims], choice)
    return choice


def prepare_guidance(model, vae, conditioning: list, subject, sigmas: torch.Tensor, reference_images: torch.Tensor,
                     reference_masks, generated_mask: torch.Tensor, *, t_start: int = 40, t_end: int = 10,
                     inner_steps: int = 10, lr: float = 1e-2, reference_index: int = 0, clip_vision=None,
                     generated_image=None, align_iterations: int = 200, node_id=None) -> ReferenceGuidance:
    """Algorithm 2, steps 1-2: pick the reference, align its mask to the generated one (Eq. 9), warp it, encode it,
    and DDIM-invert it (Eq. 3) with ``conditioning`` (its caption; the subject's global rows go into its tail when a
    subject is given) from σ = 0 up to the noise level of ``t_start``."""
    from ..kernels.losses import resize_mask_to
    from . import inversion
    from .alignment import align_masks, warp
    ref_masks, gen = check_inputs(model, subject, sigmas, reference_images, reference_masks, generated_mask,
                                  t_start, t_end, inner_steps, lr, reference_index)
    check_single_conditioning(NODE, conditioning, "reference")
    idx = choose_reference(reference_images, reference_index, clip_vision, generated_image)
    sim = align_masks(ref_masks[idx], gen[0], iterations=align_iterations)
    log.info("%s: reference %d aligned: scale %.3f, rotation %.1f deg, shift (%.1f, %.1f) px, IoU %.3f", NODE, idx,
             sim.scale, math.degrees(sim.angle), sim.shift[0], sim.shift[1], sim.iou)
    size = tuple(gen.shape[1:])
    image = warp(reference_images[idx:idx + 1, :, :, :3].movedim(-1, 1).float(), sim, size).movedim(1, -1)
    mask = warp(ref_masks[idx][None, None], sim, size)[:, 0].clamp(0, 1)
    if float(mask.max()) <= 1e-3:
        raise PersonalizeError(f"{NODE}: the aligned reference mask fell outside the image; check that the masks "
                               "show the subject.")
    latent = {"samples": vae.encode(image.clamp(0, 1))}
    if subject is not None:
        from .hifi_tuner import subject_conditioning
        conditioning = subject_conditioning(conditioning, subject, use_stepwise=False, node=NODE)
    n = sigmas.shape[0] - 1
    start = n - t_start
    inv = inversion.invert_image(model, conditioning, conditioning, latent, sigmas[start:], cfg=1.0,
                                 null_text_steps=0, learning_rate=1e-2, node_id=node_id)
    h, w = inv.trajectory.shape[-2:]
    return ReferenceGuidance(sigmas=sigmas.detach().float().cpu(), trajectory=inv.trajectory,
                             mask=resize_mask_to(mask, (h, w)), t_start=t_start, t_end=t_end,
                             inner_steps=inner_steps, lr=lr, reference_index=idx, alignment_iou=sim.iou)

"""The sampling core every sampler and trainer of the pack stands on.

Conventions (ComfyUI's k-diffusion form). The sampler state is ``x = x0 + σ·ε`` in model space (after
``process_latent_in``); a MODEL gives the denoised estimate ``D(x, σ)`` (its ``apply_model``), and the host's
``model_sampling`` turns the network's raw output (ε, v or x0) into ``D``. With ``ᾱ = 1/(1+σ²)`` the
variance-preserving state of the DDPM/DDIM papers is ``x_VP = x/√(1+σ²) = √ᾱ·x0 + √(1−ᾱ)·ε``.

What lives here:

* prediction conversions (:func:`eps_from_denoised`, :func:`denoised_from_eps`, :func:`v_from_denoised`,
  :func:`denoised_from_v`, :func:`denoised_from_output` through the host's ``model_sampling``);
* :class:`ModelPrediction`: ``D(x, σ; context)`` of a loaded MODEL, as a sampler would compute it;
* guidance: :func:`guided_denoised` (classifier-free, Ho & Salimans 2022) and :func:`multi_branch_denoised`
  (``D̃ = D_∅ + Σ_k w_k (D_k − D_∅)``, the branches batched into as few UNet calls as memory allows);
* steps: :func:`ddim_step` (DDIM, Song et al. 2021, Eq. 12 with η = 0) and :func:`posterior_step` (DDIM's
  η-step; η = 1 is the DDPM posterior, Ho et al. 2020, Eq. 6-7);
* schedule helpers: :func:`sigma_list`, :func:`format_sigmas`, :func:`check_sigmas`, :func:`check_same_schedule`;
* :class:`InterruptibleProgress`, the cancel check + progress bar of samplers that run outside a stock sampler;
* :func:`sampler_from_function`, which turns a k-diffusion style sample function into a stock
  ``comfy.samplers.KSAMPLER`` (a SAMPLER socket value for SamplerCustom / SamplerCustomAdvanced), and the helpers
  such a function needs (:func:`with_cond_scale_capture`, :func:`with_model_function_wrapper`, :func:`denoise`).
"""
from __future__ import annotations

import math

import torch

from . import host
from .host import PersonalizeError

COND, UNCOND = 0, 1  # the host's cond_or_uncond tags (comfy/samplers.py: 0 = positive, 1 = negative)


# ---------------------------------------------------------------------------------------------------------
# Prediction conversions. ``sigma`` is a float or a tensor broadcastable to ``x`` (e.g. ``[B, 1, 1, 1]``).

def _per_sample(sigma, x: torch.Tensor):
    if torch.is_tensor(sigma) and sigma.ndim == 1 and x.ndim > 1:
        return sigma.view(-1, *([1] * (x.ndim - 1))).to(x)
    return sigma


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """``ε̂ = (x − D)/σ`` (x = x0 + σ·ε)."""
    return (x - denoised) / _per_sample(sigma, x)


def denoised_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """``D = x − σ·ε̂``."""
    return x - _per_sample(sigma, x) * eps


def v_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """The v-prediction target (Salimans & Ho 2022, §4) in VP units: ``v = √ᾱ·ε − √(1−ᾱ)·x0`` with
    ``√ᾱ = 1/√(1+σ²)``, ``√(1−ᾱ) = σ/√(1+σ²)``, ``x0 = D`` and ``ε = (x − D)/σ``."""
    s = _per_sample(sigma, x)
    root = (1 + s * s) ** 0.5
    return (eps_from_denoised(x, denoised, s) - s * denoised) / root


def denoised_from_v(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """Inverse of :func:`v_from_denoised`: ``D = x/(1+σ²) − v·σ/√(1+σ²)`` (σ_data = 1)."""
    s = _per_sample(sigma, x)
    return x / (1 + s * s) - v * s / (1 + s * s) ** 0.5


def denoised_from_output(model_sampling, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``D`` from a network's raw output through the host's ``model_sampling`` (ε, v, x0, ... as the model was
    trained): ``model_sampling.calculate_denoised(σ, output, x)`` (comfy/model_sampling.py, both hosts)."""
    return model_sampling.calculate_denoised(sigma, output, x)


# ---------------------------------------------------------------------------------------------------------
# A ComfyUI MODEL as a denoiser.

def conditioning_extras(base_model, conditioning: list, x: torch.Tensor, prompt_type: str, device, node: str) -> dict:
    """Extra model inputs (SDXL's ``y`` and the like) of the first CONDITIONING entry, from the model's own
    ``extra_conds`` with the entry's options, for a batch like ``x``. ``c_crossattn`` is left out (the caller
    passes the context); a model that wants image channels (``c_concat``: inpainting/instruct) is refused."""
    context, options = conditioning[0][0], conditioning[0][1]
    params = dict(options)
    params.update(cross_attn=context, device=device, noise=x, latent_image=x, denoise_mask=None,
                  width=params.get("width", x.shape[-1] * 8), height=params.get("height", x.shape[-2] * 8),
                  prompt_type=params.get("prompt_type", prompt_type))
    out = {}
    for key, value in base_model.extra_conds(**params).items():
        if key == "c_crossattn":
            continue
        if key == "c_concat":
            raise PersonalizeError(
                f"{node}: this MODEL takes extra image channels (an inpainting or instruct model); this node "
                "supports plain text-to-image checkpoints only.")
        out[key] = value.process_cond(batch_size=x.shape[0], device=device, area=None).cond.to(device)
    return out


def adm_extras(base_model, pooled: torch.Tensor | None, pixel_size: tuple[int, int], batch: int, device) -> dict:
    """SDXL's ADM vector ``y`` (pooled text + size conditioning, no crop) for a batch; ``{}`` for models without
    one (SD1/SD2) or without a pooled output."""
    if getattr(base_model, "adm_channels", 0) and pooled is not None:
        w, h = pixel_size
        y = base_model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                  target_width=w, target_height=h, device=device)
        return {"y": y.to(device).expand(batch, -1)}
    return {}


class ModelPrediction:
    """``D(x, σ; context)`` of a loaded ComfyUI MODEL (ModelPatcher), as the host's sampler computes it.

    Calls ``BaseModel.apply_model`` (whose ``model_sampling`` turns the network's ε/v/x0 output into D) with the
    MODEL's ``transformer_options`` (so attention patches apply), ``cond_or_uncond`` and ``sigmas`` set as the host
    sets them, and - with ``through_wrapper`` - through the MODEL's ``model_function_wrapper``. Extra model inputs
    (SDXL's ``y``) per branch come from ``extras`` (``{COND: {...}, UNCOND: {...}}``, see
    :func:`conditioning_extras`) or per call. The context may require grad.

    The denoiser protocol of this module: ``model(x, sigma[B], context, uncond=False, extras=None)``; a denoiser
    that also has ``batched(x, sigma, contexts, tags)`` lets :func:`multi_branch_denoised` batch its branches.
    """

    def __init__(self, patcher, extras: dict | None = None, *, through_wrapper: bool = True):
        self.patcher = patcher
        self.base = patcher.model
        self.device = patcher.load_device
        opts = patcher.model_options
        self.transformer_options = dict(opts.get("transformer_options", {}))
        self.wrapper = opts.get("model_function_wrapper") if through_wrapper else None
        self.extras = extras or {}

    @classmethod
    def for_conditioning(cls, patcher, positive: list, negative: list, x: torch.Tensor, node: str):
        """A prediction whose branches carry the extra inputs of ``positive`` (COND) and ``negative`` (UNCOND)."""
        base, device = patcher.model, patcher.load_device
        return cls(patcher, {COND: conditioning_extras(base, positive, x, "positive", device, node),
                             UNCOND: conditioning_extras(base, negative, x, "negative", device, node)})

    def _apply(self, x, sigma, context, tags, extras):
        to = dict(self.transformer_options)
        to["cond_or_uncond"] = list(tags)
        to["sigmas"] = sigma
        c = {"c_crossattn": context.to(self.device), "transformer_options": to, **extras}
        if self.wrapper is not None:
            return self.wrapper(self.base.apply_model,
                                {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": list(tags)})
        return self.base.apply_model(x, sigma, **c)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, uncond: bool = False,
                 extras: dict | None = None) -> torch.Tensor:
        tag = UNCOND if uncond else COND
        if context.shape[0] != x.shape[0]:
            context = context.expand(x.shape[0], *context.shape[1:])
        return self._apply(x, sigma, context, [tag], self.extras.get(tag, {}) if extras is None else extras)

    def batched(self, x: torch.Tensor, sigma: torch.Tensor, contexts: list, tags: list) -> torch.Tensor:
        """One UNet call on ``len(contexts)`` copies of ``x`` (chunk k with ``contexts[k]`` and tag ``tags[k]``),
        returned concatenated along the batch as the host's ``calc_cond_batch`` does."""
        b = x.shape[0]
        ctx = [c.expand(b, *c.shape[1:]) if c.shape[0] != b else c for c in contexts]
        ctx = _common_length(ctx)
        extras = {}
        per_tag = [self.extras.get(t, {}) for t in tags]
        for key in per_tag[0]:
            extras[key] = torch.cat([e[key] for e in per_tag])
        k = len(contexts)
        return self._apply(x.repeat(k, *([1] * (x.ndim - 1))), sigma.repeat(k), torch.cat(ctx), tags, extras)

    def batch_limit(self, x: torch.Tensor) -> int:
        """How many samples like ``x`` fit in one UNet call: free memory over the model's own estimate of the
        memory one sample needs (``BaseModel.memory_required``), as ``calc_cond_batch`` decides; unbounded on
        the CPU."""
        import comfy.model_management as mm
        if torch.device(self.device).type == "cpu":
            return 1 << 30
        per = self.base.memory_required([1, *x.shape[1:]])
        return max(1, int(mm.get_free_memory(self.device) * 0.8 // max(per, 1)))


def _common_length(contexts: list) -> list:
    """Contexts of different token counts repeated to their least common multiple (the host does the same when it
    batches conds; repeating keys leaves attention unchanged)."""
    lengths = {c.shape[1] for c in contexts}
    if len(lengths) == 1:
        return contexts
    lcm = math.lcm(*lengths)
    return [c.repeat(1, lcm // c.shape[1], 1) for c in contexts]


# ---------------------------------------------------------------------------------------------------------
# Guidance.

def sigma_batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """``σ`` as the per-sample ``[B]`` tensor a MODEL call takes."""
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


def guided_denoised(model, x: torch.Tensor, sigma: float, cond: torch.Tensor, uncond: torch.Tensor | None,
                    cfg: float, cond_denoised: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance in denoised form, ``D̃ = D_∅ + w(D_c − D_∅)`` (the same as guiding ε since ε̂ is
    affine in D). ``uncond=None`` or ``w = 1`` evaluates the conditional branch only. ``cond_denoised`` reuses a
    cached ``D_c`` (then only the unconditional branch runs, e.g. while optimising its context)."""
    s = sigma_batch(sigma, x)
    d_c = cond_denoised if cond_denoised is not None else model(x, s, cond)
    if uncond is None or cfg == 1.0:
        return d_c
    d_u = model(x, s, uncond, uncond=True)
    return d_u + cfg * (d_c - d_u)


def multi_branch_denoised(model, x: torch.Tensor, sigma: float, uncond: torch.Tensor, branches: list, *,
                          max_batch: int | None = None) -> torch.Tensor:
    """Multi-branch guidance, ``D̃ = D_∅ + Σ_k w_k (D_k − D_∅)`` for ``branches = [(context_k, w_k), ...]``
    (Liu et al. 2022, "Compositional Visual Generation", Eq. 11 in denoised form; one branch is CFG).

    The unconditional and conditional evaluations are batched into as few model calls as ``max_batch`` samples
    per call allow (default: the model's :meth:`ModelPrediction.batch_limit`; a denoiser without ``batched`` is
    called once per branch)."""
    contexts = [uncond] + [c for c, _w in branches]
    tags = [UNCOND] + [COND] * len(branches)
    s = sigma_batch(sigma, x)
    b = x.shape[0]
    outputs = []
    if hasattr(model, "batched"):
        limit = max_batch if max_batch is not None else model.batch_limit(x)
        per_call = max(1, limit // b)
        for start in range(0, len(contexts), per_call):
            part = model.batched(x, s, contexts[start:start + per_call], tags[start:start + per_call])
            outputs.extend(part.split(b))
    else:
        outputs = [model(x, s, c, uncond=(t == UNCOND)) for c, t in zip(contexts, tags)]
    d_u = outputs[0]
    out = d_u
    for (_c, w), d_k in zip(branches, outputs[1:]):
        out = out + w * (d_k - d_u)
    return out


# ---------------------------------------------------------------------------------------------------------
# Steps.

def ddim_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, Eq. 12 with η = 0) in σ-space: ``x' = x + (σ' − σ)·(x − D)/σ``.

    With ``x_VP = x/√(1+σ²)`` this is ``x'_VP = √ᾱ'·x̂0 + √(1−ᾱ')·ε̂`` (``x̂0 = D``, ``ε̂ = (x − D)/σ``); it is also
    k-diffusion's Euler step, so ``σ' = 0`` returns ``D``.
    """
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def posterior_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor,
                   eta: float = 1.0) -> torch.Tensor:
    """DDIM's stochastic step (Song et al. 2021, Eq. 12/16) in σ-space; ``η = 1`` samples the DDPM posterior
    ``q(x_{t−1} | x_t, x0 = D)`` (Ho et al. 2020, Eq. 6-7), ``η = 0`` is :func:`ddim_step`.

    ``σ_up = η·σ'·√(σ² − σ'²)/σ`` (at most σ'), ``σ_down = √(σ'² − σ_up²)``, ``x' = D + σ_down·(x − D)/σ + σ_up·z``
    - DDIM's ``σ_t(η)`` in VP units times ``√(1+σ'²)``, the same as k-diffusion's ancestral step."""
    if sigma_next == 0:
        return denoised
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma * sigma - sigma_next * sigma_next, 0.0)) / sigma)
    down = math.sqrt(sigma_next * sigma_next - up * up)
    return denoised + down * (x - denoised) / sigma + up * noise


# ---------------------------------------------------------------------------------------------------------
# Schedules.

def sigma_list(sigmas) -> list[float]:
    """A SIGMAS tensor (or sequence) as Python floats."""
    return [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]


def format_sigmas(s) -> str:
    """A short display of a schedule for error messages: all values, or the first three and last two."""
    vals = [f"{float(v):.4g}" for v in s]
    return "[" + ", ".join(vals if len(vals) <= 6 else vals[:3] + ["…"] + vals[-2:]) + "]"


def check_sigmas(node: str, sigmas, hint: str = "") -> torch.Tensor:
    """A sampling schedule as SIGMAS sockets carry it: a 1-D tensor of at least 2 finite values (one step), strictly
    descending, ending at σ ≥ 0. Raises :class:`PersonalizeError` naming the fix (``hint`` is appended to the
    ordering message); returns the schedule as float64 on the CPU."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise PersonalizeError(f"{node}: SIGMAS must be a schedule of at least 2 values (one step), e.g. from "
                               "BasicScheduler.")
    s = sigmas.detach().double().cpu()
    if not torch.isfinite(s).all() or bool(s[-1] < 0):
        raise PersonalizeError(f"{node}: SIGMAS must be finite and non-negative; got {format_sigmas(s)}.")
    if not bool((s[1:] < s[:-1]).all()):
        raise PersonalizeError(
            f"{node}: SIGMAS must be strictly descending (a sampling schedule such as BasicScheduler's); got "
            f"{format_sigmas(s)}.{(' ' + hint) if hint else ''}")
    return s


def check_same_schedule(node: str, made_on: torch.Tensor, got: torch.Tensor, what: str) -> None:
    """A sampler replaying something made on ``made_on`` must get the same schedule (relative 1e-4). ``what``
    completes "<what> N steps of sigmas [...]", e.g. "the reference was inverted on"."""
    mine, theirs = made_on.detach().double().cpu(), got.detach().double().cpu()
    if theirs.shape != mine.shape or not torch.allclose(theirs, mine, rtol=1e-4, atol=1e-6):
        raise PersonalizeError(
            f"{node}: {what} {mine.shape[0] - 1} steps of sigmas {format_sigmas(mine)}, but the sampler got "
            f"{theirs.shape[0] - 1} steps on {format_sigmas(theirs)}. Connect the same SIGMAS to this node and to "
            "the sampler (SamplerCustom).")


def check_single_conditioning(node: str, conditioning, what: str) -> list:
    """A CONDITIONING with exactly one entry (one prompt, no combined or area prompts)."""
    if not isinstance(conditioning, list) or not conditioning:
        raise PersonalizeError(f"{node}: the {what} CONDITIONING is empty. Connect a CLIP Text Encode output.")
    if len(conditioning) != 1:
        raise PersonalizeError(
            f"{node}: the {what} CONDITIONING holds {len(conditioning)} entries (combined or area prompts); this "
            "node needs exactly one prompt. Connect a single CLIP Text Encode output.")
    return conditioning


# ---------------------------------------------------------------------------------------------------------
# Progress of pack-driven sampling loops.

class InterruptibleProgress:
    """The user's cancel check (:meth:`check`, always) and a ComfyUI ProgressBar over ``total`` units of work
    (when given), advanced by :meth:`advance`."""

    def __init__(self, total: int | None = None, node_id=None):
        self.total = total
        self.done = 0
        self.pbar = host.progress_bar(total, node_id) if total else None

    def check(self) -> None:
        host.check_interrupt()

    def advance(self, units: int = 1) -> None:
        self.done += units
        if self.pbar is not None:
            self.pbar.update_absolute(min(self.done, self.total), self.total)


# ---------------------------------------------------------------------------------------------------------
# Samplers inside ComfyUI's sampling.

def sampler_from_function(sample_fn, **options):
    """A SAMPLER socket value (stock ``comfy.samplers.KSAMPLER``) that runs ``sample_fn`` with ``options``.

    ``sample_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)`` has the k-diffusion
    signature of ComfyUI's own samplers: ``model(x, σ[B], **extra_args)`` is the host's guided denoiser (CFG,
    patches, ControlNets) and ``x`` starts at ``sigmas[0]``."""
    import comfy.samplers
    return comfy.samplers.KSAMPLER(sample_fn, extra_options=dict(options))


def denoise(model, x: torch.Tensor, sigma: torch.Tensor, extra_args: dict) -> torch.Tensor:
    """One evaluation of a KSAMPLER's ``model`` at scalar ``sigma`` for the whole batch."""
    return model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)


def report_step(callback, x: torch.Tensor, i: int, sigma, denoised: torch.Tensor) -> None:
    """The per-step callback ComfyUI's samplers make (previews, progress)."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def with_model_function_wrapper(extra_args: dict, make_wrapper) -> dict:
    """``extra_args`` with its ``model_options`` copied and the ``model_function_wrapper`` replaced by
    ``make_wrapper(inner)``, where ``inner`` is the wrapper the MODEL already had (or None) and must be chained.
    Both hosts pass ``extra_args["model_options"]`` through CFG to ``calc_cond_batch``, which calls
    ``wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})`` with the batched cond/uncond chunks."""
    options = extra_args.get("model_options", {})
    return dict(extra_args, model_options=dict(options, model_function_wrapper=make_wrapper(
        options.get("model_function_wrapper"))))


def with_cond_scale_capture(extra_args: dict, sink: dict) -> dict:
    """``extra_args`` with its ``model_options`` copied and one more ``sampler_pre_cfg_function`` appended that
    records the guider's scale as ``sink["cond_scale"]`` (and changes nothing). The host's ``sampling_function``
    calls these public hooks with ``args["cond_scale"]`` at every CFG evaluation, in both hosts, so a SAMPLER
    learns the cfg of whatever CFG guider runs it (SamplerCustom's cfg included) without reading the guider."""
    options = extra_args.get("model_options", {})

    def record(args):
        sink["cond_scale"] = float(args["cond_scale"])
        return args["conds_out"]
    return dict(extra_args, model_options=dict(
        options, sampler_pre_cfg_function=[*options.get("sampler_pre_cfg_function", []), record]))

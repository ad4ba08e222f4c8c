"""ProFusion Fusion Sampling (Zhou et al. 2023, arXiv 2305.13579; the official pipeline's ``refine_step`` loop),
as a ComfyUI SAMPLER. Specification: ../shared/docs/methods.md §5.7 (algorithm), §5.4 / §5.10.1 (γ), §0.3 (σ ↔ VP).

Per DDIM step t → p (``ᾱ = 1/(1+σ²)``; ``x_t = x/√(1+σ²)`` is the VP state of the paper, ``x`` the sampler's
k-diffusion state ``x0 + σ·ε``):

* **fusion**, m times: ``ε_f = e_u + ω_f·(e_γ − e_u)`` with ``e_γ = ε(x_t, Enc_γ(P_S))`` (S* row of the encoded
  prompt times γ), then the closed-form move (§5.7)

      x_t ← x_t − s_f²·√(1−ᾱ_t)/(1−ᾱ_p)·ε_f + s_f·√((1−ᾱ_t)(2−2ᾱ_p−s_f²))/(1−ᾱ_p)·z,
      s_f = η_fuse·√((1−ᾱ_p)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_p))                      (DDIM's σ_t(η), Song et al. 2021, Eq. 16)

  which is a stochastic DDIM step t → p with noise s_f (Eq. 12) followed by a draw of x_t from DDIM's forward
  posterior ``q_σ(x_t | x_p, x̂0)`` (Song et al. Eq. 7 by Bayes' rule; :func:`fusion_two_step`). Written with
  ``r = s_f²/(1−ᾱ_p) = η²·(1 − ᾱ_t/ᾱ_p)/(1 − ᾱ_t)`` it is ``x_t ← x_t − r√(1−ᾱ_t)·ε_f + √(r(2−r)(1−ᾱ_t))·z``
  (:func:`fusion_coefficients`), and in σ-space ``r = η²(1 − σ_p²/σ_t²)``, ``x ← x − rσ·ε_f + σ√(r(2−r))·z``.
* **refinement**: ``ε̂ = e_u + ω1(e_1 − e_u) + ω2(e_2 − e_u)`` (``e_1``: prompt with S*, ``e_2``: the class-word
  prompt), then one deterministic DDIM step (η = 0) to p (:func:`core.sampling.ddim_step`).

The last step of a ComfyUI schedule ends at σ = 0 (ᾱ_p = 1). There ``s_f → 0`` but the move does not vanish:
``r → η²`` (the limit of the formula above, which has no 0/0), so with η = 1 the last fusion move re-noises the
prediction, ``x_t ← √ᾱ_t·x̂0 + √(1−ᾱ_t)·z`` — what the official code does at its last step, whose ``ᾱ_p`` is
SD's ``ᾱ_0 ≈ 0.9991`` (r ≈ 1 − 1e-6 there). The refinement's DDIM step then lands on the guided ``x̂0``.

Guidance is computed on the host's denoised predictions ``D`` (ε̂ = (x − D)/σ is affine in D and the weights of
every combination sum to 1, so combining D's equals combining ε's), which makes ε-, v- and x0-prediction models
the same to this module (the host's ``model_sampling`` converts; core/sampling.py).

The three prompts come from a :class:`FusionConditions` object, because S* depends on x_t and t (PromptNet runs
inside sampling): the sampler asks it for the encoded prompt with S* at every fusion iteration (γ applied) and at
the refinement. :class:`StaticConditions` is the provider for already-encoded CONDITIONINGs (γ scales the
placeholder's row of the encoded tensor, §5.10.1). Several references (official ``extra_ref_image_*``): each
reference k gives its own context; fusion averages the per-reference ε_f with weights ω1/Σ and s_k/Σ
(Σ = ω1 + Σs_k), refinement adds ``s_k(e_k − e_u)``.

Cost: 1 + K UNet evaluations per fusion iteration (the unconditional and the γ-scaled branches, one batched call)
and 2 + K for the refinement (one batched call): ``2m + 3`` per step for one reference (the official code spends 6
for m = 1), through the host's own ``calc_cond_batch``, which batches branches as far as memory allows.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import host
from ..core.host import PersonalizeError
from ..core.sampling import (check_single_conditioning, ddim_step, eps_from_denoised, report_step,
                             sampler_from_function, sigma_list)

log = logging.getLogger("comfyui_personalize")

NODE = "Fusion Sampler"


# ---------------------------------------------------------------------------------------------------------
# The fusion move in VP form (scalars ᾱ_t > 0, ᾱ_t < ᾱ_p ≤ 1).

def fusion_noise_level(alpha_t: float, alpha_p: float, eta: float) -> float:
    """``s_f = η·√((1−ᾱ_p)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_p))``, DDIM's σ_t(η) (Song et al. 2021, Eq. 16) for t → p."""
    return eta * math.sqrt(max((1 - alpha_p) / (1 - alpha_t) * (1 - alpha_t / alpha_p), 0.0))


def fusion_ratio(alpha_t: float, alpha_p: float, eta: float) -> float:
    """``r = s_f²/(1−ᾱ_p) = η²·(1 − ᾱ_t/ᾱ_p)/(1 − ᾱ_t)``: finite at ᾱ_p = 1 (r = η²), where s_f²/(1−ᾱ_p) is 0/0."""
    return eta * eta * max(1 - alpha_t / alpha_p, 0.0) / (1 - alpha_t)


def fusion_coefficients(alpha_t: float, alpha_p: float, eta: float) -> tuple[float, float]:
    """``(drift, std)`` of the fusion move ``x_t ← x_t − drift·ε_f + std·z`` (§5.7):
    ``drift = s_f²√(1−ᾱ_t)/(1−ᾱ_p) = r√(1−ᾱ_t)``, ``std = s_f√((1−ᾱ_t)(2−2ᾱ_p−s_f²))/(1−ᾱ_p) = √(r(2−r)(1−ᾱ_t))``."""
    r = fusion_ratio(alpha_t, alpha_p, eta)
    return r * math.sqrt(1 - alpha_t), math.sqrt(max(r * (2 - r), 0.0) * (1 - alpha_t))


def fusion_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_p: float, eta: float,
                noise: torch.Tensor) -> torch.Tensor:
    """The fusion move in closed form (VP units, §5.7): ``x_t − drift·ε_f + std·z`` (:func:`fusion_coefficients`)."""
    drift, std = fusion_coefficients(alpha_t, alpha_p, eta)
    return x_t - drift * eps + std * noise


def ddim_forward_posterior(x_p: torch.Tensor, x0: torch.Tensor, alpha_t: float, alpha_p: float, s: float,
                           noise: torch.Tensor) -> torch.Tensor:
    """A draw of ``x_t`` from DDIM's forward posterior ``q_σ(x_t | x_p, x0)`` (Song et al. 2021, Eq. 7 by Bayes):
    with ``q(x_t | x0) = N(√ᾱ_t x0, (1−ᾱ_t)I)`` and the DDIM reverse kernel ``q_σ(x_p | x_t, x0)`` of noise ``s``,
    mean ``√ᾱ_t x0 + √(1−ᾱ_t)√(1−ᾱ_p−s²)/(1−ᾱ_p)·(x_p − √ᾱ_p x0)``, variance ``(1−ᾱ_t)s²/(1−ᾱ_p)``. Needs ᾱ_p < 1."""
    k = math.sqrt(1 - alpha_t) * math.sqrt(max(1 - alpha_p - s * s, 0.0)) / (1 - alpha_p)
    std = math.sqrt((1 - alpha_t) * s * s / (1 - alpha_p))
    return math.sqrt(alpha_t) * x0 + k * (x_p - math.sqrt(alpha_p) * x0) + std * noise


def fusion_two_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_p: float, eta: float,
                    z_step: torch.Tensor, z_posterior: torch.Tensor) -> torch.Tensor:
    """The fusion move as its definition (reference for the tests; ᾱ_p < 1, η ≤ 1): the stochastic DDIM step t → p
    with noise s_f using ε_f (Song et al. Eq. 12), ``x_p = √ᾱ_p x̂0 + √(1−ᾱ_p−s_f²)·ε_f + s_f·z_step``, then
    ``x_t ~ q_σ(x_t | x_p, x̂0)`` (:func:`ddim_forward_posterior`) with ``x̂0 = (x_t − √(1−ᾱ_t)ε_f)/√ᾱ_t``."""
    s = fusion_noise_level(alpha_t, alpha_p, eta)
    x0 = (x_t - math.sqrt(1 - alpha_t) * eps) / math.sqrt(alpha_t)
    x_p = math.sqrt(alpha_p) * x0 + math.sqrt(max(1 - alpha_p - s * s, 0.0)) * eps + s * z_step
    return ddim_forward_posterior(x_p, x0, alpha_t, alpha_p, s, z_posterior)


def two_step_noise(z_step: torch.Tensor, z_posterior: torch.Tensor, alpha_t: float, alpha_p: float,
                   eta: float) -> torch.Tensor:
    """The unit-variance ``z`` for which :func:`fusion_step` equals :func:`fusion_two_step` given the same noise:
    ``z = (√(1−r)·z_step + z_posterior)/√(2−r)`` (from ``√(1−ᾱ_p−s_f²) = √(1−ᾱ_p)·√(1−r)``)."""
    r = fusion_ratio(alpha_t, alpha_p, eta)
    return (math.sqrt(max(1 - r, 0.0)) * z_step + z_posterior) / math.sqrt(2 - r)


def fusion_step_sigma(x: torch.Tensor, eps: torch.Tensor, sigma: float, sigma_next: float, eta: float,
                      noise: torch.Tensor) -> torch.Tensor:
    """:func:`fusion_step` on the k-diffusion state ``x = x_t·√(1+σ²)``: ``x − rσ·ε_f + σ√(r(2−r))·z`` with
    ``r = η²(1 − σ_p²/σ_t²)`` (the VP ratio with ``ᾱ = 1/(1+σ²)``; σ_p = 0 gives r = η²)."""
    r = eta * eta * max(1.0 - (sigma_next / sigma) ** 2, 0.0)
    return x - (r * sigma) * eps + (sigma * math.sqrt(max(r * (2 - r), 0.0))) * noise


def alpha_bar(sigma: float) -> float:
    """``ᾱ = 1/(1+σ²)`` (§0.3)."""
    return 1.0 / (1.0 + sigma * sigma)


# ---------------------------------------------------------------------------------------------------------
# Guidance (on denoised predictions; affine combinations whose weights sum to 1).

def reference_weights(omega1: float, extra_scales) -> list[float]:
    """Fusion weights of the references: ``[ω1, s_1, …]/(ω1 + Σs_k)`` (official ``extra_ref_image_scales``);
    ``[1]`` for one reference."""
    extra = [float(s) for s in extra_scales]
    if not extra:
        return [1.0]
    total = omega1 + sum(extra)
    if total == 0:
        raise PersonalizeError(f"{NODE}: ω1 plus the extra references' scales is 0, so the references cannot be "
                               "averaged in the fusion stage. Give them a positive total.")
    return [omega1 / total] + [s / total for s in extra]


def fusion_prediction(d_u: torch.Tensor, d_gamma: list, omega_f: float, weights: list) -> torch.Tensor:
    """``ε_f = e_u + ω_f·Σ_k w_k(e_γ,k − e_u)`` (one reference: ``e_u + ω_f(e_γ − e_u)``), here on D's."""
    out = d_u
    for w, d in zip(weights, d_gamma):
        out = out + (omega_f * w) * (d - d_u)
    return out


def refinement_prediction(d_u: torch.Tensor, d_s: list, d_c: torch.Tensor, omega1: float, omega2: float,
                          extra_scales=()) -> torch.Tensor:
    """``ε̂ = e_u + ω1(e_1 − e_u) + Σ_k s_k(e_{S_k} − e_u) + ω2(e_2 − e_u)``, here on D's."""
    out = d_u + omega1 * (d_s[0] - d_u) + omega2 * (d_c - d_u)
    for s, d in zip(extra_scales, d_s[1:]):
        out = out + float(s) * (d - d_u)
    return out


# ---------------------------------------------------------------------------------------------------------
# Settings and the condition providers.

@dataclass(frozen=True)
class FusionSettings:
    """The sampler's parameters, defaults as the official example notebook (§5.7)."""
    omega1: float = 7.0      # cfg of the S* prompt in the refinement (official ``guidance_scale``)
    omega2: float = 5.0      # cfg of the class-word prompt (``guidance_scale_ref``)
    m: int = 1               # fusion iterations per step (``refine_step``)
    gamma: float = 0.6       # S* row scale in the fusion stage (``refine_emb_scale``)
    omega_f: float = 7.0     # fusion-stage cfg (``refine_guidance_scale``)
    eta_fuse: float = 1.0    # fusion noise η (``refine_eta``)

    def check(self) -> "FusionSettings":
        if int(self.m) != self.m or self.m < 0:
            raise PersonalizeError(f"{NODE}: fusion iterations m must be a whole number ≥ 0 (official 1; 0 turns "
                                   f"fusion off); got {self.m}.")
        if not 0.0 <= self.eta_fuse <= 1.0:
            raise PersonalizeError(
                f"{NODE}: η_fuse must lie in 0..1 (official 1.0); got {self.eta_fuse}. The fusion move is a DDIM "
                "step with noise η·σ_t(1) and back, which needs η ≤ 1.")
        for name in ("omega1", "omega2", "gamma", "omega_f", "eta_fuse"):
            if not math.isfinite(getattr(self, name)):
                raise PersonalizeError(f"{NODE}: {name} must be a finite number.")
        return self

    def evaluations_per_step(self, references: int = 1) -> int:
        """UNet evaluations per step: ``m(1 + K) + 2 + K`` (``2m + 3`` for one reference)."""
        return self.m * (1 + references) + 2 + references


class FusionConditions:
    """What the Fusion Sampler asks for the prompts (the provider protocol; subclass it).

    ``negative``, ``prompt`` and ``class_prompt`` are CONDITIONINGs: ∅, the prompt with the placeholder ("a holder
    …", its tensor a template whose other entries - pooled output, … - the host uses as they are) and the class-word
    prompt ("a person …"). ``extra_scales`` are the official ``extra_ref_image_scales`` s_k, one per reference after
    the first (K = 1 + len). At every fusion iteration and refinement the sampler calls

    * ``fusion_contexts(x_t, sigma, timestep, gamma)`` → K encoded prompts ``Enc_γ(P_{S_k})`` ([1|B, L, d]): S*
      row(s) times γ (§5.4: γ scales the encoder OUTPUT at the S* position);
    * ``refinement_contexts(x_t, sigma, timestep)`` → K encoded prompts ``Enc(P_{S_k})``,

    with ``x_t`` the VP latent ``x/√(1+σ²)`` [B, C, h, w] (what PromptNet's ``promptnet_cond`` receives), ``sigma``
    the k-diffusion noise level and ``timestep`` the model's (continuous) timestep of σ. ``None`` in a list stands
    for the ``prompt`` template's own tensor."""

    negative: list
    prompt: list
    class_prompt: list
    extra_scales: tuple = ()

    @property
    def references(self) -> int:
        return 1 + len(self.extra_scales)

    def bind(self, base_model, device: torch.device | None = None) -> None:
        """Called by :func:`sample_fusion` with the guider's model (the host's ``BaseModel``) and the sampling
        device before the first step: a provider that needs the MODEL (its latent format, a compatibility check)
        takes it here. Default: nothing."""

    def fusion_contexts(self, x_t: torch.Tensor, sigma: float, timestep: float, gamma: float) -> list:
        raise NotImplementedError

    def refinement_contexts(self, x_t: torch.Tensor, sigma: float, timestep: float) -> list:
        raise NotImplementedError

    def check(self) -> None:
        """The CONDITIONINGs are usable (before any work)."""
        check_single_conditioning(NODE, self.prompt, "placeholder prompt")
        for what, c in (("negative", self.negative), ("class-word", self.class_prompt)):
            if not isinstance(c, list) or not c:
                raise PersonalizeError(f"{NODE}: the {what} CONDITIONING is empty. Connect a CLIP Text Encode output.")
        for what, c in (("placeholder prompt", self.prompt), ("negative", self.negative),
                        ("class-word", self.class_prompt)):
            for _t, opts in c:
                bad = [k for k in ("control", "gligen", "hooks") if opts.get(k) is not None]
                if bad:
                    raise PersonalizeError(
                        f"{NODE}: the {what} CONDITIONING carries {', '.join(bad)} (ControlNet, GLIGEN or hooks), "
                        "which the Fusion Sampler does not apply. Connect the plain CLIP Text Encode output.")
        widths = {int(c[0][0].shape[-1]) for c in (self.prompt, self.negative, self.class_prompt)}
        if len(widths) != 1:
            raise PersonalizeError(f"{NODE}: the prompts were encoded with different text encoders (widths "
                                   f"{sorted(widths)}). Encode all three with the CLIP of the same checkpoint.")


def scale_rows(context: torch.Tensor, rows, gamma: float) -> torch.Tensor:
    """``context`` [B, L, d] with rows ``rows`` (sequence positions of S*) multiplied by γ (§5.4, §5.10.1)."""
    out = context.clone()
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=context.device)
    out[:, idx] = out[:, idx] * gamma
    return out


class StaticConditions(FusionConditions):
    """The provider for already-encoded prompts (S* fixed, e.g. a textual-inversion embedding or a PromptNet S*
    computed once): the prompt's encoded tensor is the same at every step, and the fusion stage scales its
    ``placeholder_rows`` by γ."""

    def __init__(self, prompt: list, class_prompt: list, negative: list, placeholder_rows):
        self.prompt, self.class_prompt, self.negative = prompt, class_prompt, negative
        self.extra_scales = ()
        self.rows = sorted({int(r) for r in ([placeholder_rows] if isinstance(placeholder_rows, int)
                                               else placeholder_rows)})
        self._scaled = {}

    def check(self) -> None:
        super().check()
        length = int(self.prompt[0][0].shape[1])
        if not self.rows:
            raise PersonalizeError(f"{NODE}: the prompt has no placeholder position to scale by γ. Put the "
                                   "placeholder word in the prompt.")
        if not all(0 < r < length for r in self.rows):
            raise PersonalizeError(f"{NODE}: placeholder position(s) {self.rows} lie outside the encoded prompt's "
                                   f"{length} rows (position 0 is the start token).")

    def fusion_contexts(self, x_t, sigma, timestep, gamma):
        if gamma not in self._scaled:
            self._scaled[gamma] = scale_rows(self.prompt[0][0], self.rows, gamma)
        return [self._scaled[gamma]]

    def refinement_contexts(self, x_t, sigma, timestep):
        return [None]


def placeholder_rows(clip, text: str, placeholder: str) -> list[int]:
    """Rows of the encoded ``text`` (CLIP Text Encode's tensor) that hold ``placeholder``'s tokens: positions in
    the tokenizer's chunks of 77 (row = chunk·77 + position), from the first encoder's tokens (SDXL's two encoders
    share the tokenisation). Raises naming the fix when the placeholder is not in the prompt."""
    from ..core.textual import encoder_keys, word_token_ids
    key = encoder_keys(clip)[0]
    ids = word_token_ids(clip, placeholder)[key]
    if not ids:
        raise PersonalizeError(f"{NODE}: the placeholder '{placeholder}' is empty; give a word such as 'holder'.")
    rows, offset = [], 0
    for chunk in clip.tokenize(text)[key]:
        seq = [item[0] if isinstance(item[0], int) else None for item in chunk]
        for i in range(len(seq) - len(ids) + 1):
            if seq[i:i + len(ids)] == ids:
                rows.extend(range(offset + i, offset + i + len(ids)))
        offset += len(seq)
    if not rows:
        raise PersonalizeError(f"{NODE}: the prompt '{text}' does not contain the placeholder '{placeholder}'. Write "
                               f"it where the subject goes, e.g. 'a {placeholder} in Ghibli style'.")
    return rows


# ---------------------------------------------------------------------------------------------------------
# The sampling loop on any branch evaluator.

def fusion_sample(evaluate, x: torch.Tensor, sigmas, conditions: FusionConditions, settings: FusionSettings,
                  noise_sampler, timestep=None, callback=None, stats: dict | None = None) -> torch.Tensor:
    """Fusion Sampling over a whole schedule, in σ-space (module docstring).

    ``evaluate(x, sigma, branches) -> [D, ...]`` evaluates ``branches``, a list of ``(template, context)`` with
    template ``"negative"``, ``"prompt"`` or ``"class"`` and ``context`` a tensor replacing the template's
    (``None``: the template's own) — one batched model call per list where memory allows. ``noise_sampler(σ, σ')``
    gives the fusion noise z (unit normal, like ``x``); ``timestep(σ)`` the model timestep passed to the provider
    (default σ). ``stats`` (if given) receives ``evaluations`` and ``calls`` (branch lists) per run."""
    sig = sigma_list(sigmas)
    timestep = timestep or (lambda s: s)
    k = conditions.references
    weights = reference_weights(settings.omega1, conditions.extra_scales)
    scales = tuple(conditions.extra_scales)
    evals = calls = 0
    for i in range(len(sig) - 1):
        host.check_interrupt()
        s, s_next = sig[i], sig[i + 1]
        t = timestep(s)
        root = math.sqrt(1.0 + s * s)
        for _ in range(settings.m):
            ctx = conditions.fusion_contexts(x / root, s, t, settings.gamma)
            _check_count(ctx, k, "fusion_contexts")
            out = evaluate(x, s, [("negative", None)] + [("prompt", c) for c in ctx])
            evals, calls = evals + 1 + k, calls + 1
            d_f = fusion_prediction(out[0], out[1:], settings.omega_f, weights)
            x = fusion_step_sigma(x, eps_from_denoised(x, d_f, s), s, s_next, settings.eta_fuse,
                                  noise_sampler(s, s_next))
        ctx = conditions.refinement_contexts(x / root, s, t)
        _check_count(ctx, k, "refinement_contexts")
        out = evaluate(x, s, [("negative", None)] + [("prompt", c) for c in ctx] + [("class", None)])
        evals, calls = evals + 2 + k, calls + 1
        d = refinement_prediction(out[0], out[1:1 + k], out[1 + k], settings.omega1, settings.omega2, scales)
        report_step(callback, x, i, s, d)
        x = ddim_step(x, d, s, s_next)
    if stats is not None:
        stats.update(evaluations=evals, calls=calls, steps=len(sig) - 1)
    return x


def _check_count(ctx, k: int, what: str) -> None:
    if len(ctx) != k:
        raise PersonalizeError(f"{NODE}: the condition provider's {what} gave {len(ctx)} prompts for {k} "
                               "reference(s).")


# ---------------------------------------------------------------------------------------------------------
# Inside ComfyUI's sampling (SamplerCustom / SamplerCustomAdvanced).

class HostBranches:
    """Branch evaluation through the host's own ``calc_cond_batch`` (comfy/samplers.py, both hosts): the provider's
    CONDITIONINGs are processed once as the guider processes its own (``convert_cond`` + ``process_conds``: extra
    model inputs such as SDXL's ``y``, areas, start/end percents), a branch with a context gets a copy of its
    template entry with that ``c_crossattn``, and each list of branches is one ``calc_cond_batch`` call - batched
    into as few UNet calls as free memory allows, through the MODEL's patches and ``model_function_wrapper``
    (``extra_args["model_options"]``)."""

    def __init__(self, guider, extra_args: dict, x: torch.Tensor, conditions: FusionConditions, latent_image=None):
        import comfy.sampler_helpers
        import comfy.samplers
        self.base = guider.inner_model
        self.options = extra_args.get("model_options", {})
        conds = {"positive": comfy.sampler_helpers.convert_cond(conditions.prompt),
                 "negative": comfy.sampler_helpers.convert_cond(conditions.negative),
                 "class": comfy.sampler_helpers.convert_cond(conditions.class_prompt)}
        self.conds = comfy.samplers.process_conds(self.base, x, conds, x.device, latent_image, None,
                                                  extra_args.get("seed"))
        self.templates = {"negative": self.conds["negative"], "prompt": self.conds["positive"],
                          "class": self.conds["class"]}

    @staticmethod
    def _with_context(entries: list, context: torch.Tensor) -> list:
        import comfy.conds
        out = []
        for e in entries:
            e = dict(e)
            e["model_conds"] = dict(e["model_conds"], c_crossattn=comfy.conds.CONDCrossAttn(context))
            e["cross_attn"] = context
            out.append(e)
        return out

    def __call__(self, x: torch.Tensor, sigma: float, branches: list) -> list:
        import comfy.samplers
        conds = [self.templates[name] if ctx is None else self._with_context(self.templates[name], ctx.to(x))
                 for name, ctx in branches]
        ts = x.new_full((x.shape[0],), float(sigma))
        return comfy.samplers.calc_cond_batch(self.base, conds, x, ts, self.options)


def check_model_sampling(model_sampling) -> None:
    """The σ ↔ VP identities of §0.3 hold: an ε/v/x0 model in k-diffusion σ with σ_data = 1 (SD1/SD2/SDXL, the
    mini family); flow (CONST) models are refused."""
    import comfy.model_sampling as ms
    if isinstance(model_sampling, ms.CONST) or not isinstance(model_sampling, ms.EPS) or \
            abs(float(getattr(model_sampling, "sigma_data", 1.0)) - 1.0) > 1e-6:
        raise PersonalizeError(f"{NODE}: this MODEL samples as {type(model_sampling).__name__}; Fusion Sampling "
                               "needs a DDPM-style (ε- or v-prediction) model such as SD1.x/SD2.x. Load such a "
                               "checkpoint, without a flow-matching ModelSampling patch.")


def sample_fusion(model, x, sigmas, extra_args=None, callback=None, disable=None,
                  conditions: FusionConditions | None = None, settings: FusionSettings | None = None):
    """KSAMPLER sampler function (k-diffusion signature). ``model`` is the host's ``KSamplerX0Inpaint`` around the
    guider; only the guider's model (``inner_model``), the per-call ``model_options`` and the seed are used - the
    guider's own prompts and cfg are not (the prompts come from ``conditions``). Fusion noise: the host's
    ``default_noise_sampler`` seeded with ``extra_args["seed"]`` (the noise seed of SamplerCustom), so a seed gives
    the same image."""
    import comfy.k_diffusion.sampling as kd
    extra_args = {} if extra_args is None else extra_args
    if extra_args.get("denoise_mask") is not None:
        raise PersonalizeError(f"{NODE}: the latent has a noise mask (Set Latent Noise Mask / inpainting), which the "
                               "Fusion Sampler does not support. Sample the whole latent.")
    guider = model.inner_model
    base = guider.inner_model
    check_model_sampling(base.model_sampling)
    t0 = time.perf_counter()
    conditions.bind(base, x.device)
    evaluate = HostBranches(guider, extra_args, x, conditions, getattr(model, "latent_image", None))
    ms = base.model_sampling

    def timestep(s):
        return float(ms.timestep(torch.tensor([s], dtype=torch.float32)).item())
    stats = {}
    out = fusion_sample(evaluate, x, sigmas, conditions, settings, kd.default_noise_sampler(x, extra_args.get("seed")),
                        timestep, callback, stats)
    log.info("%s: %d steps, m=%d, %d UNet evaluations in %d calls of branches, %.1f s", NODE, stats["steps"],
             settings.m, stats["evaluations"], stats["calls"], time.perf_counter() - t0)
    return out


def fusion_sampler(conditions: FusionConditions, settings: FusionSettings | None = None):
    """A SAMPLER (stock KSAMPLER) for SamplerCustom / SamplerCustomAdvanced running Fusion Sampling with
    ``conditions`` on whatever SIGMAS the sampler node gets. Checks everything first."""
    settings = (settings or FusionSettings()).check()
    conditions.check()
    return sampler_from_function(sample_fusion, conditions=conditions, settings=settings)


# ---------------------------------------------------------------------------------------------------------
# PromptNet's word S* in the prompt (§5.3, §5.4) and the condition provider that runs PromptNet inside sampling.

PLACEHOLDER = "holder"  # the official placeholder word (one CLIP BPE token)


class PlaceholderPrompt:
    """A prompt whose placeholder word is replaced by PromptNet's word S* (§5.4, the official pipeline): the whole
    input vector at the placeholder's position becomes S*, so S* gets **no** position embedding. ComfyUI adds the
    position table P to every input vector, including an embedding given in the tokens, so the vector put there is
    ``S* − P[pos]`` and the encoder sees exactly S*.

    The prompt is tokenised once; :meth:`encode` encodes it for a batch of words through the CLIP's own
    ``encode_from_tokens`` (its layer choice and final norm: SD2's penultimate layer, …): the B prompts are given as
    B chunks of one prompt, which the host encodes as one batch and returns side by side ([1, B·L, d] → [B, L, d]).
    Differentiable in the words (pre-training and tuning backpropagate through it)."""

    def __init__(self, clip, text: str, placeholder: str = PLACEHOLDER, node: str = NODE):
        from ..core.textual import encoder_keys, word_token_ids
        self.clip, self.text, self.placeholder = clip, text, placeholder.strip()
        keys = encoder_keys(clip)
        if len(keys) != 1:
            raise PersonalizeError(f"{node}: this CLIP has {len(keys)} text encoders ({', '.join(keys)}: SDXL); "
                                   "PromptNet supports one-encoder models (SD1.x, SD2.x, the mini family).")
        self.key = keys[0]
        ids = word_token_ids(clip, self.placeholder)[self.key] if self.placeholder else []
        if len(ids) != 1:
            raise PersonalizeError(f"{node}: the placeholder '{placeholder}' must be one token of the tokenizer (it is "
                                   f"{len(ids)}); use the official '{PLACEHOLDER}'.")
        tokens = clip.tokenize(text)
        chunks = tokens[self.key]
        if len(chunks) != 1:
            raise PersonalizeError(f"{node}: the prompt is {len(chunks)} chunks of 77 tokens; a prompt with PromptNet's "
                                   "word must fit in one (about 75 tokens). Shorten it.")
        hits = [i for i, item in enumerate(chunks[0]) if isinstance(item[0], int) and item[0] == ids[0]]
        if not hits:
            raise PersonalizeError(f"{node}: the prompt '{text}' does not contain the placeholder '{placeholder}'. "
                                   f"Write it where the subject goes, e.g. 'a photo of {self.placeholder} on the "
                                   "beach'.")
        if len(hits) > 1:
            raise PersonalizeError(f"{node}: the placeholder '{placeholder}' occurs {len(hits)} times in the prompt; "
                                   "write it once.")
        self.tokens, self.position = tokens, hits[0]
        self.width = int(self.positions().shape[-1])

    def positions(self) -> torch.Tensor:
        """The text encoder's position-embedding table P [L, d]."""
        enc = getattr(self.clip.cond_stage_model, f"clip_{self.key}")
        return enc.transformer.text_model.embeddings.position_embedding.weight

    @property
    def rows(self) -> list[int]:
        """Rows of the encoded prompt that hold S* (for γ)."""
        return [self.position]

    def encode(self, words: torch.Tensor) -> torch.Tensor:
        """The prompt encoded with ``words`` [B, d] (or [B, 1, d]) at the placeholder → [B, L, d]."""
        words = words.reshape(words.shape[0], -1)
        if words.shape[-1] != self.width:
            raise PersonalizeError(f"{NODE}: PromptNet's word has width {words.shape[-1]} but this CLIP's text encoder "
                                   f"{self.width}. Use the CLIP of the checkpoint the PromptNet was made for.")
        p = self.positions()[self.position].detach().to(device=words.device, dtype=torch.float32)
        chunk = self.tokens[self.key][0]
        batch = []
        for b in range(words.shape[0]):
            vec = words[b].float() - p
            batch.append([(vec,) + tuple(item[1:]) if i == self.position else item for i, item in enumerate(chunk)])
        tokens = dict(self.tokens)
        tokens[self.key] = batch
        out = self.clip.encode_from_tokens(tokens)
        return out.reshape(words.shape[0], -1, out.shape[-1])


@dataclass
class Reference:
    """PromptNet Encode's output (PROFUSION_REFERENCE): what does not depend on the noisy latent - the reference
    latent (LATENT space, ``[1, C, h, w]`` at PromptNet's size) and the CLIP vision tokens (``last_hidden_state``
    [1, N, w], the official ``ref_image_embed``) - and the settings it was encoded for."""
    latent: torch.Tensor
    vision_tokens: torch.Tensor
    latent_size: int
    vision_width: int
    image: torch.Tensor | None = None

    def check(self, promptnet, node: str = NODE) -> None:
        if self.vision_width != promptnet.vision_width or self.latent_size != promptnet.latent_size:
            raise PersonalizeError(f"{node}: this reference was encoded for another PromptNet (CLIP vision width "
                                   f"{self.vision_width}, {self.latent_size}² latents) than {promptnet.describe()}. "
                                   "Encode it with the PromptNet you sample with.")


def encode_reference(image: torch.Tensor, promptnet, vae, clip_vision, mask: torch.Tensor | None = None,
                     node: str = "PromptNet Encode") -> Reference:
    """One reference image (IMAGE [1, H, W, 3]; optional MASK [1, H, W] multiplies it, the official keep-mask) →
    :class:`Reference`: the image centre-cropped and resized to PromptNet's size (``latent_size`` × the VAE's
    downscale) and VAE-encoded; CLIP vision tokens from the CLIP_VISION's own ``encode_image`` (its crop, resize and
    normalisation), ``last_hidden_state`` as the official pipeline."""
    if clip_vision is None:
        raise PersonalizeError(f"{node}: connect a CLIP_VISION (Load CLIP Vision: ViT-H/14 for the official SD2 "
                               "PromptNet; Load Mini CLIP Vision for the mini world).")
    if image.dim() != 4 or image.shape[-1] != 3:
        raise PersonalizeError(f"{node}: the reference must be an IMAGE [1, H, W, 3]; got {tuple(image.shape)}.")
    if image.shape[0] != 1:
        raise PersonalizeError(f"{node}: one reference image is expected; got a batch of {image.shape[0]}. Pick one "
                               "(Image From Batch), or encode each reference with its own PromptNet Encode.")
    if mask is not None:
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if mask.shape[0] != 1 or tuple(mask.shape[-2:]) != tuple(image.shape[1:3]):
            raise PersonalizeError(f"{node}: the mask is {tuple(mask.shape[-2:])} but the image "
                                   f"{tuple(image.shape[1:3])}; give one mask of the image's size.")
        if float(mask.max()) <= 0:
            raise PersonalizeError(f"{node}: the mask is empty; paint the subject, or disconnect the mask.")
        image = image * mask.unsqueeze(-1).to(image)
    scale = getattr(vae, "downscale_ratio", 8)
    scale = scale if isinstance(scale, int) else 8
    side = promptnet.latent_size * scale
    pixels = square(image, side)
    latent = vae.encode(pixels[..., :3])
    if latent.shape[-1] != promptnet.latent_size or latent.shape[1] != promptnet.unet_config["in_channels"]:
        raise PersonalizeError(f"{node}: the VAE gives latents {tuple(latent.shape[1:])}, but "
                               f"{promptnet.describe()} expects {promptnet.unet_config['in_channels']} channels at "
                               f"{promptnet.latent_size}². Use the VAE of the checkpoint the PromptNet was made for.")
    out = clip_vision.encode_image(image)
    tokens = out["last_hidden_state"]
    promptnet.check_vision(tokens.shape[-1], node)
    return Reference(latent.float().cpu(), tokens.float().cpu(), promptnet.latent_size, promptnet.vision_width,
                     pixels.cpu())


def square(image: torch.Tensor, side: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] centre-cropped to a square and resized to ``side`` (bicubic, antialiased, clamped)."""
    _, h, w, _ = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = image[:, top:top + s, left:left + s].movedim(-1, 1).float()
    if s != side:
        x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).movedim(1, -1)


def promptnet_words(promptnet, reference: Reference, base_model, x_t: torch.Tensor,
                    timestep: torch.Tensor) -> torch.Tensor:
    """S* [B, 1, d] for the VP noisy latent ``x_t`` (model space) at ``timestep`` [B] (§5.3): the reference latent
    taken to model space (``process_latent_in``); an ``x_t`` of another size than PromptNet's is resized to it
    (bilinear; the official encoder only gives one word at 64² latents - methods.md §5.3, UNCONFIRMED behaviour)."""
    param = next(promptnet.parameters())
    ref = base_model.process_latent_in(reference.latent.to(device=param.device, dtype=torch.float32))
    size = promptnet.latent_size
    x = x_t.to(device=param.device, dtype=torch.float32)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    words = promptnet(ref, timestep.to(param.device), reference.vision_tokens.to(param.device), x)
    return words[:, :1]


class PromptNetConditions(FusionConditions):
    """The provider that runs PromptNet at every fusion iteration and refinement (S* depends on x_t and t, §5.3):
    ``Enc(P_S)`` is the prompt with the placeholder encoded with S*(x_t, t) (:class:`PlaceholderPrompt`), and
    ``Enc_γ`` scales its S* row by γ (§5.4, §5.10.1). One reference per :class:`Reference`; references after the
    first come with their scales s_k (official ``extra_ref_image_scales``).

    The MODEL comes at sampling time (:meth:`bind`, called by :func:`sample_fusion` with the guider's model): the
    PromptNet is checked against it and moved to the sampling device (float32); ``base_model`` given here binds at
    once (scripts and tests that call the provider directly)."""

    def __init__(self, promptnet, references: list, clip, text: str, class_word: str, negative: list | None,
                 base_model=None, placeholder: str = PLACEHOLDER, extra_scales=()):
        if not references:
            raise PersonalizeError(f"{NODE}: connect a PROFUSION_REFERENCE (PromptNet Encode).")
        for ref in references:
            ref.check(promptnet)
        if not class_word.strip():
            raise PersonalizeError(f"{NODE}: give the class word (e.g. 'person', 'dog'): the refinement stage guides "
                                   "with the prompt where it replaces the placeholder.")
        if len(extra_scales) != len(references) - 1:
            raise PersonalizeError(f"{NODE}: {len(references)} references need {len(references) - 1} extra scale(s).")
        self.promptnet, self.refs, self.base_model = promptnet, list(references), None
        self.extra_scales = tuple(float(s) for s in extra_scales)
        self.template = PlaceholderPrompt(clip, text, placeholder)
        promptnet.check_text(self.template.width, NODE)
        self.prompt = _conditioning(clip, self.template.tokens)
        class_text = _replace_word(text, self.template.placeholder, class_word.strip())
        self.class_prompt = _conditioning(clip, clip.tokenize(class_text))
        self.negative = negative if negative is not None else _conditioning(clip, clip.tokenize(""))
        self.calls = 0
        if base_model is not None:
            self.bind(base_model)

    def bind(self, base_model, device=None) -> None:
        """Refuse a MODEL the PromptNet was not made for (naming the fix), then keep the model (its
        ``process_latent_in``) and move the PromptNet to ``device`` in float32 (in place: the loader's object)."""
        self.promptnet.check_model(base_model, NODE)
        self.base_model = base_model
        param = next(self.promptnet.parameters())
        device = torch.device(device) if device is not None else param.device
        if param.device != device or param.dtype != torch.float32:
            self.promptnet.to(device=device, dtype=torch.float32)

    def _contexts(self, x_t, timestep) -> list:
        if self.base_model is None:
            raise PersonalizeError(f"{NODE}: the PromptNet conditions were used before a MODEL was bound; sample "
                                   "through SamplerCustom / SamplerCustomAdvanced (or call bind(model)).")
        t = torch.full((x_t.shape[0],), float(timestep))
        out = []
        with torch.no_grad():
            for ref in self.refs:
                words = promptnet_words(self.promptnet, ref, self.base_model, x_t, t)
                out.append(self.template.encode(words))
        self.calls += 1
        return out

    def fusion_contexts(self, x_t, sigma, timestep, gamma):
        return [scale_rows(c, self.template.rows, gamma) for c in self._contexts(x_t, timestep)]

    def refinement_contexts(self, x_t, sigma, timestep):
        return self._contexts(x_t, timestep)


def _conditioning(clip, tokens) -> list:
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def _replace_word(text: str, word: str, by: str) -> str:
    import re
    return re.sub(rf"(?<![\w]){re.escape(word)}(?![\w])", by, text, count=1)


def promptnet_loss(promptnet, prompt: PlaceholderPrompt, predict, model_sampling, x0: torch.Tensor,
                   ref_latent: torch.Tensor, vision_tokens: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                   mask: torch.Tensor | None = None):
    """ProFusion's training objective (§5.5, the official ``train.py``; test-time tuning §5.6 uses the same):
    ``‖ε_θ(x_t, t, Enc("a photo of " ⊕ S*)) − ε‖²`` with ``S* = PromptNet(x_ref, t, c_img, x_t)`` - no
    regularisation. In the host's k-diffusion form (core/diffusion.py): ``x = x0 + σε``, PromptNet reads the VP
    latent ``x_t = x/√(1+σ²)`` and the model's timestep of σ, ``predict(x, σ, context) → D`` and
    ``ε̂ = (x − D)/σ``, so ε- and v-prediction models train alike.

    ``x0`` and ``ref_latent`` are model-space latents [B, C, h, w] (``process_latent_in``), ``vision_tokens``
    [B, N, w], ``sigma`` [B], ``noise`` like ``x0``; ``mask`` [B, 1, h, w] weights the error (None: plain mean).
    Returns ``(loss, denoised)``."""
    from ..kernels.losses import masked_mse
    s = sigma.view(-1, 1, 1, 1).to(x0)
    x = x0 + s * noise
    x_t = x / torch.sqrt(1.0 + s * s)
    t = model_sampling.timestep(sigma.float()).float()
    size = promptnet.latent_size
    x_p = x_t if tuple(x_t.shape[-2:]) == (size, size) else F.interpolate(
        x_t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    words = promptnet(ref_latent, t, vision_tokens, x_p)[:, :1]
    context = prompt.encode(words)
    denoised = predict(x, sigma, context)
    return masked_mse(eps_from_denoised(x, denoised, s), noise, mask), denoised

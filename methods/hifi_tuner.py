"""HiFi Tuner, subject representation learning (Wang et al., arXiv 2312.00079, §3.2).

A subject is ``n`` rows ``c_s ∈ R^{n×d}`` in the *encoded*-prompt space (CONDITIONING), not an input-embedding
vector: ``[c, c_s]`` is the encoded caption ``c`` with its last ``n`` rows (the padding tail) replaced by ``c_s``.

* Mask guidance, Eq. 5: ``L_s(c_s) = ‖M ⊙ (ε_θ(x_t, t, [c, c_s]) − ε)‖²`` (normalised by the number of masked
  elements; :func:`kernels.losses.masked_mse`).
* Parameter regularisation, Eq. 6: ``L_s(c_s) + w_s·‖c_s − ϕ_s‖²`` with ``ϕ_s`` the last ``n`` rows of the encoded
  null prompt ``ϕ = E("")``; ``c_s`` starts at ``ϕ_s``. ``w_s`` is not given by the paper (UNCONFIRMED);
  default 5e-3 on the mean squared distance, from a sweep on the mini world (README: the smallest weight whose scene
  fidelity matched the plain text prompt's; 1e-2 lost subject, 0 lost scene).
* Global phase: ``t ~ U{0..999}``, Adam, lr 5e-3, 1000 steps.
* Step-wise representations, Algorithm 1: walk the timesteps ``τ`` of a ``T``-step DDIM schedule from high to low
  noise; ``c_s^τ`` starts from the previous one and is optimised ``I`` steps at ``t = τ`` only, with a fresh Adam
  each. Generation uses ``[c, c_s^t]`` at step ``t`` (Eq. 7).

The DDIM timesteps are diffusers' "leading" spacing with offset 1, ``τ_k = k·⌊1000/T⌋ + 1`` (``981, 961, …, 1`` for
T = 50) — the sigmas ComfyUI's ``ddim_uniform`` scheduler visits. Each is stored as a timestep, a sigma and a
percent of the schedule (``p = 1 − τ/999``, the inverse of ``model_sampling.percent_to_sigma``), so stock
CONDITIONING entries with ``start_percent``/``end_percent`` can target it (:func:`stepwise_ranges`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import artifacts, host
from ..core.diffusion import DiffusionObjective
from ..core.host import FAMILY_NAMES, PersonalizeError
from ..core.textual import ConditioningRows, encoder_keys, special_tokens
from ..core.tuning import Phase, TrainingSession, TuningConfig, TuningResult, run_loop, seeded_generator
from .subject_photos import encode_subject

log = logging.getLogger("comfyui_personalize")

NODE = "HiFi Subject Tune"
METHOD = "hifi_tuner"
SUBJECT_FILE = artifacts.kind(kind="hifi_subject", title="HiFi subject", folder="personalize_subjects",
                              subdir=("personalize", "subjects"), made_by="HiFi Subject Tune", legacy_method=METHOD)
SUBJECT_FOLDER = SUBJECT_FILE.folder                # folder_paths name of the subject files
SUPPORTED = ("sd1", "sd2", "sdxl")
# Text width -> family, to recognise which family a CONDITIONING comes from (SD1 CLIP-L, SD2 CLIP-H, SDXL L+G).
FAMILY_BY_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
NUM_TRAIN_TIMESTEPS = 1000


def register_subject_folder() -> None:
    """The ``personalize_subjects`` model folder in ``folder_paths`` (a dictionary entry only)."""
    SUBJECT_FILE.register()


# ---------------------------------------------------------------------------------------------------------
# Schedule


def ddim_timesteps(sampling_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The DDIM timesteps of a ``T``-step schedule, high noise first (Algorithm 1 walks ``t = T..1``).

    Leading spacing with offset 1 (diffusers ``DDIMScheduler`` for SD, ``steps_offset=1``):
    ``τ_k = k·⌊N/T⌋ + 1``, k = T−1..0, e.g. ``981, 961, …, 1`` for T = 50 — the timesteps ComfyUI's ``ddim_uniform``
    scheduler visits when ``N`` is a multiple of ``T``.
    """
    if not 1 <= sampling_steps < num_train_timesteps:
        raise PersonalizeError(f"{NODE}: sampling_steps must be between 1 and {num_train_timesteps - 1}.")
    stride = num_train_timesteps // sampling_steps
    return [k * stride + 1 for k in range(sampling_steps - 1, -1, -1)]


def timestep_to_percent(t: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
    """Percent of the schedule at which ComfyUI is at timestep ``t``: the inverse of
    ``ModelSamplingDiscrete.percent_to_sigma(p) = σ((1 − p)·(N − 1))`` (both hosts)."""
    return 1.0 - float(t) / (num_train_timesteps - 1)


def stepwise_ranges(timesteps: list[int], num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[tuple[float, float]]:
    """``(start_percent, end_percent)`` for each step-wise representation so that the ranges tile the whole
    schedule (Eq. 7: ``c_s^t`` is used at step ``t``): every sampler sigma gets the representation of the nearest
    training timestep.

    ComfyUI keeps an entry for ``σ_end ≤ σ ≤ σ_start`` (both ends inclusive, ``samplers.get_area_and_mult``) with
    ``σ = percent_to_sigma(p)``. Neighbours share one boundary, placed at a *half-integer* timestep
    ``b = ⌊(τ_k + τ_{k+1})/2⌋ + 0.5``: its sigma lies strictly between two of the model's discrete sigmas, so no
    discrete/``ddim_uniform``/``simple`` schedule can land on it (a continuous one only by float coincidence, where
    both entries would be averaged). The first range starts at 0 (σ → ∞) and the last ends at 1 (σ = 0): no gap.
    ``timesteps`` must be strictly decreasing.
    """
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise PersonalizeError("step-wise timesteps must be strictly decreasing (high noise first).")
    bounds = [math.floor((a + b) / 2) + 0.5 for a, b in zip(timesteps, timesteps[1:])]
    percents = [timestep_to_percent(b, num_train_timesteps) for b in bounds]
    starts = [0.0] + percents
    ends = percents + [1.0]
    return list(zip(starts, ends))


# ---------------------------------------------------------------------------------------------------------
# The subject


@dataclass
class HiFiSubject:
    """A learned subject: ``rows [T+1, n, d]`` = global ``c_s`` then ``c_s^τ`` for each DDIM timestep ``τ``
    (descending). ``timesteps``/``sigmas``/``percents`` have one entry per step-wise row (empty without step-wise
    rows). ``null_tail`` is ``ϕ_s``, the initialisation and regularisation anchor."""

    rows: torch.Tensor
    timesteps: list
    sigmas: torch.Tensor
    percents: list
    null_tail: torch.Tensor
    family: str
    caption: str
    metadata: dict = field(default_factory=dict)
    path: Path | None = None
    tuning: TuningResult | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.rows.shape[1])

    @property
    def width(self) -> int:
        return int(self.rows.shape[2])

    @property
    def global_rows(self) -> torch.Tensor:
        return self.rows[0]

    @property
    def has_stepwise(self) -> bool:
        return self.rows.shape[0] > 1

    def tensors(self) -> dict:
        return {
            "rows": self.rows.detach().float().cpu().contiguous(),
            "null_tail": self.null_tail.detach().float().cpu().contiguous(),
            "timesteps": torch.tensor(list(self.timesteps), dtype=torch.int64),
            "sigmas": self.sigmas.detach().float().cpu().contiguous(),
            "percents": torch.tensor(list(self.percents), dtype=torch.float64),
        }

    def save(self, path: Path, overwrite: bool = False) -> Path:
        """Write the subject as a ``hifi_subject`` artefact (atomic; refuses to overwrite unless asked)."""
        meta = dict(self.metadata)
        meta.update({"method": METHOD, "caption": self.caption, "n_tokens": self.n_tokens,
                     "stepwise": self.has_stepwise})
        self.path = SUBJECT_FILE.save(self.tensors(), path, family=self.family, widths={"text": self.width},
                                      metadata=meta, overwrite=overwrite)
        return self.path

    @classmethod
    def load(cls, path, family: str | None = None) -> "HiFiSubject":
        """Read a subject file (a path, or a name in the subjects folder); ``family`` (if given) must match the
        family it was trained on."""
        art = SUBJECT_FILE.load(path, family)
        tensors, name = art.tensors, art.path.name
        if "rows" not in tensors:
            raise PersonalizeError(f"{name} is damaged (no subject rows). Retrain the subject with HiFi Subject Tune.")
        rows = tensors["rows"].float()
        n = rows.shape[0] - 1
        timesteps = [int(t) for t in tensors.get("timesteps", torch.zeros(0)).tolist()]
        sigmas = tensors.get("sigmas", torch.zeros(0)).float()
        percents = [float(p) for p in tensors.get("percents", torch.zeros(0)).tolist()]
        if rows.dim() != 3 or not (len(timesteps) == len(percents) == sigmas.numel() == n):
            raise PersonalizeError(f"{name} is damaged (rows {tuple(rows.shape)}, {len(timesteps)} timesteps). "
                                   "Retrain the subject with HiFi Subject Tune.")
        metadata = {k: v for k, v in art.metadata.items() if k not in ("method", "caption", "text_width")}
        return cls(rows=rows, timesteps=timesteps, sigmas=sigmas, percents=percents,
                   null_tail=tensors.get("null_tail", rows[0]).float(), family=art.family,
                   caption=art.metadata.get("caption", ""), metadata=metadata, path=art.path)


def wrong_family_message(what: str, subject_family: str, family: str) -> str:
    return artifacts.wrong_family(what, subject_family, family, "HiFi Subject Tune")


def subject_path(name: str) -> Path:
    """Path of a subject file named by the user inside the ``personalize_subjects`` folder."""
    return SUBJECT_FILE.target(name)


def load_subject(name_or_path, family: str | None = None) -> HiFiSubject:
    """Load a subject from a path or from a file name in the ``personalize_subjects`` folder."""
    return HiFiSubject.load(name_or_path, family)


# ---------------------------------------------------------------------------------------------------------
# Training


def caption_positions(clip, caption: str) -> int:
    """Sequence positions the caption occupies in its 77-token chunk (start token, words, end token), the
    maximum over the model's text encoders. The subject rows may only replace positions after these."""
    tokens = clip.tokenize(caption)
    specials = special_tokens(clip)
    used = 0
    for key in encoder_keys(clip):
        chunks = tokens[key]
        if len(chunks) > 1:
            raise PersonalizeError(f"{NODE}: the caption is longer than one 77-token chunk; shorten it "
                                   "(e.g. 'a photo of a dog').")
        end = specials[key][1]
        seq = [item[0] for item in chunks[0]]
        first_end = next((i for i, tok in enumerate(seq) if i > 0 and isinstance(tok, int) and tok == end), len(seq) - 1)
        used = max(used, first_end + 1)
    return used


def masked_eps_loss(objective: DiffusionObjective, rows: ConditioningRows, cond: torch.Tensor, pooled,
                    batch_size: int, t: int | None, use_mask: bool, reg_weight: float):
    """One sample of the HiFi Tuner subject loss (Eq. 5 + Eq. 6):
    ``‖M ⊙ (ε_θ(x_t, t, [c, c_s]) − ε)‖² / ΣM + w_s·mean((c_s − ϕ_s)²)``, with ``t ~ U{0..999}`` or fixed.
    Returns ``(loss, denoised)``."""
    idx, sigma, noise = objective.sample(batch_size, t=t)
    loss, denoised = objective.loss(rows.apply(cond), idx, sigma, noise, pooled, use_mask=use_mask)
    if reg_weight > 0:
        loss = loss + reg_weight * rows.regularisation()
    return loss, denoised


REG_WEIGHT = 5e-3
"""Default ``w_s`` (Eq. 6) of :func:`learn_subject`, the HiFi Subject Tune node and the mini-world benchmark."""


def learn_subject(model, clip, vae, images: torch.Tensor, masks: torch.Tensor | None, caption: str, *,
                  n_tokens: int = 5, global_steps: int = 1000, steps_per_timestep: int = 10,
                  sampling_steps: int = 50, lr: float = 5e-3, reg_weight: float = REG_WEIGHT, use_mask: bool = True,
                  use_reg: bool = True, use_stepwise: bool = True, seed: int = 0, batch_size: int = 1,
                  gradient_checkpointing: bool = False, mixed_precision: str = "auto", save_as: str | None = None,
                  overwrite: bool = False, node_id=None) -> HiFiSubject:
    """Learn a HiFi Tuner subject representation (§3.2, Algorithm 1) on a frozen MODEL and text encoder.

    Phase 1 optimises ``c_s`` for ``global_steps`` with ``t ~ U{0..999}``; phase 2 (``use_stepwise``) walks the
    ``sampling_steps`` DDIM timesteps from high to low noise and optimises ``c_s^τ`` for ``steps_per_timestep``
    steps at ``t = τ`` with a fresh Adam, starting from the previous row set. ``use_mask`` / ``use_reg`` switch
    Eq. 5's mask and Eq. 6's regulariser off (the paper's ablation). The phases run on :func:`core.tuning.run_loop`
    (one ProgressBar, interruption and non-finite losses checked every step). ``save_as`` names a file in
    ``personalize_subjects``; every check (family, settings, masks, caption length, existing file) happens before
    any work. (The node's input ``steps_per_step`` is ``steps_per_timestep`` here.)
    """
    family = host.require_family(NODE, model, clip, supported=SUPPORTED)
    config = TuningConfig(steps=max(1, global_steps), learning_rate=lr, batch_size=batch_size, seed=seed,
                          gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision)
    config.validate(NODE)
    if global_steps < 1:
        raise PersonalizeError(f"{NODE}: global_steps must be at least 1 (the paper uses 1000).")
    if use_stepwise and steps_per_timestep < 1:
        raise PersonalizeError(f"{NODE}: steps_per_step must be at least 1 (the paper uses 10), or turn use_stepwise off.")
    if reg_weight < 0:
        raise PersonalizeError(f"{NODE}: reg_weight must not be negative.")
    timesteps = ddim_timesteps(sampling_steps) if use_stepwise else []
    if use_mask and masks is None:
        raise PersonalizeError(f"{NODE}: use_mask is on but no masks are connected. Connect one subject mask per "
                               "image (e.g. from Load Subject Images or a SAM node), or turn use_mask off.")
    if n_tokens < 1:
        raise PersonalizeError(f"{NODE}: n_tokens must be at least 1 (the paper uses 5).")
    used = caption_positions(clip, caption)
    seq_len = len(clip.tokenize("")[encoder_keys(clip)[0]][0])
    if n_tokens > seq_len - used:
        raise PersonalizeError(
            f"{NODE}: n_tokens {n_tokens} is too large: the caption uses {used} of the {seq_len} positions, so at "
            f"most {seq_len - used} tail rows are free. Lower n_tokens (the paper uses 5) or shorten the caption.")
    path = None
    if save_as is not None:
        path = subject_path(save_as)
        artifacts.check_writable(path, overwrite)
    data = encode_subject(NODE, vae, images, masks if use_mask else None)
    reg = reg_weight if use_reg else 0.0

    with TrainingSession(model, clip, gradient_checkpointing=gradient_checkpointing) as s:
        cond, pooled = host.encode_text(s.clip, caption)       # frozen text encoder: encoded once, before the
        null, _ = host.encode_text(s.clip, "")                  # UNet is loaded (so loading CLIP cannot evict it)
        s.load()
        cond = cond.detach().clone().float().to(s.device)       # normal tensors (not inference tensors)
        pooled = pooled.detach().clone().to(s.device) if pooled is not None else None
        null_tail = null[0, -n_tokens:].detach().clone().float()
        rows = s.adopt(ConditioningRows(null_tail))             # c_s ← ϕ_s
        rows.anchor = rows.anchor.to(s.device)
        objective = DiffusionObjective(s.model, data.latents, data.latent_masks, seeded_generator(seed))
        trained = []

        def phase(steps: int, t: int | None, label: str) -> Phase:
            # a fresh Adam per phase; the rows are snapshotted when the phase ends
            return Phase([rows.rows], steps, lambda _i: masked_eps_loss(objective, rows, cond, pooled, batch_size,
                                                                         t, use_mask, reg),
                         label=label, on_end=lambda: trained.append(rows.rows.detach().clone()))

        # Algorithm 1: the global rows, then c_s^τ initialised from c_s^{τ+1}, high noise first
        phases = [phase(global_steps, None, "global")] + [phase(steps_per_timestep, tau, f"t={tau}")
                                                          for tau in timesteps]
        result = run_loop(NODE, phases, config, device=s.device, node_id=node_id)
        sigmas = objective.sigmas[timesteps].clone() if timesteps else torch.zeros(0)

    subject = HiFiSubject(
        rows=torch.stack(trained).float().cpu(), timesteps=list(timesteps), sigmas=sigmas.float().cpu(),
        percents=[timestep_to_percent(t, len(objective.sigmas)) for t in timesteps],
        null_tail=null_tail.cpu(), family=family, caption=caption,
        metadata={"global_steps": global_steps, "steps_per_step": steps_per_timestep if use_stepwise else 0,
                  "sampling_steps": sampling_steps if use_stepwise else 0, "learning_rate": lr,
                  "reg_weight": reg_weight, "use_mask": use_mask, "use_reg": use_reg, "use_stepwise": use_stepwise,
                  "seed": seed, "batch_size": batch_size, "final_loss": result.losses[-1],
                  "final_global_loss": result.losses[global_steps - 1]},
        tuning=result)
    if path is not None:
        subject.save(path, overwrite=overwrite)
    return subject


# ---------------------------------------------------------------------------------------------------------
# Conditioning


def with_tail(cond: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[c, c_s]``: ``cond [B, L, d]`` with its last ``n`` rows replaced by ``rows [n, d]`` (§3.2)."""
    n = rows.shape[0]
    tail = rows.to(device=cond.device, dtype=cond.dtype).unsqueeze(0).expand(cond.shape[0], -1, -1)
    return torch.cat([cond[:, :-n], tail], dim=1)


def subject_conditioning(conditioning: list, subject: HiFiSubject, use_stepwise: bool = True,
                         node: str = "HiFi Subject Conditioning") -> list:
    """CONDITIONING for stock samplers that generates with the subject (Eq. 7).

    Without step-wise rows: every entry gets ``[c, c_s]`` (global rows). With them: every entry is split into
    one entry per DDIM timestep ``τ`` with ``[c, c_s^τ]`` and the ``start_percent``/``end_percent`` range of
    :func:`stepwise_ranges` intersected with the entry's own range, so each sampler sigma sees exactly the row set
    of the nearest training timestep. Other keys (pooled output, areas, masks, ControlNets) are kept.
    """
    if use_stepwise and not subject.has_stepwise:
        raise PersonalizeError(f"{node}: this subject has no step-wise representations (it was trained with "
                               "use_stepwise off). Turn use_stepwise off here, or retrain with it on.")
    out = []
    for i, (cond, extra) in enumerate(conditioning):
        d = cond.shape[-1]
        fam = FAMILY_BY_WIDTH.get(d, f"{d}-d")
        if d != subject.width:
            raise PersonalizeError(
                f"{node}: the subject was trained on {FAMILY_NAMES.get(subject.family, subject.family)} "
                f"({subject.width}-d text rows) but the conditioning is {FAMILY_NAMES.get(fam, fam)} ({d}-d). Encode "
                "the prompt with the CLIP of the subject's checkpoint family, or retrain the subject with "
                "HiFi Subject Tune on this checkpoint.")
        if cond.shape[1] <= subject.n_tokens:
            raise PersonalizeError(f"{node}: conditioning entry {i + 1} has only {cond.shape[1]} rows.")
        if not use_stepwise:
            out.append([with_tail(cond, subject.global_rows), dict(extra)])
            continue
        s0, e0 = float(extra.get("start_percent", 0.0)), float(extra.get("end_percent", 1.0))
        for rows, (s, e) in zip(subject.rows[1:], stepwise_ranges(subject.timesteps)):
            s, e = max(s, s0), min(e, e0)
            if s >= e:
                continue
            n = dict(extra)
            n["start_percent"], n["end_percent"] = s, e
            out.append([with_tail(cond, rows), n])
    return out

"""The diffusion training objective on a ComfyUI MODEL (DDPM, Ho et al. 2020, Eq. 14; masked: HiFi Tuner Eq. 5).

Written in ComfyUI's k-diffusion form (core/sampling.py): a clean latent ``x0`` (model space, after
``process_latent_in``) is noised to ``x = x0 + σ·ε`` at ``σ = σ(t)``, ``t ~ U{0..999}``; the model's
``apply_model`` returns the denoised estimate ``D(x, σ)`` and ``ε̂ = (x − D)/σ``. For ε-prediction models this
is exactly the model's ε output; v-prediction (SD2) and other parametrisations are converted by the host's
``model_sampling``, so one loss serves every family.
"""
from __future__ import annotations

import torch

from ..kernels.losses import masked_mse
from .sampling import ModelPrediction, adm_extras, eps_from_denoised


class DiffusionObjective:
    """Noised-latent sampling and ε-loss for a loaded MODEL patcher.

    ``latents`` are user-space LATENT samples ``[N, 4, h, w]``; ``masks`` are ``[N, 1, h, w]`` weights or None.
    All randomness comes from ``generator`` (a CPU generator), so a seed reproduces a run on any device.
    """

    def __init__(self, model, latents: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator,
                 pixel_size: tuple[int, int] | None = None):
        self.model = model
        self.base = model.model
        self.device = model.load_device
        self.x0 = self.base.process_latent_in(latents.float()).to(self.device)
        self.masks = masks.to(self.device) if masks is not None else None
        self.generator = generator
        self.sigmas = self.base.model_sampling.sigmas.float().cpu()
        h, w = latents.shape[-2:]
        self.pixel_size = pixel_size or (w * 8, h * 8)
        # the training forward: the MODEL's transformer_options (attention patches), not its sampling-time wrapper
        self.prediction = ModelPrediction(model, through_wrapper=False)

    def sample(self, batch_size: int, t: int | None = None):
        """Pick images, timesteps and noise: returns ``(idx, sigma [B], noise [B,4,h,w])``."""
        n = self.x0.shape[0]
        idx = torch.randint(0, n, (batch_size,), generator=self.generator)
        if t is None:
            ts = torch.randint(0, len(self.sigmas), (batch_size,), generator=self.generator)
        else:
            ts = torch.full((batch_size,), int(t))
        sigma = self.sigmas[ts]
        noise = torch.randn((batch_size, *self.x0.shape[1:]), generator=self.generator)
        return idx, sigma.to(self.device), noise.to(self.device)

    def extra_conds(self, pooled: torch.Tensor | None, batch: int) -> dict:
        """Model-specific extra inputs: SDXL's ADM vector (pooled text + size conditioning)."""
        return adm_extras(self.base, pooled, self.pixel_size, batch, self.device)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, pooled=None) -> torch.Tensor:
        """Denoised prediction ``D(x, σ)`` with text conditioning ``cond [B, 77k, d]``."""
        return self.prediction(x, sigma, cond.to(self.device), extras=self.extra_conds(pooled, x.shape[0]))

    def loss(self, cond: torch.Tensor, idx, sigma, noise, pooled=None, use_mask: bool = True,
             snr_gamma: float = 0.0):
        """Masked ε-MSE for the sampled batch; returns ``(loss, denoised)``.

        ``snr_gamma`` > 0 weights each sample by Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via
        Min-SNR Weighting Strategy", ε-prediction form: ``min(SNR, γ) / SNR`` with ``SNR = 1/σ²``): the nearly
        clean timesteps, whose ε-error is the data's unpredictable fine texture, stop dominating the gradient over
        the noisier ones where layout and shape are decided."""
        x0 = self.x0[idx.to(self.device)]
        s = sigma.view(-1, 1, 1, 1)
        x = x0 + s * noise
        denoised = self.predict(x, sigma, cond, pooled)
        eps_hat = eps_from_denoised(x, denoised, s)
        mask = self.masks[idx.to(self.device)] if (use_mask and self.masks is not None) else None
        weight = min_snr_weight(sigma, snr_gamma) if snr_gamma > 0 else None
        return masked_mse(eps_hat, noise, mask, weight), denoised


def min_snr_weight(sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weight of the ε-loss at noise level ``σ`` (Hang et al. 2023, ε-prediction form):
    ``min(SNR, γ)/SNR``, ``SNR = 1/σ²`` in the k-diffusion form; 1 for σ ≥ 1/√γ, ``γσ²`` below."""
    snr = 1.0 / sigma.float().pow(2)
    return snr.clamp(max=gamma) / snr

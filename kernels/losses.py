"""Losses shared by the tuning methods."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_mask_to(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a ``[B, H, W]`` or ``[B, 1, H, W]`` mask in 0..1 to ``[B, 1, h, w]`` by area averaging.

    Area averaging keeps the fraction of subject pixels under each latent cell, so a latent cell that is
    half covered gets weight 0.5 (a soft version of the paper's "mask downsampled to latent size").
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="area").clamp_(0.0, 1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the masked elements: ``sum(M * (pred - target)^2) / sum(M_broadcast)``.

    HiFi Tuner Eq. 5 (``||M ⊙ (ε_θ - ε)||²``) normalised by the number of masked elements.
    ``mask`` is ``[B, 1, h, w]`` (broadcast over channels) or ``None`` for the plain mean. Elements outside the
    mask get exactly zero gradient. ``sample_weight`` ``[B]`` scales each sample's terms in the numerator only (a
    per-timestep loss weight such as Min-SNR's), so the weights are not renormalised away.
    """
    err = (pred.float() - target.float()).pow(2)
    if sample_weight is not None:
        err = err * sample_weight.to(err).view(-1, *([1] * (err.ndim - 1)))
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype).expand_as(err)
    denom = m.sum().clamp_min(1e-8)
    return (err * m).sum() / denom

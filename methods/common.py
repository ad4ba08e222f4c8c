"""Pieces every subject-tuning method shares: reading the subject photos and decoding previews."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.inputs import crop_to_multiple, prepare_masks, to_latent_masks


@dataclass
class SubjectData:
    images: torch.Tensor             # [B, H, W, 3], cropped to multiples of 8
    latents: torch.Tensor            # [B, 4, H/8, W/8], user (VAE) space
    latent_masks: torch.Tensor | None  # [B, 1, H/8, W/8] in 0..1


def encode_subject(node: str, vae, images: torch.Tensor, masks: torch.Tensor | None = None) -> SubjectData:
    """Validate photos + masks, crop to multiples of 8, VAE-encode once (latents are cached for all steps)."""
    masks = prepare_masks(node, images, masks)
    images = crop_to_multiple(images)
    if masks is not None:
        masks = crop_to_multiple(masks[..., None])[..., 0]
    with torch.no_grad():  # cached for every step: no autograd graph through the VAE, in or out of inference mode
        latents = vae.encode(images[..., :3]).float()
    return SubjectData(images, latents, to_latent_masks(masks, tuple(latents.shape[-2:])))


def decode_previews(vae, result) -> torch.Tensor:
    """Decode the preview latents recorded during training into one IMAGE batch."""
    latents = torch.cat([lat for _step, lat in result.preview_latents], dim=0)
    with torch.no_grad():  # a report, not part of any loss (and the VAE's weights may be inference tensors)
        return vae.decode(latents)

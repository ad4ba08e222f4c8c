"""The subject photos every subject-tuning method trains on: validated, cropped to multiples of 8, VAE-encoded
once, with their masks at latent resolution."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.inputs import crop_to_multiple, prepare_masks, to_latent_masks


@dataclass
class SubjectPhotos:
    images: torch.Tensor             # [B, H, W, 3], cropped to multiples of 8
    latents: torch.Tensor            # [B, 4, H/8, W/8], user (VAE) space
    latent_masks: torch.Tensor | None  # [B, 1, H/8, W/8] in 0..1


def encode_subject(node: str, vae, images: torch.Tensor, masks: torch.Tensor | None = None) -> SubjectPhotos:
    """Validate photos + masks, crop to multiples of 8, VAE-encode once (latents are cached for all steps)."""
    masks = prepare_masks(node, images, masks)
    images = crop_to_multiple(images)
    if masks is not None:
        masks = crop_to_multiple(masks[..., None])[..., 0]
    with torch.no_grad():  # cached for every step: no autograd graph through the VAE, in or out of inference mode
        latents = vae.encode(images[..., :3]).float()
    return SubjectPhotos(images, latents, to_latent_masks(masks, tuple(latents.shape[-2:])))

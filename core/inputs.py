"""Validation and preparation of IMAGE / MASK inputs, before any work starts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .host import PersonalizeError


def crop_to_multiple(images: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Centre-crop ``[B, H, W, C]`` images to sizes divisible by ``multiple`` (what VAEEncode does)."""
    h, w = images.shape[1] // multiple * multiple, images.shape[2] // multiple * multiple
    if h == 0 or w == 0:
        raise PersonalizeError(f"Images must be at least {multiple}x{multiple} pixels.")
    y0, x0 = (images.shape[1] - h) // 2, (images.shape[2] - w) // 2
    return images[:, y0:y0 + h, x0:x0 + w]


def prepare_masks(node: str, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor | None:
    """Match ``masks`` to ``images`` (count and size) and reject empty ones. Returns ``[B, H, W]`` or None.

    * one mask for many images is repeated; other count mismatches are errors;
    * a mask of another size with the same aspect ratio is resized; another aspect ratio is an error;
    * a mask with no subject pixels is an error (it would train on nothing).
    """
    if masks is None:
        return None
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    b, h, w = images.shape[0], images.shape[1], images.shape[2]
    if masks.shape[0] != b:
        if masks.shape[0] == 1:
            masks = masks.expand(b, -1, -1)
        else:
            raise PersonalizeError(
                f"{node}: {masks.shape[0]} masks for {b} images. Give one mask per image, in the same order, "
                "or a single mask for all of them.")
    mh, mw = masks.shape[1], masks.shape[2]
    if (mh, mw) != (h, w):
        if abs(mh / mw - h / w) > 0.01:
            raise PersonalizeError(
                f"{node}: the masks are {mw}x{mh} but the images are {w}x{h} (another aspect ratio). "
                "Make the masks from the same images, or resize/crop both alike.")
        masks = F.interpolate(masks[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    masks = masks.float().clamp(0, 1)
    empty = [i for i in range(b) if float(masks[i].max()) <= 1e-3]
    if empty:
        raise PersonalizeError(
            f"{node}: the mask of image {', '.join(str(i + 1) for i in empty)} is empty (no subject pixels). "
            "Check the mask node, or invert the mask if the subject is black.")
    return masks


def to_latent_masks(masks: torch.Tensor | None, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    from ..kernels.losses import resize_mask_to
    return None if masks is None else resize_mask_to(masks, latent_hw)


NAME_MAX_BYTES = 255  # longest file name (one path component) on ext4, btrfs, xfs, APFS and NTFS


def check_file_name(node: str, what: str, name: str, suffix: str = ".safetensors") -> None:
    """Refuse a user-typed file name whose file (``name`` + ``suffix``, per path component) would be longer than
    the file system allows (255 bytes in UTF-8), before any work, instead of ``OSError: File name too long``
    after it."""
    name = name.strip()
    parts = name.replace("\\", "/").split("/")
    if parts and not parts[-1].endswith(suffix):
        parts[-1] += suffix
    for part in parts:
        size = len(part.encode("utf-8"))
        if size > NAME_MAX_BYTES:
            short = part if len(part) <= 40 else part[:37] + "..."
            raise PersonalizeError(
                f"{node}: the {what} '{short}' is {size} bytes long; file names may be at most {NAME_MAX_BYTES} bytes "
                f"(the file system's limit, '{suffix}' included). Choose a shorter {what}.")

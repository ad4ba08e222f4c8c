"""Subject photos for tests and the demo: a synthetic striped disc (for the random SD-shaped fixtures) and held-out
mini-world subjects (for the trained mini model), and the folders the pack ships in ``subjects/``
(``scripts/build_subjects.py`` writes them with :func:`write_shipped_subjects`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DEMO_FOLDER = "personalize_demo_subject"


def subject_images(n: int = 3, size: int = 64, seed: int = 0):
    """``n`` views of one subject (a striped disc at varying positions) on noisy backgrounds, with masks.
    Returns IMAGE ``[n, size, size, 3]`` and MASK ``[n, size, size]`` (1 = subject)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for i in range(n):
        cx, cy = size / 2 + (i - n / 2) * 3, size / 2 + (i % 2) * 4
        r = size * 0.28
        m = (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).float()
        bg = 0.3 + 0.2 * torch.rand(size, size, 3, generator=g)
        stripes = ((xx + yy) // 4 % 2).float()
        fg = torch.stack([0.9 * stripes + 0.05, torch.full_like(stripes, 0.2), 0.8 - 0.6 * stripes], -1)
        images.append(m[..., None] * fg + (1 - m[..., None]) * bg)
        masks.append(m)
    return torch.stack(images).clamp(0, 1), torch.stack(masks)


def save_png(array_hwc: torch.Tensor, path: Path) -> None:
    from PIL import Image
    a = (array_hwc.clamp(0, 1).numpy() * 255).astype(np.uint8)
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)


def write_subject_folder(input_dir: Path, folder: str = DEMO_FOLDER, n: int = 3, size: int = 64) -> Path:
    """Write ``subject_<i>.png`` + ``subject_<i>_mask.png`` into ``<input_dir>/<folder>``."""
    images, masks = subject_images(n, size)
    out = Path(input_dir) / folder
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        save_png(images[i], out / f"subject_{i + 1}.png")
        save_png(masks[i][..., None], out / f"subject_{i + 1}_mask.png")
    return out


MINI_DEMO_FOLDER = "personalize_mini_demo_subject"  # the name the V1 mini demo workflow reads (tests/data)
MINI_DEMO_SUBJECT = "striped red star"
"""The held-out mini-world subject the mini demo workflow personalises (never seen in base training)."""


def _pack_module(name: str):
    """A module of the pack: the host-loaded one when a host is booted, else through :func:`harness.pack_package`."""
    import importlib

    from . import PACK_PACKAGE, pack_package
    from .host import current_host

    host = current_host()
    if host is not None:
        return host.pack(name)
    pack_package()
    return importlib.import_module(f"{PACK_PACKAGE}.{name}")


def heldout_kit(name: str = MINI_DEMO_SUBJECT):
    """The held-out subject's kit (miniworld.world.HeldoutSubject: references, masks, prompts) by name."""
    world = _pack_module("miniworld.world")
    for kit in world.heldout_set(seed=0):
        if kit.subject.name == name:
            return kit
    raise KeyError(f"{name!r} is not a held-out subject")


def write_heldout_subject_folder(input_dir: Path, folder: str = MINI_DEMO_FOLDER, name: str = MINI_DEMO_SUBJECT) -> Path:
    """Write a held-out mini-world subject's reference views as ``subject_<i>.png`` + ``subject_<i>_mask.png`` into
    ``<input_dir>/<folder>`` (what Load Subject Images reads)."""
    kit = heldout_kit(name)
    out = Path(input_dir) / folder
    out.mkdir(parents=True, exist_ok=True)
    for i, ref in enumerate(kit.references):
        save_png(ref.image, out / f"subject_{i + 1}.png")
        save_png(ref.mask[..., None], out / f"subject_{i + 1}_mask.png")
    return out


SHIPPED_SUBJECT = "striped_red_star"
"""The pack's shipped subject folder (``subjects/<name>``): :data:`MINI_DEMO_SUBJECT`'s four reference views."""
SHIPPED_PHOTO = "blue_circle_photo"
"""The pack's shipped photo for HiFi Subject Replace: a blue circle (another subject) on the grass, with the mask of
the region a new subject may take."""
PHOTO_SUBJECT, PHOTO_SCENE, PHOTO_SEED = ("circle", "blue"), "grass", 11


def write_replace_photo_folder(base: Path, folder: str = SHIPPED_PHOTO) -> Path:
    """One mini-world photo for subject replacement as ``photo.png`` + ``photo_mask.png`` in ``<base>/<folder>``: a
    plain blue circle on the grass at a fixed pose (centred, half-size 17), its mask widened by 3 px so that a
    subject of another shape has room."""
    import torch.nn.functional as F
    world = _pack_module("miniworld.world")
    shot = world.render(world.Subject(*PHOTO_SUBJECT), PHOTO_SCENE, seed=PHOTO_SEED, x=32.0, y=33.0, scale=17.0,
                        rotation=0.0)
    region = F.max_pool2d((shot.mask > 0.05).float()[None, None], 7, stride=1, padding=3)[0, 0]
    out = Path(base) / folder
    out.mkdir(parents=True, exist_ok=True)
    save_png(shot.image, out / "photo.png")
    save_png(region[..., None], out / "photo_mask.png")
    return out


def write_shipped_subjects(base: Path) -> list[Path]:
    """The folders the pack ships under ``subjects/`` (what Load Subject Images finds on a fresh install):
    :data:`SHIPPED_SUBJECT` (the held-out demo subject's four 64 px reference views with masks; the mini world
    renders at 64 px only) and :data:`SHIPPED_PHOTO`. Deterministic: a pure function of the world's seeds."""
    return [write_heldout_subject_folder(base, folder=SHIPPED_SUBJECT), write_replace_photo_folder(base)]

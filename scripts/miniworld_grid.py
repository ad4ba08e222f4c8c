"""Render a visual check grid of the mini world: one row per subject, one column per scene.

Usage: ``python scripts/miniworld_grid.py [OUT.png] [--seed N] [--heldout]`` (default ``output/miniworld_grid.png``).

``--pairs`` draws identity sets and two-subject scenes instead (``docs/mini_world_pairs.png`` is
``python scripts/miniworld_grid.py docs/mini_world_pairs.png --pairs``): the first rows are identity sets
(:func:`identity_set`, one base subject per row in six scenes and poses), the rest random two-subject scenes
(:func:`training_pairs`, base subjects, the first-named one on the left).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)
__import__("harness").pack_package()  # the pack as the package comfyui_personalize (no ComfyUI needed)

from comfyui_personalize.miniworld import (  # noqa: E402
    SCENES,
    base_subjects,
    heldout_subjects,
    identity_set,
    render_batch,
    training_pairs,
)

log = logging.getLogger("miniworld.grid")


def pick_subjects(rows: int, heldout: bool, seed: int) -> list:
    """``rows`` subjects: the first held-out ones, or a seeded random choice of base subjects."""
    if heldout:
        return list(heldout_subjects()[:rows])
    pool = base_subjects()
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:rows]
    return [pool[i] for i in order.tolist()]


def pairs_grid(seed: int, identity_rows: int, pair_rows: int) -> tuple[torch.Tensor, list[str]]:
    """Tiles [N, 64, 64, 3] (rows of 6) and one log line per row: identity sets, then two-subject scenes."""
    subjects = pick_subjects(identity_rows, False, seed)
    tiles = [identity_set(s, len(SCENES), seed=seed * 1000 + i).images for i, s in enumerate(subjects)]
    lines = [f"identity set: {s.name} (pattern colour {s.pattern_colour})" for s in subjects]
    pairs = training_pairs(pair_rows * len(SCENES), torch.Generator().manual_seed(seed))
    tiles.append(pairs.images)
    lines += [" | ".join(pairs.captions[r * len(SCENES):(r + 1) * len(SCENES)]) for r in range(pair_rows)]
    return torch.cat(tiles), lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default=str(ROOT / "output" / "miniworld_grid.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--heldout", action="store_true", help="show held-out subjects instead of base ones")
    parser.add_argument("--upscale", type=int, default=3, help="nearest-neighbour zoom of each tile")
    parser.add_argument("--pairs", action="store_true",
                        help="identity sets (--rows of them) and two-subject scenes (--pair-rows rows of 6)")
    parser.add_argument("--pair-rows", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.pairs:
        images, lines = pairs_grid(args.seed, args.rows, args.pair_rows)
    else:
        subjects = pick_subjects(args.rows, args.heldout, args.seed)
        cells = [(s, sc) for s in subjects for sc in SCENES]
        seeds = [args.seed * 100_003 + i for i in range(len(cells))]
        images = render_batch([c[0] for c in cells], [c[1] for c in cells], seeds).images
        lines = [f"row: {s.name} (pattern colour {s.pattern_colour})" for s in subjects]
    tiles = images.permute(0, 3, 1, 2)
    tiles = torch.nn.functional.interpolate(tiles, scale_factor=args.upscale, mode="nearest")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles, out, nrow=len(SCENES), padding=2, pad_value=1.0)
    for line in lines:
        log.info("%s", line)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

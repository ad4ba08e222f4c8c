"""Does the shipped mini-world base model follow two-subject prompts? (It was never trained on them: a measurement,
not a target.)

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/eval_two_subjects.py [--ckpt models/mini_world.safetensors]
        [--pairs 24] [--steps 20 --cfg 5 --seed 0 --sampler ddim --scheduler ddim_uniform] [--grid out.png]

Captions: ``--pairs`` two-subject scenes of base subjects from :func:`miniworld.world.training_pairs` (generator
``--seed``), keeping pairs whose two subjects differ in shape and in colour: "a photo of a striped blue star and a
red circle on the beach". In the world's layout the first-named subject is on the left half, the second on the
right. Each caption is sampled once through ComfyUI's stock nodes (miniworld/benchmark.py ``sample_captions``:
CLIPTextEncode, KSampler, VAEDecode from the pack's loader), and so is the single-subject caption of its first
subject in the same scene (the baseline: the same crops of an image that names one subject).

Judge (miniworld/evaluators.py, used only to score): each image's left and right halves, enlarged by 1.25 and
padded back to 64×64 by repeating their edge columns (the most confident 64-row window; :func:`half_crops`), are
classified for shape and main colour. Rows:

* world renders of the same scenes - how often this judge reads a correct two-subject image right (its ceiling);
* base model, two-subject caption; base model, single-subject caption (first subject only);
* base model images scored against the next pair's subjects (a permutation chance level that keeps the judge's
  and the model's biases); uniform chance is 1 % for both shapes in order, 0.01 % for both shapes and colours.

Columns: left half = first subject's shape, right half = second's, both shapes in order, both shapes and colours in
order, both shapes in either order, the whole image's scene, and the whole image's shape read as the first / the
second subject's.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)

log = logging.getLogger("eval_two_subjects")


ZOOM = 1.25
"""Each half is enlarged by this much before it is judged: pair subjects (22-29 px) then match the 22-42 px the
evaluators were trained on."""
WINDOW_STRIDE = 4


def half_crops(evaluator, images):
    """The left and right halves of IMAGE ``[B, 64, 64, 3]`` as 64×64 views the evaluators can judge, each
    ``[B, 64, 64, 3]``: the 64×32 half is enlarged by :data:`ZOOM` (bilinear, antialiased) to 80×40, padded to 64
    wide by repeating its outer columns, and of its 64-row windows (every :data:`WINDOW_STRIDE` rows) the one whose
    shape prediction is the most confident is kept (the subject may sit anywhere vertically)."""
    import torch
    import torch.nn.functional as F
    x = images.movedim(-1, 1)
    half, size = x.shape[-1] // 2, x.shape[-2]
    views = []
    for part in (x[..., :half], x[..., half:]):
        big = F.interpolate(part, scale_factor=ZOOM, mode="bilinear", align_corners=False, antialias=True)
        h, w = big.shape[-2:]
        big = F.pad(big, ((size - w) // 2, size - w - (size - w) // 2, 0, 0), mode="replicate").clamp(0, 1)
        windows = [big[..., top:top + size, :].movedim(1, -1) for top in range(0, h - size + 1, WINDOW_STRIDE)]
        confidence = torch.stack([evaluator.classify(v)["shape"].probs.max(-1).values for v in windows])
        best = confidence.argmax(0)
        views.append(torch.stack([windows[k][i] for i, k in enumerate(best.tolist())]))
    return views


def pick_pairs(n: int, seed: int, world):
    """The first ``n`` pairs of ``world.training_pairs`` draws (generator ``seed``) whose subjects differ in shape
    and colour; returns the PairBatch rows as (subject_a, subject_b, scene, render seed)."""
    import torch
    gen, out = torch.Generator().manual_seed(seed), []
    while len(out) < n:
        b = world.training_pairs(4 * n, gen)
        out += [(a, c, sc, s) for (a, c), sc, s in zip(b.subjects, b.scenes, b.seeds)
                if a.shape != c.shape and a.colour != c.colour]
    return out[:n]


def score(evaluator, images, pairs) -> dict[str, float]:
    """Shares of images (see the module docstring's columns) for ``pairs[i] = (subject a, subject b, scene, ...)``."""
    left, right = (evaluator.classify(c) for c in half_crops(evaluator, images))
    whole = evaluator.classify(images)
    n = len(pairs)

    def share(flags):
        return sum(bool(f) for f in flags) / n

    ls, rs, lc, rc = left["shape"].labels, right["shape"].labels, left["colour"].labels, right["colour"].labels
    a_ok = [ls[i] == p[0].shape for i, p in enumerate(pairs)]
    b_ok = [rs[i] == p[1].shape for i, p in enumerate(pairs)]
    return {
        "left": share(a_ok), "right": share(b_ok),
        "both shapes": share(x and y for x, y in zip(a_ok, b_ok)),
        "both shapes + colours": share(a_ok[i] and b_ok[i] and lc[i] == p[0].colour and rc[i] == p[1].colour
                                       for i, p in enumerate(pairs)),
        "both shapes, either order": share({ls[i], rs[i]} == {p[0].shape, p[1].shape} for i, p in enumerate(pairs)),
        "scene": share(whole["scene"].labels[i] == p[2] for i, p in enumerate(pairs)),
        "whole = first": share(whole["shape"].labels[i] == p[0].shape for i, p in enumerate(pairs)),
        "whole = second": share(whole["shape"].labels[i] == p[1].shape for i, p in enumerate(pairs)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "models" / "mini_world.safetensors"))
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="ddim", help="a KSampler sampler_name")
    p.add_argument("--scheduler", default="ddim_uniform", help="a KSampler scheduler")
    p.add_argument("--grid", default="", help="write world renders, two-subject and single-subject samples here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    from harness import host as H
    h = H.boot_scratch("two_subjects_")
    import comfy.utils
    import nodes
    comfy.utils.PROGRESS_BAR_ENABLED = False
    world, bench, ev_mod = h.pack("miniworld.world"), h.pack("miniworld.benchmark"), h.pack("miniworld.evaluators")
    mf = h.pack("core.mini_family")
    evaluator = ev_mod.load_evaluator()
    model, clip, vae = mf.load_checkpoint(args.ckpt)

    pairs = pick_pairs(args.pairs, args.seed, world)
    real = world.render_pairs([a for a, *_ in pairs], [b for _, b, *_ in pairs], [sc for *_, sc, _ in pairs],
                              [s for *_, s in pairs]).images
    two = [world.pair_caption(a, b, sc) for a, b, sc, _ in pairs]
    one = [world.caption(a, sc) for a, _, sc, _ in pairs]
    t0 = time.perf_counter()
    kw = dict(steps=args.steps, cfg=args.cfg, seed=args.seed, sampler=args.sampler, scheduler=args.scheduler)
    images_two = bench.sample_captions(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, two, **kw)
    images_one = bench.sample_captions(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, one, **kw)
    seconds = time.perf_counter() - t0
    shifted = pairs[1:] + pairs[:1]
    rows = {
        "world renders of the scenes (the judge's ceiling)": score(evaluator, real, pairs),
        "base model, two-subject caption": score(evaluator, images_two, pairs),
        "base model, caption of the first subject only": score(evaluator, images_one, pairs),
        "base model, two-subject caption, scored against the next pair (chance)": score(evaluator, images_two,
                                                                                          shifted),
    }
    print(f"two-subject captions of base subjects: {len(pairs)} (+ {len(pairs)} single-subject), {args.sampler} / "
          f"{args.scheduler} {args.steps} steps, cfg {args.cfg}, seed {args.seed}, {seconds:.0f} s sampling; "
          f"checkpoint {Path(args.ckpt).name}; {time.strftime('%Y-%m-%d')}")
    cols = list(next(iter(rows.values())))
    print("| | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f} %" for c in cols) + " |")
    print("uniform chance: one shape 10 %, both shapes in order 1 %, both shapes + colours 0.01 %")
    if args.grid:
        import torchvision
        grid = torch.cat([real, images_two, images_one]).movedim(-1, 1)
        torchvision.utils.save_image(grid, args.grid, nrow=len(pairs), padding=2, pad_value=1.0)
        print(f"grid (rows: world renders, base model two-subject caption, base model first subject only): "
              f"{args.grid}")
    for i in range(min(4, len(pairs))):
        print(f"  e.g. {two[i]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluate the mini-world base model's prompt following (the first rows of `make eval`).

    .venv/bin/python scripts/eval_mini_world.py [--ckpt models/mini_world.safetensors] [--prompts 48] [--grid out.png]

Held-out prompts of seen subjects (miniworld/train_family.is_heldout_prompt: (caption name, scene) pairs never
shown in training), one image each, generated through ComfyUI's stock nodes (CLIPTextEncode, KSampler euler/normal,
VAEDecode) from the pack's loader, and classified by the mini-world evaluators: the share of images whose scene
is right, and whose shape and main colour are both right. A "real images" row scores the world's own renders of the
same prompts with the same classifiers (the ceiling the evaluators allow).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def call(nodes, class_type: str, **inputs):
    import torch
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def heldout_prompts(tf, world, n: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    pairs = [(s, sc) for s in world.base_subjects() for sc in world.SCENES if tf.is_heldout_prompt(s, sc)]
    pick = torch.randperm(len(pairs), generator=g)[:n].tolist()
    return [pairs[i] for i in pick]


def score(evaluator, images, pairs) -> dict:
    out = evaluator.classify(images)
    scene = [out["scene"].labels[i] == sc for i, (s, sc) in enumerate(pairs)]
    shape_colour = [out["shape"].labels[i] == s.shape and out["colour"].labels[i] == s.colour
                    for i, (s, sc) in enumerate(pairs)]
    shape = [out["shape"].labels[i] == s.shape for i, (s, sc) in enumerate(pairs)]
    return {"scene": sum(scene) / len(pairs), "shape+colour": sum(shape_colour) / len(pairs),
            "shape": sum(shape) / len(pairs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "models" / "mini_world.safetensors"))
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default="", help="write the generated images as a PNG grid here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    from harness import host as H
    work = Path(tempfile.mkdtemp(prefix="mini_eval_"))
    h = H.boot(os.environ.get("COMFYUI_PATH") or None, models_dir=work / "models", output_dir=work / "out",
               input_dir=work / "in", temp_dir=work / "temp")
    import nodes
    tf = importlib.import_module(f"{h.pack_module_name}.miniworld.train_family")
    world = importlib.import_module(f"{h.pack_module_name}.miniworld.world")
    ev_mod = importlib.import_module(f"{h.pack_module_name}.miniworld.evaluators")
    mf = importlib.import_module(f"{h.pack_module_name}.core.mini_family")
    evaluator = ev_mod.load_evaluator()
    model, clip, vae = mf.load_checkpoint(args.ckpt)
    pairs = heldout_prompts(tf, world, args.prompts, args.seed)
    neg = call(nodes, "CLIPTextEncode", clip=clip, text="")[0]
    images, t0 = [], time.perf_counter()
    for k, (subject, scene) in enumerate(pairs):
        pos = call(nodes, "CLIPTextEncode", clip=clip, text=world.caption(subject, scene))[0]
        latent = call(nodes, "EmptyLatentImage", width=64, height=64, batch_size=1)[0]
        out = call(nodes, "KSampler", model=model, seed=args.seed + k, steps=args.steps, cfg=args.cfg,
                   sampler_name="euler", scheduler="normal", positive=pos, negative=neg, latent_image=latent,
                   denoise=1.0)[0]
        images.append(call(nodes, "VAEDecode", samples=out, vae=vae)[0])
    images = torch.cat(images)
    seconds = time.perf_counter() - t0
    real = world.render_batch([s for s, _ in pairs], [sc for _, sc in pairs], list(range(len(pairs)))).images
    rows = {"real images (world renders)": score(evaluator, real, pairs), "base model": score(evaluator, images, pairs)}
    print(f"held-out prompts of seen subjects: {len(pairs)}, {args.steps} euler steps, cfg {args.cfg}, "
          f"{seconds:.0f} s; checkpoint {Path(args.ckpt).name}")
    print(f"{'':32s} {'scene':>7s} {'shape':>7s} {'shape+colour':>13s}")
    for name, r in rows.items():
        print(f"{name:32s} {100 * r['scene']:6.1f}% {100 * r['shape']:6.1f}% {100 * r['shape+colour']:12.1f}%")
    if args.grid:
        import torchvision
        grid = torch.cat([real, images]).movedim(-1, 1)
        torchvision.utils.save_image(grid, args.grid, nrow=len(pairs) if len(pairs) <= 16 else 16)
        print(f"grid (world renders, then generated): {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

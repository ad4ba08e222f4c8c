"""The mini-world base model's prompt following (the first table of `make eval`; `make mini-world` ends with it).

    .venv/bin/python scripts/eval_mini_world.py [--ckpt models/mini_world.safetensors] [--prompts 96] [--grid out.png]
                                                [--sampler ddim --scheduler ddim_uniform --steps 20 --cfg 5]
                                                [--restart-at 0,10,14] [--check]

Held-out prompts of seen subjects (miniworld/train_family.is_heldout_prompt: (caption name, scene) pairs never
shown in training), one image each, generated through ComfyUI's stock nodes (CLIPTextEncode, KSampler ddim /
ddim_uniform, VAEDecode) from the pack's loader, and classified by the mini-world evaluators: the share of images
whose scene is right, and whose shape and main colour are both right. Two reference rows: the world's own renders
of the same prompts (the ceiling the evaluators allow) and those renders passed through the VAE (the ceiling the
family's autoencoder allows). --restart-at K adds a row per K: the renders' latents noised to step K of the
schedule and denoised from there (stock KSamplerAdvanced), which shows in which noise range the denoiser loses the
shape. --check exits 1 unless scene >= 90 % and shape + colour >= 80 % (issue 4).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "models" / "mini_world.safetensors"))
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="ddim", help="a KSampler sampler_name")
    p.add_argument("--scheduler", default="ddim_uniform", help="a KSampler scheduler")
    p.add_argument("--restart-at", default="", metavar="K,K,...",
                   help="also score the world renders noised to DDIM step K of --steps and denoised from there "
                        "(where the denoiser loses shape: K=0 is plain sampling)")
    p.add_argument("--grid", default="", help="write world renders and generated images as a PNG grid here")
    p.add_argument("--check", action="store_true", help="exit 1 when a prompt-following target is missed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    from harness import host as H
    h = H.boot_scratch("mini_eval_")
    import comfy.utils
    import nodes
    comfy.utils.PROGRESS_BAR_ENABLED = False  # one tqdm bar per sampled image otherwise
    world, bench, ev_mod = h.pack("miniworld.world"), h.pack("miniworld.benchmark"), h.pack("miniworld.evaluators")
    mf, tf = h.pack("core.mini_family"), h.pack("miniworld.train_family")
    evaluator = ev_mod.load_evaluator()
    model, clip, vae = mf.load_checkpoint(args.ckpt)
    pairs = bench.heldout_prompts(args.prompts, args.seed)
    t0 = time.perf_counter()
    images = bench.sample_captions(nodes.NODE_CLASS_MAPPINGS, model, clip, vae,
                                   [world.caption(s, sc) for s, sc in pairs], steps=args.steps, cfg=args.cfg,
                                   seed=args.seed, sampler=args.sampler, scheduler=args.scheduler)
    seconds = time.perf_counter() - t0
    real = world.render_batch([s for s, _ in pairs], [sc for _, sc in pairs], list(range(len(pairs)))).images
    with torch.inference_mode():
        ae = tf.fp32_autoencoder(vae)  # float32 on the VAE's device, like the training's latents
        means = tf.encode_means(vae, real)
        z = means.to(next(ae.parameters()).device)
        recon = ((ae.decoder(ae.post_quant_conv(z)) + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()
    rows = {"real images (world renders)": bench.prompt_following(evaluator, real, pairs),
            "world renders through the VAE": bench.prompt_following(evaluator, recon.float(), pairs),
            "base model": bench.prompt_following(evaluator, images, pairs)}
    for k in [int(v) for v in args.restart_at.split(",") if v.strip()]:
        restarted = bench.restart_captions(nodes.NODE_CLASS_MAPPINGS, model, clip, means,
                                           vae, [world.caption(s, sc) for s, sc in pairs], k, steps=args.steps,
                                           cfg=args.cfg, seed=args.seed, sampler=args.sampler,
                                           scheduler=args.scheduler)
        rows[f"base model from the renders noised to step {k}/{args.steps}"] = bench.prompt_following(
            evaluator, restarted, pairs)
    print(f"held-out prompts of seen subjects: {len(pairs)}, {args.sampler} / {args.scheduler} {args.steps} steps, "
          f"cfg {args.cfg}, {seconds:.0f} s; checkpoint {Path(args.ckpt).name}; {time.strftime('%Y-%m-%d')}")
    print("| | scene | shape | shape + colour |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['scene']:.1f} % | {100 * r['shape']:.1f} % | {100 * r['shape+colour']:.1f} % |")
    if args.grid:
        import torchvision
        n = min(len(pairs), 16)
        grid = torch.cat([real[:n], images[:n]]).movedim(-1, 1)
        torchvision.utils.save_image(grid, args.grid, nrow=n, padding=2, pad_value=1.0)
        print(f"grid (top: world renders of the prompts; bottom: the base model): {args.grid}")
    base = rows["base model"]
    ok = base["scene"] >= bench.SCENE_TARGET and base["shape+colour"] >= bench.SHAPE_COLOUR_TARGET
    print(f"targets (scene >= {bench.SCENE_TARGET:.0%}, shape + colour >= {bench.SHAPE_COLOUR_TARGET:.0%}): "
          f"{'met' if ok else 'MISSED'}")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    raise SystemExit(main())

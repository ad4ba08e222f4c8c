"""Train the mini model family from scratch on the mini world (what `make mini-world` runs).

    .venv/bin/python scripts/train_mini_world.py [--out models/mini_world.safetensors] [--quick]
    torchrun --nproc_per_node=2 scripts/train_mini_world.py ...      # DDP (gloo on CPU, nccl on GPU)
    ... --vae-from FILE      # reuse FILE's VAE, train UNet + text encoder from scratch
    ... --init-from FILE     # continue FILE's UNet + text encoder (more compute on a trained family)
    ... --set checkpoint_every=500   # write the family every 500 diffusion steps (runs under a time limit)
    PERSONALIZE_DEVICE=auto ...      # train on the GPU ComfyUI picks (default: the CPU)

Boots ComfyUI in-process (COMFYUI_PATH or the default host tree), builds the family with ComfyUI's own classes
(core/mini_family.py), trains VAE, then UNet + text encoder (miniworld/train_family.py), and writes the fp16 file and
its .sha256 atomically from rank 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "models" / "mini_world.safetensors"))
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke test)")
    p.add_argument("--vae-from", metavar="FILE",
                   help="reuse the VAE of an earlier mini-family file and train only UNet + text encoder")
    p.add_argument("--init-from", metavar="FILE",
                   help="continue training the UNet and text encoder of an earlier mini-family file (its VAE is "
                        "reused unless --vae-from names another); pass --set seed=N to draw fresh samples")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a FamilyTrainConfig field (miniworld/train_family.py), e.g. --set vae_steps=500")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch
    from harness import host as H
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world_size))
    h = H.boot_scratch("mini_world_")
    tf = h.pack("miniworld.train_family")
    mf = h.pack("core.mini_family")
    tf.init_distributed()
    cfg = tf.FamilyTrainConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, vae_steps=4, vae_batch=4, pool_size=64, diffusion_steps=4, diffusion_batch=4,
                                  log_every=2)
    try:
        cfg = H.replace_numeric(cfg, args.set)
        mf.vae_config(cfg.vae_ch, cfg.vae_res_blocks, cfg.vae_ch_mult)  # a bad width fails here, before any work
    except ValueError as e:
        p.error(str(e))

    def file_vae_state(path):
        # the file's own values: on a GPU the host keeps a loaded VAE in bf16, which would round them
        from safetensors.torch import load_file
        return {k[len("first_stage_model."):]: v.float() for k, v in load_file(path).items()
                if k.startswith("first_stage_model.")}

    vae_state = init_state = None
    if args.init_from:
        old_model, old_clip, old_vae = mf.load_checkpoint(args.init_from)  # also checks the file
        init_state = (old_model.model.diffusion_model.state_dict(), old_clip.cond_stage_model.clip_l.state_dict())
        vae_state = file_vae_state(args.init_from)
    if args.vae_from:
        _m, _c, old_vae = mf.load_checkpoint(args.vae_from)
        vae_state = file_vae_state(args.vae_from)
    if vae_state is not None:  # the reused VAE's width and depth, whatever --set said
        dd = old_vae.mini_vae_config["ddconfig"]
        cfg = dataclasses.replace(cfg, vae_ch=dd["ch"], vae_res_blocks=dd["num_res_blocks"],
                                  vae_ch_mult=tuple(dd["ch_mult"]))
    rank, _ = tf.dist_info()
    out = Path(args.out)
    stage1 = out.with_name(out.stem + ".vae-stage" + out.suffix)

    def save_stage1(model, clip, vae):
        if rank == 0:
            mf.save_checkpoint(stage1, model, clip, vae, tf.token_ids_of_world(clip), 1.0, {"stage": "vae"})
            logging.info("VAE stage saved to %s (reuse it with --vae-from)", stage1)

    def write_checkpoint(model, clip, vae, scale, step):
        if rank == 0:  # the output file itself, replaced atomically: a run stopped by a time limit keeps it
            mf.save_checkpoint(out, model, clip, vae, tf.token_ids_of_world(clip), scale,
                               {"training": {"config": dataclasses.asdict(cfg), "checkpoint_step": step}})
            logging.info("checkpoint at diffusion step %d written to %s", step, out)

    model, clip, vae, scale, report = tf.train_family(cfg, vae_state=vae_state, on_vae_trained=save_stage1,
                                                      init_state=init_state, on_checkpoint=write_checkpoint)
    if rank == 0:
        digest = mf.save_checkpoint(out, model, clip, vae, tf.token_ids_of_world(clip), scale,
                                    {"training": report})
        for leftover in (stage1, stage1.with_name(stage1.name + ".sha256")):
            leftover.unlink(missing_ok=True)
        logging.info("wrote %s (%.1f MB, sha256 %s) in %.0f s: %s", out, out.stat().st_size / 1e6,
                     digest[:16], report["total_seconds"], json.dumps({k: v for k, v in report.items() if k != "config"}))
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

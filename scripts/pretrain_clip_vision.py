"""Pre-train the mini family's CLIP vision tower (networks/mini_clip.py) on the pre-training engine (core/pretrain.py).

    .venv/bin/python scripts/pretrain_clip_vision.py                       # the shipped recipe (make mini-world)
    .venv/bin/python scripts/pretrain_clip_vision.py --stop-after 500      # one resumable part: run it again to go on
    torchrun --nproc_per_node=2 scripts/pretrain_clip_vision.py ...        # DDP (gloo on CPU, nccl on GPUs)
    .venv/bin/python scripts/pretrain_clip_vision.py --folder my_images --size 64 --out my_clip_vision.safetensors
    .venv/bin/python scripts/pretrain_clip_vision.py --evaluate-only       # the README's figures for --out
    PERSONALIZE_DEVICE=auto ...                                            # train on the GPU ComfyUI picks

Boots ComfyUI in-process (COMFYUI_PATH or the default host tree). Checkpoints, ``log.jsonl`` and ``loss.png`` go to
``--work-dir`` (a run finding a checkpoint there resumes it); at the end rank 0 writes the vision tower to ``--out``
(fp16, atomically, with a ``.sha256``) and measures it (miniworld/encoder_eval.py) through ComfyUI's own
``ClipVisionModel.encode_image`` on the written file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)

RECIPE = {"steps": 6000, "batch_size": 128, "lr": 3e-4, "weight_decay": 0.05, "warmup": 200,
          "checkpoint_every": 100, "validate_every": 500, "log_every": 10}
# Groups of 16 renders sharing a scene and a subject but its shape (or, every other group, its pattern)
# (miniworld/sources.WorldSource). With random batches alone the tower separated captions by colour and scene and
# ignored shape (a first run, lr 1e-3, step 500: caption retrieval among shape alternatives 10 %, colour 97 %,
# scene 100 %); with groups of 8 over shape/pattern/colour still 8 % at step 500 with lr 1e-3 against 16 % at step
# 300 with lr 3e-4 (validation on base-subject renders, as below).
HARD_NEGATIVES = 16
HARD_ATTRIBUTES = ("shape", "pattern")


def main(argv=None) -> int:
    from harness import pretrain_script

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "models" / "clip_vision" / "mini_world_clip_vision.safetensors"))
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "mini_world" / "clip_vision"),
                   help="checkpoint, log.jsonl and loss.png (resumed when a checkpoint is there)")
    pretrain_script.add_common_arguments(
        p, folder_help="pre-train on a folder of images (core/pretrain_data.py layout) instead of the mini world",
        size_help="--folder images are resized to this (the tower's input)",
        export_help="after a part, also write and measure the tower as it is (the file's metadata says which step "
                    "of how many)",
        set_help="override a PretrainConfig field (core/pretrain.py), e.g. --set steps=3000")
    p.add_argument("--evaluate-only", action="store_true", help="measure --out (linear probes; retrieval needs the "
                                                                "work dir's checkpoint for the text tower)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch
    h, engine = pretrain_script.boot(args, "clip_vision_")
    distributed = h.pack("core.distributed")
    mini_clip = h.pack("networks.mini_clip")
    ev = h.pack("miniworld.encoder_eval")
    try:
        cfg = pretrain_script.config(engine, RECIPE, {"steps": 4, "batch_size": 8}, args.quick, args.set)
    except ValueError as e:
        p.error(str(e))

    def validation(module):  # base subjects, renders the training stream never draws (another seed space)
        world = h.pack("miniworld.world")
        base = world.base_subjects()
        picks = torch.randint(len(base), (96,), generator=torch.Generator().manual_seed(7)).tolist()
        samples = ev.render_set([base[i] for i in picks], 1, seed=ev.EVAL_SEED + 9)
        return ev.caption_retrieval(*_encoders(module, task, mini_clip), samples)

    task = mini_clip.ContrastiveTask(validation=None if args.quick else validation)
    out = Path(args.out)
    if args.evaluate_only:
        return _evaluate(out, Path(args.work_dir), task, engine, mini_clip, ev, cfg)
    source = (pretrain_script.folder_source(h, args, cfg)
              or h.pack("miniworld.sources").WorldSource("single", seed=cfg.seed, hard_negatives=HARD_NEGATIVES,
                                                         hard_attributes=HARD_ATTRIBUTES))
    with distributed.process_group(cuda=cfg.device.startswith("cuda")) as (rank, _):
        result = engine.pretrain(task, source, cfg, args.work_dir, stop_after=args.stop_after)
    if pretrain_script.part_done(result, cfg) and not args.export_part:
        return 0
    if rank != 0:
        return 0
    metadata = {"recipe": dataclasses.asdict(cfg), "trained_on": args.folder or "mini world (base subjects)",
                "steps_done": result.steps}
    mini_clip.save_vision(result.module, out, metadata=metadata)
    logging.info("wrote %s (%.1f KB)", out, out.stat().st_size / 1024)
    if not args.folder and not args.quick:
        _evaluate(out, Path(args.work_dir), task, engine, mini_clip, ev, cfg, module=result.module)
    return 0


def _encoders(module, task, mini_clip):
    """``encode_image`` / ``encode_text`` of a training module, in the layout encoder_eval expects."""
    import torch

    def encode_image(images):
        out = module.vision(pixel_values=mini_clip.pixel_values(images, task.vision_config), intermediate_output=-2)
        return out[2], out[1]  # image_embeds (projected class token), penultimate hidden states

    def encode_text(captions):
        with torch.no_grad():
            return module.text(task.tokenizer(captions))
    return encode_image, encode_text


def _evaluate(out: Path, work_dir: Path, task, engine, mini_clip, ev, cfg, module=None) -> int:
    """Retrieval and linear probes of the written file, through ComfyUI's ClipVisionModel; the text tower from
    ``module`` or the work dir's checkpoint (retrieval is skipped without one)."""
    import torch
    t0 = time.perf_counter()
    clip_vision = mini_clip.load_clip_vision(out)
    encode_text = None
    if module is None and (work_dir / engine.CHECKPOINT_NAME).is_file():
        payload = engine.load_checkpoint(work_dir / engine.CHECKPOINT_NAME, task, cfg)
        module = task.build(torch.device("cpu"))
        module.load_state_dict(payload["model"])
    if module is not None:
        module.eval()
        encode_text = _encoders(module, task, mini_clip)[1]
    figures = ev.report(ev.clip_vision_encoder(clip_vision), encode_text)
    logging.info("mini CLIP vision %s (%.0f s):\n%s", out.name, time.perf_counter() - t0,
                 json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=1))
    report = work_dir / "figures.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

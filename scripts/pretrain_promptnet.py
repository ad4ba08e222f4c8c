"""Pre-train ProFusion's PromptNet (networks/promptnet.py) for a base model on the pre-training engine
(core/pretrain.py), with the task of methods/profusion_pretrain.py (the official objective, methods.md §5.5).

    .venv/bin/python scripts/pretrain_promptnet.py                         # the shipped mini recipe (make promptnet)
    .venv/bin/python scripts/pretrain_promptnet.py --stop-after 600        # one resumable part: run it again to go on
    .venv/bin/python scripts/pretrain_promptnet.py --stop-after 600 --export-part   # ... and write the file as it is
    torchrun --nproc_per_node=2 scripts/pretrain_promptnet.py ...          # DDP (gloo on CPU, nccl on GPUs)
    .venv/bin/python scripts/pretrain_promptnet.py --checkpoint sd2.safetensors --clip-vision vit-h.safetensors \\
        --folder my_subjects --size 512 --out my_promptnet.safetensors     # a real model on a folder of subjects
    PERSONALIZE_DEVICE=auto ...                                            # train on the GPU ComfyUI picks

Boots ComfyUI in-process (COMFYUI_PATH or the default host tree). The frozen networks are loaded as the stock loaders
load them (core/pretrain.host_networks): ``--checkpoint`` (default: the shipped mini family) and ``--clip-vision``
(default: the shipped mini CLIP vision tower). The mini world source is ``WorldSource("views")`` (base subjects only;
each image's reference is another view of its subject); ``--folder`` reads a folder of subjects
(core/pretrain_data.py: images of one ``subject`` are each other's references). Checkpoints, ``log.jsonl`` and
``loss.png`` go to ``--work-dir`` (a run finding a checkpoint there resumes it); at the end (or after a part with
``--export-part``) rank 0 writes the PromptNet to ``--out`` (fp16, atomically, with a ``.sha256``; its metadata holds
the recipe and the steps done).

``--set FIELD=VALUE`` overrides a PretrainConfig field (``steps``, ``batch_size``, ``lr``, ...) or the task's
``prompt`` (``caption``: each image's caption with its subject replaced by the placeholder, the default; or
``official``: "a photo of holder") and ``word_init_scale`` (PromptNetTask).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)

# Official: AdamW at a constant 1e-4 (train.py); here a short warm-up and a cosine decay to 0.1x over the run. Batch
# 32 of 64-pixel renders (8x8 latents). Measured on one core (OMP_NUM_THREADS=1, a 2-core CPU): see the README.
RECIPE = {"steps": 2400, "batch_size": 32, "lr": 1e-4, "weight_decay": 1e-2, "warmup": 50, "min_lr_ratio": 0.1,
          "grad_clip": 1.0, "checkpoint_every": 50, "validate_every": 300, "log_every": 10}
# S* starts at the size of the mini text encoder's token embeddings (methods/profusion_pretrain.PromptNetTask): with
# the default initialisation (S* ~17x larger) a first run stayed worse than the plain class word after 300 steps.
TASK_DEFAULTS = {"prompt": "caption", "word_init_scale": 0.05}
TASK_SETTINGS = tuple(TASK_DEFAULTS)


def main(argv=None) -> int:
    from harness import pretrain_script

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "models" / "promptnet" / "mini_world_promptnet.safetensors"))
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "mini_world" / "promptnet"),
                   help="checkpoint, log.jsonl and loss.png (resumed when a checkpoint is there)")
    p.add_argument("--checkpoint", help="the frozen base model (a file Load Checkpoint reads, or a mini-family file; "
                                        "default: the shipped mini family)")
    p.add_argument("--clip-vision", help="the CLIP vision model of the references (default: the shipped mini one)")
    pretrain_script.add_common_arguments(
        p, folder_help="pre-train on a folder of subjects (core/pretrain_data.py layout) instead of the mini world",
        size_help="--folder images are resized to this",
        export_help="after a part, also write the PromptNet as it is (the file's metadata says which step of how many)",
        set_help="override a PretrainConfig field (core/pretrain.py), e.g. --set steps=3000, or the task's prompt "
                 "(--set prompt=official)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    h, engine = pretrain_script.boot(args, "promptnet_")
    distributed = h.pack("core.distributed")
    pp = h.pack("methods.profusion_pretrain")
    task_settings = dict(TASK_DEFAULTS)
    engine_sets = []
    for item in args.set:
        key, _, value = item.partition("=")
        if key in TASK_SETTINGS:
            task_settings[key] = type(TASK_DEFAULTS[key])(value)
        else:
            engine_sets.append(item)
    try:
        cfg = pretrain_script.config(engine, RECIPE, {"steps": 4, "batch_size": 4}, args.quick, engine_sets)
    except ValueError as e:
        p.error(f"{e}, or a task setting: {', '.join(TASK_SETTINGS)}")

    validation = None if (args.quick or args.folder) else pp.WorldValidation()
    task = pp.PromptNetTask(args.checkpoint, args.clip_vision, **task_settings, seed=cfg.seed, validation=validation)
    source = (pretrain_script.folder_source(h, args, cfg)
              or h.pack("miniworld.sources").WorldSource("views", seed=cfg.seed))
    with distributed.process_group(cuda=cfg.device.startswith("cuda")) as (rank, _):
        result = engine.pretrain(task, source, cfg, args.work_dir, stop_after=args.stop_after)
    if pretrain_script.part_done(result, cfg) and not args.export_part:
        return 0
    if rank != 0:
        return 0
    out = Path(args.out)
    metadata = {"recipe": dataclasses.asdict(cfg), "task": task.config(),
                "trained_on": args.folder or "mini world (base subjects, WorldSource views)",
                "steps_done": result.steps, "steps_total": cfg.steps}
    last = last_validation(Path(args.work_dir) / engine.LOG_NAME)
    if last:
        metadata["validation"] = last
    write(result.module, out, metadata, h)
    logging.info("wrote %s (%.1f KB) at step %d of %d", out, out.stat().st_size / 1024, result.steps, cfg.steps)
    return 0


def last_validation(log_path: Path) -> dict | None:
    """The last validation of the run's ``log.jsonl`` (``{"step": n, name: value, ...}``), or None."""
    import json
    if not log_path.is_file():
        return None
    last = None
    for line in log_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "validation" in row:
            last = {"step": row["step"], **{k: round(v, 5) for k, v in row["validation"].items()}}
    return last


def write(module, out: Path, metadata: dict, h) -> Path:
    """The PromptNet file (fp16, atomically) and its ``.sha256``."""
    artifacts = h.pack("core.artifacts")
    out.parent.mkdir(parents=True, exist_ok=True)
    path = module.save(out, overwrite=True, metadata=metadata)
    artifacts.write_file_checksum(path)
    return path


if __name__ == "__main__":
    sys.exit(main())

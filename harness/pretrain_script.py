"""What every pre-training script (``scripts/pretrain_*.py``) shares around the engine (core/pretrain.py): the
common command-line options, booting a scratch host with the run's thread count and device, the config from the
script's recipe and ``--set``/``--quick``, the data source, and the "part done" report of a resumable part."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from . import host as H

log = logging.getLogger(__name__)


def add_common_arguments(p: argparse.ArgumentParser, *, folder_help: str, size_help: str, export_help: str,
                         set_help: str) -> None:
    """``--folder --size --stop-after --export-part --quick --threads --set`` (the script's own help texts)."""
    p.add_argument("--folder", help=folder_help)
    p.add_argument("--size", type=int, default=64, help=size_help)
    p.add_argument("--stop-after", type=int, help="return after this many steps (a resumable part)")
    p.add_argument("--export-part", action="store_true", help=export_help)
    p.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help=set_help)


def boot(args, prefix: str):
    """Torch threads (``--threads``, else the cores shared among the torchrun processes), then a scratch host.
    Returns ``(host, engine)``: the host and the pack's ``core.pretrain``."""
    import torch
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world_size))
    h = H.boot_scratch(prefix)
    return h, h.pack("core.pretrain")


def config(engine, recipe: dict, quick: dict, quick_on: bool, sets: list[str]):
    """``PretrainConfig(**recipe)``, ``quick`` applied when ``quick_on`` (with ``checkpoint_every=2``, no validation,
    a log line a step, no warm-up), then ``sets`` (``FIELD=VALUE``; ValueError names the fields), on the GPU the
    host picks when ``PERSONALIZE_DEVICE=auto``."""
    cfg = engine.PretrainConfig(**recipe)
    if quick_on:
        cfg = dataclasses.replace(cfg, **{"checkpoint_every": 2, "validate_every": 0, "log_every": 1, "warmup": 0,
                                          **quick})
    cfg = H.replace_numeric(cfg, sets)
    if os.environ.get("PERSONALIZE_DEVICE") == "auto":
        import comfy.model_management as mm
        cfg = dataclasses.replace(cfg, device=str(mm.get_torch_device()))
    return cfg


def folder_source(h, args, cfg):
    """The ``--folder`` source (core/pretrain_data.FolderSource at ``--size``), or None without ``--folder``."""
    if not args.folder:
        return None
    return h.pack("core.pretrain_data").FolderSource(args.folder, size=args.size, seed=cfg.seed)


def part_done(result, cfg) -> bool:
    """True (after saying so, with the part's cost and how to go on) when ``result`` stopped before ``cfg.steps``."""
    if result.steps >= cfg.steps:
        return False
    per_step = result.seconds / max(1, result.steps - result.resumed_from)
    logging.info("part done: step %d of %d (%.0f s, %.2f s a step); run the same command again to continue",
                 result.steps, cfg.steps, result.seconds, per_step)
    return True

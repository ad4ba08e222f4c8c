"""The one pre-training engine: every network the pack pre-trains on many subjects (the mini CLIP vision tower,
PromptNet, hypernetworks, the tuning encoder, Subject-Diffusion's adapters) trains through :func:`pretrain`.

A network brings a :class:`PretrainTask` (how to build the trainable ``torch.nn.Module``, the loss of one batch,
optionally a validation); the data comes from a :class:`~comfyui_personalize.core.pretrain_data.SubjectSource` (the
mini world on the fly, or a folder of the user's own images). The engine owns everything else, once:

* **Scale**: one process by default; under ``torchrun`` the module is wrapped in DDP (core/distributed.py: nccl with
  one GPU per rank, gloo otherwise) and each rank trains on its own slice of every global batch. Mixed precision
  (``precision="bf16"`` / ``"fp16"``, CUDA only) and gradient checkpointing (the task's hook) on request.
* **Never lose work**: every ``checkpoint_every`` steps rank 0 writes ``checkpoint.pt`` atomically (temporary file,
  then rename): model, optimiser, LR schedule, the step (the data position: batches are a pure function of the
  seed, the step and the rank), and the RNG states. A run started on a folder with a checkpoint resumes from it, and
  continues exactly as the uninterrupted run would (tested on CPU). A checkpoint of another task or config is
  refused, naming the fix.
* **Show progress**: a progress bar with loss and ETA (tqdm, on stderr), ``log.jsonl`` (one line per logged step
  and per validation), ``loss.png`` (the loss curve, redrawn at each checkpoint), validation every
  ``validate_every`` steps.

Randomness inside a step (noise, timesteps, augmentations) must come from the ``generator`` the engine passes to
``task.loss``: it is seeded from (seed, step, rank), so a resumed step draws what the straight run drew.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from . import distributed
from .host import PersonalizeError

log = logging.getLogger("comfyui_personalize")

CHECKPOINT_FORMAT = "personalize-pretrain/1"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
CURVE_NAME = "loss.png"


@dataclass
class PretrainConfig:
    """The recipe's engine half (the task's own settings live in the task)."""
    steps: int = 1000
    batch_size: int = 64           # global batch: each of W ranks takes batch_size / W
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0                # linear warm-up steps, then cosine decay to ``min_lr_ratio`` × lr
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    validate_every: int = 0        # 0: only at the end
    log_every: int = 10
    precision: str = "fp32"        # fp32 | bf16 | fp16 (autocast; CUDA only)
    gradient_checkpointing: bool = False
    device: str = "cpu"

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, not {self.precision!r}")


class PretrainTask(Protocol):
    """What a network brings to the engine. ``name`` and ``config()`` identify the run (a checkpoint written under
    another name or config is refused)."""
    name: str

    def config(self) -> dict: ...                                     # JSON-able: network widths and task settings
    def build(self, device: torch.device) -> torch.nn.Module: ...     # the trainable module, initialised (seeded)
    def loss(self, module, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]: ...
    # Optional: validate(module) -> dict of floats (rank 0, no grad); enable_gradient_checkpointing(module)


@dataclass
class PretrainResult:
    module: torch.nn.Module            # the trained module (unwrapped)
    steps: int
    resumed_from: int                  # 0 for a fresh run
    losses: list[float]                # this process's per-step losses since the start or the resume
    validation: dict
    seconds: float
    out_dir: Path | None


def fingerprint(task: PretrainTask, config: PretrainConfig) -> str:
    """What a checkpoint must match to be resumed: the task's name and config and the engine settings that change
    the trajectory (not ``steps``: a run may be extended; not the logging cadence)."""
    engine = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("steps", "checkpoint_every", "validate_every", "log_every", "device")}
    blob = json.dumps({"task": task.name, "config": task.config(), "engine": engine}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_lr_ratio`` at ``steps``."""
    if config.warmup and step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    t = min(1.0, (step - config.warmup) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one step on one rank (a pure function of its arguments)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1))


# --------------------------------------------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` to a temporary file in the same folder, then an atomic rename: a kill leaves the previous
    checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, task: PretrainTask, config: PretrainConfig) -> dict:
    """Read a checkpoint and refuse one written for another task, config or format, naming the fix."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise PersonalizeError(f"{path} is not a readable pre-training checkpoint ({e}). Delete it to start over, "
                               "or point --out at another folder.") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise PersonalizeError(f"{path} is not a pre-training checkpoint of this engine (format "
                               f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}, "
                               f"expected {CHECKPOINT_FORMAT}). Delete it, or point --out at another folder.")
    if payload.get("task") != task.name:
        raise PersonalizeError(f"{path} was written while pre-training {payload.get('task')!r}, not {task.name!r}. "
                               "Use another output folder for this network, or delete the checkpoint to start over.")
    if payload.get("fingerprint") != fingerprint(task, config):
        ours = {"task": task.config(), "engine": dataclasses.asdict(config)}
        raise PersonalizeError(f"{path} was written with another configuration of {task.name} (checkpoint: "
                               f"{json.dumps(payload.get('settings'), default=str)}; this run: "
                               f"{json.dumps(ours, default=str)}). Resume with the checkpoint's settings, or use "
                               "another output folder to train this configuration from scratch.")
    return payload


# --------------------------------------------------------------------------------------------------- progress

def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _log_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each whole line of ``log.jsonl``; a line a kill cut short (not JSON) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop the log lines of steps after the checkpoint (they are about to be run again)."""
    if not path.is_file():
        return
    keep = [line for line, row in _log_rows(path) if row.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def draw_loss_curve(log_path: Path, out: Path, size: tuple[int, int] = (640, 360)) -> Path | None:
    """The loss curve of ``log.jsonl`` (and its moving average) as a PNG, drawn with Pillow (no plotting library):
    x = step, y = loss on a log scale. Written atomically."""
    from PIL import Image, ImageDraw
    if not log_path.is_file():
        return None
    rows = [row for _, row in _log_rows(log_path)]
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and r["loss"] > 0 and math.isfinite(r["loss"])]
    if len(pts) < 2:
        return None
    w, h = size
    left, right, top, bottom = 60, 15, 20, 35
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in pts], [math.log10(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        _, py = to_px(x0, yv)
        d.text((4, py - 6), f"{10 ** yv:.3g}", fill="black")
        xv = x0 + frac * (x1 - x0)
        px, _ = to_px(xv, y0)
        d.text((px - 10, h - bottom + 6), f"{int(xv)}", fill="black")
    d.line([to_px(x, y) for x, y in zip(xs, ys)], fill=(170, 190, 230), width=1)
    k = max(1, len(ys) // 25)
    avg = [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))]
    d.line([to_px(x, y) for x, y in zip(xs, avg)], fill=(20, 60, 160), width=2)
    d.text((left + 5, 3), "loss (log scale) by step", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    img.save(tmp)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------------- the loop

def _autocast(config: PretrainConfig, device: torch.device):
    import contextlib
    if config.precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)


def pretrain(task: PretrainTask, source, config: PretrainConfig, out_dir=None, *, progress: bool = True,
             stop_after: int | None = None) -> PretrainResult:
    """Train ``task``'s network on ``source`` (``source.batch(step, rank, world_size, per_rank_batch)``).

    ``out_dir`` holds ``checkpoint.pt``, ``log.jsonl`` and ``loss.png``; a checkpoint there is resumed. None trains
    without writing anything. ``stop_after``: return after that many steps of this call (a time-limited part; the
    checkpoint is written first). Call it inside :func:`core.distributed.process_group` when launched by torchrun.
    """
    config.check()
    rank, world = distributed.rank_and_world()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} does not split over {world} ranks")
    per_rank = config.batch_size // world
    device = torch.device(config.device)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_NAME if out else None

    # torch's global RNG (dropout, and any build that does not seed itself) starts from the seed, so a fresh run does
    # not depend on what ran before in the process; a resume then restores the checkpoint's state.
    torch.manual_seed(config.seed + 1_000_003 * rank)
    module = task.build(device)
    if config.gradient_checkpointing and hasattr(task, "enable_gradient_checkpointing"):
        task.enable_gradient_checkpointing(module)
    params = [p for p in module.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: lr_factor(s, config))
    scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16" and device.type == "cuda")
    start = 0
    if ckpt_path is not None and ckpt_path.is_file():
        payload = load_checkpoint(ckpt_path, task, config)
        module.load_state_dict(payload["model"])
        optimiser.load_state_dict(payload["optimizer"])
        schedule.load_state_dict(payload["scheduler"])
        if "scaler" in payload:
            scaler.load_state_dict(payload["scaler"])
        _set_rng_state(payload["rng"][min(rank, len(payload["rng"]) - 1)])
        start = int(payload["step"])
        if payload.get("world_size", world) != world:
            log.warning("%s: resuming a %d-process run with %d processes (same global batches, other slicing)",
                        ckpt_path, payload.get("world_size"), world)
        log.info("%s: resuming at step %d of %d", task.name, start, config.steps)
        if rank == 0:
            _truncate_log(out / LOG_NAME, start)
    elif out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG_NAME).unlink(missing_ok=True)
    if out is not None and rank == 0:  # temporary files of writes a kill interrupted (a checkpoint's can be large)
        for stale in [*out.glob(f".{CHECKPOINT_NAME}.*.tmp"), *out.glob(f".{CURVE_NAME}.*.png")]:
            stale.unlink(missing_ok=True)
    wrapped = distributed.wrap(module)

    def checkpoint(step: int) -> None:
        rngs = _gather_rng()
        if rank == 0 and ckpt_path is not None:
            settings = {"task": task.config(), "engine": dataclasses.asdict(config)}
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "task": task.name, "fingerprint": fingerprint(task, config),
                "settings": settings, "step": step, "world_size": world, "model": module.state_dict(),
                "optimizer": optimiser.state_dict(), "scheduler": schedule.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs})
            draw_loss_curve(out / LOG_NAME, out / CURVE_NAME)

    def validate(step: int) -> dict:
        result = {}
        if rank == 0 and hasattr(task, "validate"):
            module.eval()
            with torch.no_grad():
                result = {k: float(v) for k, v in task.validate(module).items()}
            module.train()
            if out is not None and result:
                _append_jsonl(out / LOG_NAME, {"step": step, "validation": result})
            if result:
                log.info("%s step %d validation: %s", task.name, step,
                         ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=start, desc=task.name, dynamic_ncols=True)
    losses: list[float] = []
    validation: dict = {}
    t0 = time.perf_counter()
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    module.train()
    step = start
    try:
        for step in range(start, end):
            batch = source.batch(step, rank, world, per_rank)
            gen = step_generator(config.seed, step, rank)
            with _autocast(config, device):
                loss, info = task.loss(wrapped, batch, gen)
            # mean over the ranks before the backward pass, so that a non-finite loss on any rank stops every rank
            # here (none is left waiting in DDP's gradient all-reduce)
            value = distributed.mean_across_ranks(float(loss.detach()))
            if not math.isfinite(value):
                raise PersonalizeError(f"{task.name}: the loss is {value} at step {step + 1}. Lower the learning rate "
                                       f"(now {config.lr:g}) or use precision=fp32, and start again in another output "
                                       "folder (a checkpoint resumes only with the settings that wrote it; the last "
                                       f"one{f' in {out}' if out is not None else ''} is kept).")
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip:
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimiser)
            scaler.update()
            schedule.step()
            losses.append(value)
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            if rank == 0 and out is not None and (done % config.log_every == 0 or done == end):
                _append_jsonl(out / LOG_NAME, {"step": done, "loss": value, "lr": schedule.get_last_lr()[0],
                                               **{k: float(v) for k, v in info.items()}})
            if config.validate_every and done % config.validate_every == 0 and done < config.steps:
                validation = validate(done)
            if done % config.checkpoint_every == 0 or done == end:
                checkpoint(done)
        step = end
    finally:
        if bar is not None:
            bar.close()
    if step >= config.steps:
        validation = validate(config.steps)
    distributed.check_replicas_identical(module)
    return PretrainResult(module, step, start, losses, validation, time.perf_counter() - t0, out)


def _gather_rng() -> list:
    """Every rank's RNG state (rank order); one entry in a single process."""
    state = _rng_state()
    if not distributed.is_active():
        return [state]
    import torch.distributed as dist
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


# --------------------------------------------------------------------------------------------------- frozen networks

@dataclass
class HostNetworks:
    """The frozen networks a task reads, as ComfyUI objects: MODEL (ModelPatcher), CLIP, VAE and CLIP_VISION."""
    model: Any = None
    clip: Any = None
    vae: Any = None
    clip_vision: Any = None


def host_networks(checkpoint=None, clip_vision=None, *, need_clip_vision: bool = False) -> HostNetworks:
    """Load the frozen networks through ComfyUI, as its stock loaders do: ``checkpoint`` a file Load Checkpoint reads
    (SD1.x, SD2.x, SDXL) or a mini-family file (core/mini_family.py); None: the shipped mini family. ``clip_vision``
    a file Load CLIP Vision reads or a mini CLIP vision file; None: the shipped mini one when ``need_clip_vision``.
    Their parameters are frozen (``requires_grad=False``); the trainable network stays the task's own module."""
    from pathlib import Path as _Path

    from . import mini_family
    out = HostNetworks()
    path = _Path(checkpoint) if checkpoint is not None else mini_family.shipped_checkpoint()
    if not path.is_file():
        raise PersonalizeError(f"{path} does not exist. Give the path of a checkpoint that ComfyUI's Load Checkpoint "
                               "reads, or leave it out for the shipped mini model.")
    if _is_mini(path):
        out.model, out.clip, out.vae = mini_family.load_checkpoint(path)
    else:
        import comfy.sd
        try:
            out.model, out.clip, out.vae = comfy.sd.load_checkpoint_guess_config(
                str(path), output_vae=True, output_clip=True)[:3]
        except Exception as e:  # noqa: BLE001 - the host raises many types for an unknown file
            raise PersonalizeError(f"{path.name} cannot be loaded as a checkpoint by ComfyUI ({e}). Give an SD1.x, "
                                   "SD2.x or SDXL checkpoint, or a mini-family file.") from e
    if clip_vision is not None or need_clip_vision:
        from ..networks import mini_clip
        cv_path = _Path(clip_vision) if clip_vision is not None else mini_clip.PACK_MODELS / "clip_vision" / \
            mini_clip.SHIPPED_NAME
        if _kind_of(cv_path) == mini_clip.CLIP_VISION_FILE.kind:
            out.clip_vision = mini_clip.load_clip_vision(cv_path)
        else:
            import comfy.clip_vision
            try:
                out.clip_vision = comfy.clip_vision.load(str(cv_path)) if cv_path.is_file() else None
            except Exception:  # noqa: BLE001 - the host raises many types for a file it cannot read
                out.clip_vision = None
            if out.clip_vision is None:
                raise PersonalizeError(f"{cv_path} is not a CLIP vision file ComfyUI's Load CLIP Vision reads (nor a "
                                       "mini CLIP vision file). Give e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors.")
    for obj in (out.model, out.clip and out.clip.patcher, out.vae and out.vae.patcher,
                out.clip_vision and out.clip_vision.patcher):
        if obj is not None:
            for p in obj.model.parameters():
                p.requires_grad_(False)
    return out


def _metadata(path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file: the stock loader decides
        return {}


def _is_mini(path) -> bool:
    from . import mini_family
    return str(path).endswith(".safetensors") and _metadata(path).get("format") == mini_family.FORMAT


def _kind_of(path) -> str | None:
    return _metadata(path).get("personalize.kind") if str(path).endswith(".safetensors") else None

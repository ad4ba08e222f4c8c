"""Train the mini-world evaluators (DINO / CLIP-I / CLIP-T analogs, see ``miniworld/evaluators.py``), measure them
on unseen samples and write ``miniworld/weights/evaluators.safetensors`` (fp16) + ``evaluators.sha256``.

Usage::

    python scripts/train_evaluators.py [--steps N] [--out PATH]          # one process
    torchrun --nproc_per_node=2 scripts/train_evaluators.py [...]       # DDP (gloo), each rank its own samples
    python scripts/train_evaluators.py --evaluate-only                  # re-measure the shipped weights

Data: a pool of ``--pool-pairs`` pairs (one base subject identity in two different scenes and poses) is rendered
once (split over the ranks) and reused with random horizontal flips. Training render seeds are even and evaluation
render seeds odd, so no evaluation image was seen in training. Seeded and deterministic for a given world size.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / ".pythonpath") not in sys.path:  # `harness` only, never the repo root (see harness/__init__.py)
    sys.path.insert(0, str(ROOT / ".pythonpath"))
__import__("harness").pack_package()  # the pack as the package comfyui_personalize (no ComfyUI needed)

from comfyui_personalize.core import distributed  # noqa: E402
from comfyui_personalize.miniworld import (  # noqa: E402
    PATTERNS,
    SCENES,
    Subject,
    base_subjects,
    class_prompt,
    heldout_set,
    heldout_subjects,
    render_batch,
)
from comfyui_personalize.miniworld.evaluators import (  # noqa: E402
    DEFAULT_WEIGHTS,
    FORMAT,
    HEADS,
    Evaluator,
    EvaluatorConfig,
    EvaluatorNet,
    checksum_path,
    file_sha256,
    load_evaluator,
    subject_labels,
)

log = logging.getLogger("miniworld.train_evaluators")

_RENDER_CHUNK = 256
_SEED_RANGE = 2**61


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. ``batch_size`` and ``pool_pairs`` are totals over all ranks."""

    steps: int = 4000
    batch_size: int = 64
    pool_pairs: int = 10000
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    temperature: float = 0.1
    contrastive_weight: float = 1.0
    seed: int = 0
    model: EvaluatorConfig = field(default_factory=EvaluatorConfig)


@dataclass
class TrainResult:
    """The trained network (eval mode, on this rank) and the loss of every step."""

    net: EvaluatorNet
    losses: list[float]


# --------------------------------------------------------------------------------------------------- data


def _seeds(n: int, gen: torch.Generator, parity: int) -> list[int]:
    """``n`` random render seeds of the given parity (0: training, 1: evaluation)."""
    return [2 * s + parity for s in torch.randint(_SEED_RANGE, (n,), generator=gen).tolist()]


def _render(subjects: list[Subject], scenes: list[str], seeds: list[int]) -> tuple[torch.Tensor, dict]:
    """Images as uint8 [B, 64, 64, 3] (rendered in chunks) and the head labels."""
    images = [
        (render_batch(subjects[i:i + _RENDER_CHUNK], scenes[i:i + _RENDER_CHUNK], seeds[i:i + _RENDER_CHUNK]).images
         * 255).round().to(torch.uint8)
        for i in range(0, len(seeds), _RENDER_CHUNK)
    ]
    return torch.cat(images), subject_labels(subjects, scenes)


def render_pairs(n: int, gen: torch.Generator, parity: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """``n`` random base identities, each in two different scenes with two random poses.

    Like :func:`miniworld.training_batch`, the caption name (shape, colour, pattern) is uniform over the base
    names, then the pattern colour. Returns uint8 images [n, 2, 64, 64, 3], labels (each [n, 2]) and identity ids
    [n] (indices into :func:`miniworld.base_subjects`).
    """
    base = base_subjects()
    by_name: dict[tuple[str, ...], list[int]] = {}
    for i, s in enumerate(base):
        by_name.setdefault(s.words, []).append(i)
    names = list(by_name.values())
    picks = torch.randint(len(names), (n,), generator=gen).tolist()
    variants = torch.rand(n, generator=gen).tolist()
    ids = [names[p][int(r * len(names[p]))] for p, r in zip(picks, variants)]
    first = torch.randint(len(SCENES), (n,), generator=gen)
    second = (first + torch.randint(1, len(SCENES), (n,), generator=gen)) % len(SCENES)
    scenes = [SCENES[k] for pair in zip(first.tolist(), second.tolist()) for k in pair]
    images, labels = _render([base[i] for i in ids for _ in range(2)], scenes, _seeds(2 * n, gen, parity))
    return images.view(n, 2, *images.shape[1:]), {k: v.view(n, 2) for k, v in labels.items()}, torch.tensor(ids)


def render_random_scenes(subjects: list[Subject], gen: torch.Generator, parity: int) -> tuple[torch.Tensor, dict]:
    """One sample of each of ``subjects`` in a uniformly random scene with a random pose: uint8 images, labels."""
    scenes = [SCENES[k] for k in torch.randint(len(SCENES), (len(subjects),), generator=gen).tolist()]
    return _render(subjects, scenes, _seeds(len(subjects), gen, parity))


# --------------------------------------------------------------------------------------------------- training


def supervised_contrastive(embeddings: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon loss (Khosla et al. 2020) of unit ``embeddings`` [N, D] with identity ``ids`` [N]; every sample
    needs at least one other sample of its identity."""
    logits = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(len(ids), dtype=torch.bool, device=ids.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (ids[:, None] == ids[None, :]) & ~self_mask
    log_prob = logits.log_softmax(dim=1).masked_fill(~positives, 0.0)
    return -(log_prob.sum(dim=1) / positives.sum(dim=1)).mean()


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, rank: int = 0, world_size: int = 1, log_every: int = 0) -> TrainResult:
    """Train the evaluator network; with ``world_size > 1`` the default process group must be initialised and
    the model is wrapped in DDP (core/distributed.py). Each rank renders its own share of the pool and draws
    its own batches.

    Returns the (unwrapped) network in eval mode and this rank's per-step losses.
    """
    if cfg.batch_size % (2 * world_size) or cfg.pool_pairs < world_size:
        raise ValueError("batch_size must be a multiple of 2 * world_size and pool_pairs at least world_size")
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    net = EvaluatorNet(cfg.model).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * (rank + 1))

    t0 = time.perf_counter()
    pool_images, pool_labels, pool_ids = render_pairs(cfg.pool_pairs // world_size, gen, parity=0)
    if log_every:
        log.info("rank %d: rendered %d pool images in %.1f s", rank, pool_images.shape[0] * 2,
                 time.perf_counter() - t0)

    model = distributed.wrap(net) if world_size > 1 else net
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _lr_factor(step, cfg))
    pairs = cfg.batch_size // (2 * world_size)
    losses: list[float] = []
    net.train()
    for step in range(cfg.steps):
        idx = torch.randint(pool_images.shape[0], (pairs,), generator=gen)
        x = pool_images[idx].flatten(0, 1).permute(0, 3, 1, 2).float() / 255
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous(memory_format=torch.channels_last)
        logits, embeddings = model(x)
        loss = sum(F.cross_entropy(logits[h], pool_labels[h][idx].flatten()) for h in HEADS)
        ids = pool_ids[idx].repeat_interleave(2)
        loss = loss + cfg.contrastive_weight * supervised_contrastive(embeddings, ids, cfg.temperature)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log.info("rank %d step %d/%d: loss %.4f (%.0f s)", rank, step + 1, cfg.steps, sum(recent) / len(recent),
                     time.perf_counter() - t0)
    return TrainResult(net.eval(), losses)


def round_to_fp16(net: EvaluatorNet) -> dict[str, torch.Tensor]:
    """The fp16 state dict that ships (without BatchNorm step counters); ``net`` is set to exactly these values so
    that evaluating it measures the shipped weights."""
    state = {k: v.detach().contiguous().half() for k, v in net.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return state


# --------------------------------------------------------------------------------------------------- evaluation


_AREA_DOMINANT = (PATTERNS.index("plain"), PATTERNS.index("dotted"))


def _accuracies(evaluator: Evaluator, images: torch.Tensor, labels: dict) -> dict:
    """Accuracy of every head; the colour accuracy on plain and dotted subjects alone (whose main colour also
    covers most of the subject by construction; kept as a regression guard); the 3 commonest shape and colour
    confusions as ``[true, predicted, count]``."""
    predicted = {h: out.probs.argmax(dim=1) for h, out in evaluator.classify(images.float() / 255).items()}
    out: dict = {h: float((pred == labels[h]).float().mean()) for h, pred in predicted.items()}
    dominant = torch.isin(labels["pattern"], torch.tensor(_AREA_DOMINANT))
    out["colour_plain_dotted"] = float((predicted["colour"] == labels["colour"])[dominant].float().mean())
    out["confusions"] = {}
    for h in ("shape", "colour"):
        pairs = Counter(zip(labels[h].tolist(), predicted[h].tolist()))
        wrong = sorted(((n, t, p) for (t, p), n in pairs.items() if t != p), reverse=True)[:3]
        out["confusions"][h] = [[HEADS[h][t], HEADS[h][p], n] for n, t, p in wrong]
    return out


def evaluate(evaluator: Evaluator, seed: int = 1, base_pairs: int = 600, heldout_views: int = 30) -> dict:
    """Metrics on unseen samples (odd render seeds): attribute accuracies on base subjects and on held-out subjects
    (novel combinations); held-out identity retrieval of each sample among the 24 held-out subjects by mean
    similarity to their :func:`miniworld.heldout_set` references (identity and image embeddings); and prompt
    fidelity of the held-out samples for their class prompt in their true scene vs in the next scene."""
    gen = torch.Generator().manual_seed(seed)
    base_images, base_labels, _ = render_pairs(base_pairs, gen, parity=1)
    held = heldout_subjects()
    held_subjects = [s for s in held for _ in range(heldout_views)]
    held_images, held_labels = render_random_scenes(held_subjects, gen, parity=1)
    queries = held_images.float() / 255
    owner = torch.arange(len(held)).repeat_interleave(heldout_views)

    heldouts = heldout_set(seed=0)
    references = torch.stack([r.image for heldout in heldouts for r in heldout.references])
    views = len(heldouts[0].references)

    def retrieval(embed) -> dict[str, float]:
        sims = (embed(queries) @ embed(references).T).view(len(queries), len(held), views).mean(dim=2)
        own = sims.gather(1, owner[:, None])[:, 0]
        others = sims.masked_fill(F.one_hot(owner, len(held)).bool(), float("-inf"))
        return {"top1": float((sims.argmax(dim=1) == owner).float().mean()), "own_mean": float(own.mean()),
                "best_other_mean": float(others.max(dim=1).values.mean())}

    scenes = [SCENES[i] for i in held_labels["scene"].tolist()]
    wrong = [SCENES[(SCENES.index(sc) + 1) % len(SCENES)] for sc in scenes]
    true_score = evaluator.prompt_fidelity(queries, [class_prompt(s.shape, sc) for s, sc in zip(held_subjects, scenes)])
    wrong_score = evaluator.prompt_fidelity(queries, [class_prompt(s.shape, sc) for s, sc in zip(held_subjects, wrong)])
    return {
        "base": _accuracies(evaluator, base_images.flatten(0, 1), {k: v.flatten() for k, v in base_labels.items()}),
        "heldout": _accuracies(evaluator, held_images, held_labels),
        "identity": retrieval(evaluator.identity_embedding),
        "image": retrieval(evaluator.image_embedding),
        "prompt": {"true_scene": float(true_score.mean()), "wrong_scene": float(wrong_score.mean()),
                   "true_beats_wrong": float((true_score > wrong_score).float().mean())},
        "samples": {"base": 2 * base_pairs, "heldout": len(queries), "references": len(references)},
    }


def format_table(metrics: dict) -> str:
    """The measured figures as a plain-text table."""
    columns = [*HEADS, "colour_plain_dotted"]
    lines = [f"{'accuracy (%)':<18}" + "".join(f"{c:>20}" for c in columns)]
    for split in ("base", "heldout"):
        n = metrics["samples"][split]
        lines.append(f"{f'{split} (n={n})':<18}" + "".join(f"{100 * metrics[split][c]:>20.1f}" for c in columns))
    for split in ("base", "heldout"):
        for h, confusions in metrics[split]["confusions"].items():
            text = ", ".join(f"{t}→{p} ×{n}" for t, p, n in confusions)
            lines.append(f"{split} {h} confusions: {text}")
    for kind, label in (("identity", "identity (DINO)"), ("image", "image (CLIP-I)")):
        m = metrics[kind]
        lines.append(f"held-out retrieval, {label}: top-1 {100 * m['top1']:.1f} %, own {m['own_mean']:.3f}, "
                     f"best other {m['best_other_mean']:.3f}")
    p = metrics["prompt"]
    lines.append(f"prompt fidelity (CLIP-T): true scene {p['true_scene']:.3f}, wrong scene {p['wrong_scene']:.3f}, "
                 f"true > wrong {100 * p['true_beats_wrong']:.1f} %")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- saving


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: Path, state: dict[str, torch.Tensor], cfg: TrainConfig, metrics: dict, world_size: int) -> str:
    """Write the fp16 weights with their metadata, then the sha256 file (both atomically); returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    training = {k: v for k, v in asdict(cfg).items() if k != "model"} | {"world_size": world_size}
    metadata = {"format": FORMAT, "config": cfg.model.to_json(), "metrics": json.dumps(metrics, sort_keys=True),
                "training": json.dumps(training, sort_keys=True)}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    digest = file_sha256(path)
    _atomic_write(checksum_path(path), lambda tmp: Path(tmp).write_text(f"{digest}  {path.name}\n"))
    return digest


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step, all ranks")
    parser.add_argument("--pool-pairs", type=int, default=defaults.pool_pairs, help="rendered pairs, all ranks")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--evaluate-only", action="store_true", help="measure the weights at --out, train nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.evaluate_only:
        print(format_table(evaluate(load_evaluator(args.out))))
        return 0

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, pool_pairs=args.pool_pairs, lr=args.lr,
                      seed=args.seed)
    start = time.perf_counter()
    with distributed.process_group() as (rank, world_size):  # gloo under torchrun: the evaluators train on the CPU
        result = train(cfg, rank, world_size, log_every=args.log_every)
        distributed.check_replicas_identical(result.net)
        if rank == 0:
            state = round_to_fp16(result.net)
            metrics = evaluate(Evaluator(result.net))
            digest = save_weights(args.out, state, cfg, metrics, world_size)
            print(format_table(metrics))
            print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, sha256 {digest[:16]}…) "
                  f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

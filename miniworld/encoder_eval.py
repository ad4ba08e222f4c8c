"""How well an image encoder of the mini family reads the world (issue #19 §1): caption retrieval and linear probes.

* **Caption retrieval** (CLIP's zero-shot protocol, Radford et al. 2021 §3.1.4, on the world's attributes): for each
  image of a subject, the true caption "a photo of a striped blue star on the beach" competes with every caption
  that differs from it in exactly one attribute (another shape, colour, pattern or scene: 9 + 9 + 3 + 5 = 26
  alternatives). Reported: top-1 among all 27, and per attribute the share of images whose true caption beats every
  alternative of that attribute.
* **Linear probe** per attribute (shape, colour, pattern, scene): a multinomial logistic regression on frozen features
  (the pooled ``image_embeds`` and the mean of the penultimate layer's patch tokens), fitted on base-subject renders
  and scored on held-out-subject renders (novel combinations of seen attributes).

Pure functions of an ``encode(images) -> (pooled [B, D], tokens [B, N, D])`` callable and, for retrieval, an
``encode_text(captions) -> [B, D]`` callable; nothing here trains the encoder, and nothing uses
``miniworld/evaluators.py``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import world

ATTRIBUTES = ("shape", "colour", "pattern", "scene")
EVAL_SEED = 20261206


def alternatives(subject: world.Subject, scene: str) -> dict[str, list[str]]:
    """Captions differing from ``caption(subject, scene)`` in one attribute, by attribute. A pattern change keeps a
    valid pattern colour (the caption does not name it)."""
    out: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
    for shape in world.SHAPES:
        if shape != subject.shape:
            out["shape"].append(world.caption(world.Subject(shape, subject.colour, subject.pattern,
                                                            subject.pattern_colour), scene))
    for colour in world.COLOURS:
        if colour != subject.colour:
            second = None if subject.pattern == "plain" else world.pattern_colours(colour)[0]
            out["colour"].append(world.caption(world.Subject(subject.shape, colour, subject.pattern, second), scene))
    for pattern in world.PATTERNS:
        if pattern != subject.pattern:
            second = None if pattern == "plain" else world.pattern_colours(subject.colour)[0]
            out["pattern"].append(world.caption(world.Subject(subject.shape, subject.colour, pattern, second), scene))
    for other in world.SCENES:
        if other != scene:
            out["scene"].append(world.caption(subject, other))
    return out


def render_set(subjects, per_subject: int, seed: int = EVAL_SEED) -> world.SampleBatch:
    """``per_subject`` renders of each subject, random scene and pose, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    subs = [s for s in subjects for _ in range(per_subject)]
    scenes = [world.SCENES[k] for k in torch.randint(len(world.SCENES), (len(subs),), generator=gen).tolist()]
    seeds = torch.randint(2**62, (len(subs),), generator=gen).tolist()
    return world.render_batch(subs, scenes, seeds)


@torch.no_grad()
def caption_retrieval(encode_image: Callable, encode_text: Callable, samples: world.SampleBatch) -> dict[str, float]:
    """Top-1 retrieval of the true caption among its one-attribute alternatives (module docstring)."""
    pooled = F.normalize(encode_image(samples.images)[0].float(), dim=-1)
    top1, per = 0, {a: 0 for a in ATTRIBUTES}
    for i, (subject, scene) in enumerate(zip(samples.subjects, samples.scenes)):
        alts = alternatives(subject, scene)
        captions = [world.caption(subject, scene)] + [c for a in ATTRIBUTES for c in alts[a]]
        sims = pooled[i] @ F.normalize(encode_text(captions).float(), dim=-1).T
        top1 += int(sims.argmax() == 0)
        at = 1
        for a in ATTRIBUTES:
            n = len(alts[a])
            per[a] += int(bool((sims[0] > sims[at:at + n]).all()))
            at += n
    n = len(samples)
    return {"retrieval_top1": top1 / n, **{f"retrieval_{a}": per[a] / n for a in ATTRIBUTES}}


def labels(samples: world.SampleBatch) -> dict[str, torch.Tensor]:
    return {
        "shape": torch.tensor([world.SHAPES.index(s.shape) for s in samples.subjects]),
        "colour": torch.tensor([world.COLOURS.index(s.colour) for s in samples.subjects]),
        "pattern": torch.tensor([world.PATTERNS.index(s.pattern) for s in samples.subjects]),
        "scene": torch.tensor([world.SCENES.index(s) for s in samples.scenes]),
    }


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float = 1e-3,
                     steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS (deterministic)."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe


def _features(encode_image: Callable, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    pooled, patch = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            p, tokens = encode_image(images[i:i + batch])
            pooled.append(p.float())
            patch.append(tokens[:, 1:].float().mean(dim=1))  # token 0 is the class token
    return {"pooled": torch.cat(pooled), "patch": torch.cat(patch)}


def linear_probes(encode_image: Callable, train: world.SampleBatch, test: world.SampleBatch) -> dict[str, float]:
    """Accuracy of a linear probe per attribute and feature (``probe_<feature>_<attribute>``)."""
    f_train, f_test = _features(encode_image, train.images), _features(encode_image, test.images)
    y_train, y_test = labels(train), labels(test)
    sizes = {"shape": len(world.SHAPES), "colour": len(world.COLOURS), "pattern": len(world.PATTERNS),
             "scene": len(world.SCENES)}
    out = {}
    for feat in ("pooled", "patch"):
        mean, std = f_train[feat].mean(0), f_train[feat].std(0).clamp(min=1e-6)
        xtr, xte = (f_train[feat] - mean) / std, (f_test[feat] - mean) / std
        for a in ATTRIBUTES:
            probe = fit_linear_probe(xtr, y_train[a], sizes[a])
            out[f"probe_{feat}_{a}"] = float((probe(xte).argmax(1) == y_test[a]).float().mean())
    return out


def report(encode_image: Callable, encode_text: Callable | None, *, heldout_per_subject: int = 30,
           probe_train: int = 3000, seed: int = EVAL_SEED) -> dict[str, float]:
    """The README's figures: retrieval on held-out subjects (``heldout_per_subject`` renders each) when a text
    encoder is given, and linear probes fitted on ``probe_train`` base-subject renders, tested on the held-out
    renders."""
    heldout = render_set(world.heldout_subjects(), heldout_per_subject, seed)
    base = world.base_subjects()
    gen = torch.Generator().manual_seed(seed + 1)
    picks = torch.randint(len(base), (probe_train,), generator=gen).tolist()
    train = render_set([base[i] for i in picks], 1, seed + 2)
    out = caption_retrieval(encode_image, encode_text, heldout) if encode_text is not None else {}
    out.update(linear_probes(encode_image, train, heldout))
    return out


def clip_vision_encoder(clip_vision) -> Callable:
    """``encode(images)`` through a ComfyUI CLIP_VISION's own ``encode_image`` (what the stock CLIP Vision Encode
    node runs): ``(image_embeds, penultimate_hidden_states)``."""
    def encode(images: torch.Tensor):
        out = clip_vision.encode_image(images, crop=True)
        return out["image_embeds"], out["penultimate_hidden_states"]
    return encode

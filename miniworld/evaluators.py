"""Small networks trained on the mini world that stand in for DINO, CLIP-I and CLIP-T when scoring personalisation.

One CNN backbone (:class:`EvaluatorNet`, ~0.3 M parameters) feeds five classification heads and a projection:

* **classifiers** (:meth:`Evaluator.classify`): ``scene`` (6), ``shape`` (10), ``colour`` (10, the subject's main
  colour), ``pattern`` (4) and ``pattern_colour`` (11: ``"none"`` for plain subjects, else the second colour);
* **identity embedding** — the DINO analog (:meth:`Evaluator.identity_embedding`): L2-normalised, trained with a
  supervised contrastive loss on pairs of views of one subject identity ``(shape, colour, pattern,
  pattern_colour)`` in two different scenes and poses, so it ignores the background and the pose.
  :func:`subject_fidelity` is the mean cosine similarity of a generated image's embedding to the subject's
  reference embeddings;
* **image embedding** — the CLIP-I analog (:meth:`Evaluator.image_embedding`): the holistic embedding
  ``[identity embedding, sqrt p_scene, sqrt p_shape, sqrt p_colour, sqrt p_pattern] / sqrt(5)``. Every block has
  unit norm, so the cosine similarity of two images (:func:`image_similarity`) is the mean of five terms: the
  identity cosine and the Bhattacharyya coefficients of the four predicted attribute distributions. Unlike the
  identity embedding it also rewards a matching scene (1/5 of the score) and is coarser about the subject;
* **prompt fidelity** — the CLIP-T analog (:func:`prompt_fidelity`): the prompt is parsed
  (:func:`parse_prompt`) into the attributes it states (scene phrase, class word, colour and pattern words) and
  the score is the mean predicted probability of those values (by default over all stated attributes).

Images are ComfyUI IMAGE tensors ``[B, 64, 64, 3]`` in [0, 1]. The weights ship as fp16 safetensors
(:data:`DEFAULT_WEIGHTS`) with a sha256 file beside them; :func:`load_evaluator` checks it. Rebuild them with
``python scripts/train_evaluators.py``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from .world import COLOURS, IMAGE_SIZE, PATTERNS, SCENE_PHRASES, SCENES, SHAPES, Subject

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "evaluators.safetensors"
FORMAT = "miniworld-evaluators/1"
RETRAIN_COMMAND = "python scripts/train_evaluators.py"

NO_PATTERN_COLOUR = "none"
HEADS: dict[str, tuple[str, ...]] = {
    "scene": SCENES,
    "shape": SHAPES,
    "colour": COLOURS,
    "pattern": PATTERNS,
    "pattern_colour": (NO_PATTERN_COLOUR, *COLOURS),
}
"""Classifier heads and their class names, in logit order."""
PROMPT_ATTRIBUTES = ("scene", "shape", "colour", "pattern")
"""Attributes a prompt of the world's grammar can state (and :func:`prompt_fidelity` scores)."""
IMAGE_EMBEDDING_HEADS = ("scene", "shape", "colour", "pattern")
"""Heads whose square-root probabilities join the identity embedding in :meth:`Evaluator.image_embedding`."""
_CHUNK = 256


class EvaluatorWeightsError(RuntimeError):
    """The evaluator weights are missing, corrupt or of an unknown format."""


# --------------------------------------------------------------------------------------------------- labels


def subject_labels(subjects: Sequence[Subject], scenes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Class indices (int64 [B]) of every head for samples of ``subjects`` in ``scenes``."""
    values = {
        "scene": list(scenes),
        "shape": [s.shape for s in subjects],
        "colour": [s.colour for s in subjects],
        "pattern": [s.pattern for s in subjects],
        "pattern_colour": [s.pattern_colour or NO_PATTERN_COLOUR for s in subjects],
    }
    return {head: torch.tensor([HEADS[head].index(v) for v in vals]) for head, vals in values.items()}


# --------------------------------------------------------------------------------------------------- network


@dataclass(frozen=True)
class EvaluatorConfig:
    """Backbone widths (one stride-2 stage each; 64 px input → 4 px) and the identity embedding size."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    embed_dim: int = 128

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvaluatorConfig:
        raw = json.loads(text)
        return cls(channels=tuple(raw["channels"]), embed_dim=int(raw["embed_dim"]))


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class EvaluatorNet(nn.Module):
    """CNN backbone (per stage: a stride-2 conv and a stride-1 conv, BatchNorm + ReLU), global average and max
    pooling, a linear head per attribute and a two-layer projection to the identity embedding."""

    def __init__(self, config: EvaluatorConfig = EvaluatorConfig()) -> None:
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c in config.channels:
            layers += [_conv(c_in, c, 2), _conv(c, c, 1)]
            c_in = c
        self.backbone = nn.Sequential(*layers)
        feat = 2 * c_in
        self.heads = nn.ModuleDict({name: nn.Linear(feat, len(classes)) for name, classes in HEADS.items()})
        self.project = nn.Sequential(nn.Linear(feat, feat), nn.ReLU(inplace=True), nn.Linear(feat, config.embed_dim))

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``x``: images [B, 3, 64, 64] in [0, 1]. Returns the logits of every head and the L2-normalised identity
        embedding [B, embed_dim]."""
        h = self.backbone(x * 2 - 1)
        feat = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        logits = {name: head(feat) for name, head in self.heads.items()}
        return logits, F.normalize(self.project(feat), dim=1)


def to_bchw(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, 64, 64, 3]`` (or one ``[64, 64, 3]``) → float ``[B, 3, 64, 64]``."""
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected images [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got {tuple(images.shape)}")
    return images.float().permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class ParsedPrompt:
    """What a prompt states: each attribute is a class name of its head, or None when the prompt does not say.
    ``extra`` holds the words that are no attribute (e.g. a personalisation token such as ``"<sks>"``)."""

    scene: str | None
    shape: str | None
    colour: str | None
    pattern: str | None
    extra: tuple[str, ...] = ()

    def stated(self) -> dict[str, str]:
        """The stated attributes, ``{attribute: value}``."""
        values = {"scene": self.scene, "shape": self.shape, "colour": self.colour, "pattern": self.pattern}
        return {k: v for k, v in values.items() if v is not None}


_PREFIX = re.compile(r"^\s*(?:a\s+)?(?:photo|picture|image)\s+of\s+(?:an?\s+|the\s+)?", re.IGNORECASE)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse a prompt of the world's grammar, ``"a photo of a {token?} {class word} {scene phrase}"`` or a full
    caption ``"a photo of a striped blue star on the beach"``, into the attributes it states.

    The scene phrase is matched at the end (any of :data:`~miniworld.world.SCENE_PHRASES`); among the words
    before it, shape, colour and pattern words set those attributes and the rest go to ``extra``. A plain
    subject's caption names no pattern, so ``pattern`` is only set by an explicit pattern word. Raises
    ``ValueError`` for more than one word of one attribute.
    """
    text = " ".join(prompt.lower().replace(",", " ").split())
    scene = None
    for name, phrase in SCENE_PHRASES.items():
        if text.endswith(" " + phrase) or text == phrase:
            scene, text = name, text[: -len(phrase)].strip()
            break
    text = _PREFIX.sub("", text)
    found: dict[str, str] = {}
    extra = []
    vocab = {"shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS}
    for word in text.split():
        kind = next((k for k, words in vocab.items() if word in words), None)
        if kind is None:
            extra.append(word)
        elif kind in found and found[kind] != word:
            raise ValueError(f"prompt {prompt!r} names two {kind}s: {found[kind]!r} and {word!r}")
        else:
            found[kind] = word
    return ParsedPrompt(scene, found.get("shape"), found.get("colour"), found.get("pattern"), tuple(extra))


# --------------------------------------------------------------------------------------------------- evaluator


class HeadOutput(NamedTuple):
    """One head's predictions: ``probs`` [B, C] and the argmax class names."""

    probs: torch.Tensor
    labels: list[str]


class Evaluator:
    """Inference wrapper around a trained :class:`EvaluatorNet` (eval mode, no gradients). All methods take
    ComfyUI IMAGE tensors ``[B, 64, 64, 3]`` in [0, 1] on any device and return CPU tensors."""

    def __init__(self, net: EvaluatorNet, metadata: dict | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).float().eval()
        self.metadata = metadata or {}

    @torch.inference_mode()
    def _run(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits of every head and identity embeddings, computed in chunks."""
        x = to_bchw(images)
        outs = [self.net(chunk.to(self.device)) for chunk in x.split(_CHUNK)]
        logits = {name: torch.cat([o[0][name] for o in outs]).cpu() for name in HEADS}
        return logits, torch.cat([o[1] for o in outs]).cpu()

    def classify(self, images: torch.Tensor) -> dict[str, HeadOutput]:
        """Per head (see :data:`HEADS`): softmax probabilities and predicted class names."""
        logits, _ = self._run(images)
        out = {}
        for name, lg in logits.items():
            probs = lg.softmax(dim=1)
            out[name] = HeadOutput(probs, [HEADS[name][i] for i in probs.argmax(dim=1).tolist()])
        return out

    def identity_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The DINO analog: L2-normalised subject identity embeddings [B, embed_dim]."""
        return self._run(images)[1]

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP-I analog: ``[identity, sqrt p_scene, sqrt p_shape, sqrt p_colour, sqrt p_pattern] / sqrt(5)``,
        unit norm; the cosine of two such embeddings is the mean of the identity cosine and the four attribute
        Bhattacharyya coefficients."""
        logits, identity = self._run(images)
        blocks = [identity] + [logits[h].softmax(dim=1).sqrt() for h in IMAGE_EMBEDDING_HEADS]
        return torch.cat(blocks, dim=1) / math.sqrt(len(blocks))

    def subject_fidelity(self, gen_images: torch.Tensor, ref_images: torch.Tensor) -> torch.Tensor:
        """DINO score [B_gen]: each generated image's mean identity cosine similarity to the reference images."""
        return (self.identity_embedding(gen_images) @ self.identity_embedding(ref_images).T).mean(dim=1)

    def image_similarity(self, gen_images: torch.Tensor, ref_images: torch.Tensor) -> torch.Tensor:
        """CLIP-I score [B_gen]: each generated image's mean image-embedding cosine similarity to the references."""
        return (self.image_embedding(gen_images) @ self.image_embedding(ref_images).T).mean(dim=1)

    def prompt_fidelity(
        self, images: torch.Tensor, prompts: str | Sequence[str], attributes: Sequence[str] = PROMPT_ATTRIBUTES,
    ) -> torch.Tensor:
        """CLIP-T score [B] in [0, 1]: for image ``i``, the mean predicted probability of the values that prompt
        ``i`` (or the single ``prompts`` string, for all images) states, over the stated ``attributes``.

        Raises ``ValueError`` when a prompt states none of ``attributes`` or the counts differ.
        """
        unknown = set(attributes) - set(PROMPT_ATTRIBUTES)
        if unknown:
            raise ValueError(f"unknown attributes {sorted(unknown)}; known: {PROMPT_ATTRIBUTES}")
        probs = {name: out.probs for name, out in self.classify(images).items()}
        n = next(iter(probs.values())).shape[0]
        prompt_list = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != n:
            raise ValueError(f"{n} images but {len(prompt_list)} prompts")
        scores = []
        for i, prompt in enumerate(prompt_list):
            stated = {k: v for k, v in parse_prompt(prompt).stated().items() if k in attributes}
            if not stated:
                raise ValueError(f"prompt {prompt!r} states none of {tuple(attributes)}")
            scores.append(sum(float(probs[k][i, HEADS[k].index(v)]) for k, v in stated.items()) / len(stated))
        return torch.tensor(scores)


# --------------------------------------------------------------------------------------------------- files


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(weights: Path) -> Path:
    """The sha256 file beside ``weights``: ``evaluators.safetensors`` → ``evaluators.sha256``."""
    return weights.with_suffix(".sha256")


def _fail(path: Path, problem: str) -> EvaluatorWeightsError:
    return EvaluatorWeightsError(f"evaluator weights {path} {problem}; rebuild them with `{RETRAIN_COMMAND}`")


def verify_weights(path: Path) -> None:
    """Check that ``path`` exists and matches the sha256 recorded in :func:`checksum_path`; raises
    :class:`EvaluatorWeightsError` naming the fix otherwise."""
    sums = checksum_path(path)
    if not path.is_file():
        raise _fail(path, "are missing")
    if not sums.is_file():
        raise _fail(path, f"have no checksum file {sums.name}")
    expected = next(iter(sums.read_text().split()), "")
    actual = file_sha256(path)
    if actual != expected:
        raise _fail(path, f"are corrupt (sha256 {actual[:12]}… does not match {sums.name}: {expected[:12]}…)")


def load_evaluator(path: str | Path | None = None, device: str | torch.device = "cpu") -> Evaluator:
    """Load trained evaluators (default: the shipped :data:`DEFAULT_WEIGHTS`) after verifying the checksum."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    verify_weights(path)
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        raise _fail(path, f"have format {raw.get('format')!r}, expected {FORMAT!r}")
    net = EvaluatorNet(EvaluatorConfig.from_json(raw["config"]))
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise _fail(path, f"do not fit the network (missing {missing}, unexpected {unexpected})")
    metadata = {k: json.loads(v) if k in ("config", "metrics", "training") else v for k, v in raw.items()}
    log.debug("loaded evaluators from %s", path)
    return Evaluator(net, metadata, device)


@functools.cache
def default_evaluator() -> Evaluator:
    """The shipped evaluators on the CPU, loaded once."""
    return load_evaluator()


def subject_fidelity(
    gen_images: torch.Tensor, ref_images: torch.Tensor, evaluator: Evaluator | None = None,
) -> torch.Tensor:
    """DINO analog [B_gen]: mean identity cosine similarity of each generated image to the reference images."""
    return (evaluator or default_evaluator()).subject_fidelity(gen_images, ref_images)


def image_similarity(
    gen_images: torch.Tensor, ref_images: torch.Tensor, evaluator: Evaluator | None = None,
) -> torch.Tensor:
    """CLIP-I analog [B_gen]: mean holistic image-embedding cosine similarity to the reference images."""
    return (evaluator or default_evaluator()).image_similarity(gen_images, ref_images)


def prompt_fidelity(
    images: torch.Tensor, prompts: str | Sequence[str], attributes: Sequence[str] = PROMPT_ATTRIBUTES,
    evaluator: Evaluator | None = None,
) -> torch.Tensor:
    """CLIP-T analog [B]: mean predicted probability of the attributes each prompt states (see
    :meth:`Evaluator.prompt_fidelity`)."""
    return (evaluator or default_evaluator()).prompt_fidelity(images, prompts, attributes)

"""The mini world as a pre-training source (core/pretrain_data.py's interface), generated on the fly.

Sample ``p`` of the global stream is drawn from ``torch.Generator(seed, p)`` alone, so a batch is a pure function of
(seed, step, rank, world size) and the same global batches come out whatever the number of ranks. Only base subjects
occur (:func:`world.base_subjects`: no held-out subject's name, in any pattern colour); a test asserts it.

Modes:
* ``"single"``: one view of a subject in a scene, with caption, mask and box (CLIP-style pre-training);
* ``"views"``: the same, plus ``references``: another view of the same subject (another pose and scene), the input
  of encoders that learn from one view and are scored on another (PromptNet, hypernetworks, the tuning encoder);
* ``"pairs"``: two subjects in one scene (``subject_masks`` [B, 2, H, W], two boxes per image), for multi-subject
  conditioning and attention-map losses.
"""
from __future__ import annotations

import torch

from ..core.pretrain_data import SubjectBatch, global_indices
from . import world

MODES = ("single", "views", "pairs")


def draw_subject(gen: torch.Generator) -> world.Subject:
    """A base subject: caption name uniform over the base names, then its pattern colour uniform."""
    names = world._base_by_name()  # base subjects grouped by caption name
    group = names[int(torch.randint(len(names), (1,), generator=gen))]
    return group[int(torch.randint(len(group), (1,), generator=gen))]


def subject_id(subject: world.Subject) -> str:
    return "_".join(w for w in (subject.pattern_colour, subject.pattern, subject.colour, subject.shape) if w)


HARD_ATTRIBUTES = ("shape", "pattern", "colour")


def _variant(subject: world.Subject, attribute: str, gen: torch.Generator) -> world.Subject:
    """``subject`` with ``attribute`` redrawn uniformly (a pattern colour redrawn when needed), retried until it is a
    base subject (its name is not a held-out one)."""
    held = {s.words for s in world.heldout_subjects()}
    while True:
        shape, colour, pattern, second = subject.shape, subject.colour, subject.pattern, subject.pattern_colour
        if attribute == "shape":
            shape = world.SHAPES[int(torch.randint(len(world.SHAPES), (1,), generator=gen))]
        elif attribute == "colour":
            colour = world.COLOURS[int(torch.randint(len(world.COLOURS), (1,), generator=gen))]
        else:
            pattern = world.PATTERNS[int(torch.randint(len(world.PATTERNS), (1,), generator=gen))]
        if pattern == "plain":
            second = None
        elif second is None or second not in world.pattern_colours(colour):
            allowed = world.pattern_colours(colour)
            second = allowed[int(torch.randint(len(allowed), (1,), generator=gen))]
        candidate = world.Subject(shape, colour, pattern, second)
        if candidate.words not in held:
            return candidate


class WorldSource:
    """``WorldSource(mode, seed, hard_negatives=G)``: see the module docstring.

    ``hard_negatives`` > 1 (single and views modes) makes each run of G consecutive stream positions a group: one
    scene and one subject, each member with one attribute redrawn (shape, pattern or colour, by group in turn). In-
    batch negatives then include subjects that differ from the positive in that attribute only, which a contrastive
    encoder cannot tell apart by colour and scene alone (hard negatives, as in NegCLIP, Yuksekgonul et al. 2023)."""

    def __init__(self, mode: str = "single", seed: int = 0, hard_negatives: int = 0,
                 hard_attributes: tuple[str, ...] = HARD_ATTRIBUTES):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not hard_attributes or any(a not in HARD_ATTRIBUTES for a in hard_attributes):
            raise ValueError(f"hard_attributes must be some of {HARD_ATTRIBUTES}, not {hard_attributes!r}")
        self.mode, self.seed, self.hard_negatives = mode, int(seed), int(hard_negatives)
        self.hard_attributes = tuple(hard_attributes)

    def _generator(self, position: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + position * 2_654_435_761) % (2**63 - 1))

    def _subject(self, pos: int, g: torch.Generator) -> tuple[world.Subject, int | None]:
        """The subject of stream position ``pos`` and, in a hard-negative group, the group's scene index."""
        if self.hard_negatives <= 1 or self.mode == "pairs":
            return draw_subject(g), None
        group = pos // self.hard_negatives
        gg = torch.Generator().manual_seed((self.seed * 1_000_003 + group * 40_503 + 17) % (2**63 - 1))
        anchor = draw_subject(gg)
        scene = int(torch.randint(len(world.SCENES), (1,), generator=gg))
        return _variant(anchor, self.hard_attributes[group % len(self.hard_attributes)], g), scene

    def batch(self, step: int, rank: int, world_size: int, batch_size: int) -> SubjectBatch:
        draws = []
        for pos in global_indices(step, rank, world_size, batch_size):
            g = self._generator(pos)
            subject, group_scene = self._subject(pos, g)
            scenes = torch.randperm(len(world.SCENES), generator=g)[:2].tolist()
            if group_scene is not None:
                scenes = [group_scene, next(k for k in scenes if k != group_scene)]
            seeds = torch.randint(2**62, (2,), generator=g).tolist()
            other = None
            while self.mode == "pairs" and (other is None or other.words == subject.words):
                other = draw_subject(g)  # two different caption names, as world.training_pairs draws them
            draws.append((subject, [world.SCENES[k] for k in scenes], seeds, other))
        if self.mode == "pairs":
            return self._pairs(draws)
        out = world.render_batch([d[0] for d in draws], [d[1][0] for d in draws], [d[2][0] for d in draws])
        batch = SubjectBatch(images=out.images, captions=list(out.captions),
                             subject_ids=[subject_id(d[0]) for d in draws], masks=out.masks,
                             boxes=[b.view(1, 4) for b in out.boxes], extras={"subjects": [d[0] for d in draws],
                                                                           "scenes": list(out.scenes)})
        if self.mode == "views":
            ref = world.render_batch([d[0] for d in draws], [d[1][1] for d in draws], [d[2][1] for d in draws])
            batch.references, batch.reference_masks = ref.images, ref.masks
            batch.extras["reference_captions"] = list(ref.captions)
        return batch

    def _pairs(self, draws) -> SubjectBatch:
        pairs = world.render_pairs([d[0] for d in draws], [d[3] for d in draws], [d[1][0] for d in draws],
                                   [d[2][0] for d in draws])
        return SubjectBatch(images=pairs.images, captions=list(pairs.captions),
                            subject_ids=[f"{subject_id(d[0])}+{subject_id(d[3])}" for d in draws],
                            masks=pairs.masks, boxes=list(pairs.boxes), subject_masks=pairs.subject_masks,
                            extras={"subjects": [(d[0], d[3]) for d in draws]})

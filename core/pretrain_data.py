"""The pre-training engine's one dataset interface (core/pretrain.py), and its folder source.

A source answers ``batch(step, rank, world_size, batch_size) -> SubjectBatch``, a pure function of its seed and
those arguments: the data position of a run is its step, so a resumed run reads exactly the batches the straight run
would have read, and DDP ranks read disjoint slices of one global batch. Two sources:

* the mini world, generated on the fly (``miniworld/sources.py``: single views, identity pairs, two-subject scenes);
* :class:`FolderSource`, a folder of the user's own images (below), so that the same scripts pre-train on FFHQ, a set
  of identities or a product catalogue.

Folder layout::

    my_subjects/
      manifest.jsonl            one JSON object per line, one line per image:
                                {"image": "alice/01.png", "caption": "a photo of a woman on a beach",
                                 "subject": "alice", "boxes": [[x0, y0, x1, y1], ...]}   (boxes optional, pixels)
      alice/01.png
      alice/01_mask.png         optional: the subject's mask (white = subject), same size as the image
      ...

A line without ``"subject"`` is a subject of its own. Images are resized (bilinear, antialiased; masks and boxes
alike) to ``size`` × ``size``; images whose subject has other lines in the manifest get one of those as their
``references`` (another view of the same subject, as encoders that learn from one view and are scored on another
need), else themselves. A batch has ``masks`` only when every image in it (and every reference) has one.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .host import PersonalizeError


@dataclass
class SubjectBatch:
    """One batch of subject data. Images are ``[B, H, W, 3]`` in [0, 1] (ComfyUI's IMAGE layout)."""
    images: torch.Tensor
    captions: list[str]
    subject_ids: list[str]
    masks: torch.Tensor | None = None                 # [B, H, W] in [0, 1] (union of the subjects' masks)
    boxes: list[torch.Tensor] = field(default_factory=list)  # per image [n, 4] (x0, y0, x1, y1) in pixels
    references: torch.Tensor | None = None            # [B, H, W, 3]: another view of each row's subject
    reference_masks: torch.Tensor | None = None
    subject_masks: torch.Tensor | None = None         # [B, n, H, W]: one mask per subject (multi-subject scenes)
    extras: dict = field(default_factory=dict)        # source-specific fields (the world's Subject objects, ...)

    def __len__(self) -> int:
        return self.images.shape[0]


class SubjectSource(Protocol):
    def batch(self, step: int, rank: int, world_size: int, batch_size: int) -> SubjectBatch: ...


def global_indices(step: int, rank: int, world_size: int, batch_size: int) -> range:
    """Positions in the global sample stream of one rank's share of one step: global batch ``step`` is
    ``batch_size * world_size`` consecutive positions, rank ``r`` takes the ``r``-th slice."""
    first = (step * world_size + rank) * batch_size
    return range(first, first + batch_size)


MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class _Entry:
    image: Path
    mask: Path | None
    caption: str
    subject: str
    boxes: tuple


class FolderSource:
    """The user's images in the layout of this module's docstring. Epoch ``e`` visits every line once in a
    ``random.Random(seed, e)`` order. Everything is checked when the source is made (missing files, unreadable
    images, mask sizes), so a bad folder fails before training starts."""

    def __init__(self, root, size: int = 512, seed: int = 0):
        self.root = Path(root)
        self.size = int(size)
        self.seed = int(seed)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise PersonalizeError(f"{self.root} has no {MANIFEST}. Write one JSON line per image: "
                                   '{"image": "a/01.png", "caption": "...", "subject": "a", "boxes": [[x0,y0,x1,y1]]} '
                                   "(core/pretrain_data.py describes the layout).")
        entries = []
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = self.root / row["image"]
                caption = str(row["caption"])
            except (ValueError, KeyError, TypeError) as e:
                raise PersonalizeError(f"{manifest}, line {n}: {e!r}. Each line needs at least \"image\" and "
                                       "\"caption\".") from e
            if not image.is_file():
                raise PersonalizeError(f"{manifest}, line {n}: {image} does not exist.")
            mask = image.with_name(image.stem + "_mask.png")
            try:
                boxes = tuple(tuple(float(v) for v in b) for b in row.get("boxes") or [])
            except (ValueError, TypeError):
                boxes = ((),)
            if any(len(b) != 4 for b in boxes):
                raise PersonalizeError(f"{manifest}, line {n}: boxes are [x0, y0, x1, y1] lists of numbers (pixels), "
                                       f"not {row.get('boxes')!r}.")
            # without a "subject", each line is its own subject (its path: names repeat across folders)
            entries.append(_Entry(image, mask if mask.is_file() else None, caption,
                                  str(row.get("subject", row["image"])), boxes))
        if not entries:
            raise PersonalizeError(f"{manifest} lists no images.")
        self.entries = tuple(entries)
        self._orders: dict[int, list[int]] = {}
        self.by_subject: dict[str, list[int]] = {}
        for i, e in enumerate(self.entries):
            self.by_subject.setdefault(e.subject, []).append(i)
        for e in self.entries:  # fail now, not at step 10 000
            self._read(e)

    def __len__(self) -> int:
        return len(self.entries)

    def _order(self, epoch: int) -> list[int]:
        if self._orders.get(epoch) is None:  # a shuffle of the whole folder, once per epoch (not once per image)
            order = list(range(len(self.entries)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _read(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(image [S, S, 3], mask [S, S] or None, boxes [n, 4]) resized to the source's size."""
        import numpy as np
        from PIL import Image
        try:
            with Image.open(entry.image) as im:
                im.load()
                w, h = im.size
                image = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        except OSError as e:
            raise PersonalizeError(f"{entry.image} cannot be read as an image ({e}).") from e
        mask = None
        if entry.mask is not None:
            try:
                with Image.open(entry.mask) as m:
                    m.load()
                    size = m.size
                    mask = m.convert("L").resize((self.size, self.size), Image.BILINEAR)
            except OSError as e:
                raise PersonalizeError(f"{entry.mask} cannot be read as an image ({e}). Fix or delete the mask "
                                       "(masks are optional).") from e
            if size != (w, h):
                raise PersonalizeError(f"{entry.mask} is {size[0]}x{size[1]} but its image is {w}x{h}; a mask must "
                                       "have its image's size.")
            mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
        scale = torch.tensor([self.size / w, self.size / h, self.size / w, self.size / h])
        boxes = torch.tensor(entry.boxes, dtype=torch.float32).view(-1, 4) * scale
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0), mask, boxes

    def reference_of(self, index: int, position: int) -> int:
        """Another line of the same subject (chosen by the stream position), or the line itself."""
        others = [j for j in self.by_subject[self.entries[index].subject] if j != index]
        if not others:
            return index
        return others[random.Random(self.seed * 7_919 + position).randrange(len(others))]

    def batch(self, step: int, rank: int, world_size: int, batch_size: int) -> SubjectBatch:
        n = len(self.entries)
        picks, refs = [], []
        for pos in global_indices(step, rank, world_size, batch_size):
            i = self._order(pos // n)[pos % n]
            picks.append(i)
            refs.append(self.reference_of(i, pos))
        read = [self._read(self.entries[i]) for i in picks]
        ref_read = [self._read(self.entries[j]) for j in refs]
        has_masks = all(r[1] is not None for r in read + ref_read)
        return SubjectBatch(
            images=torch.stack([r[0] for r in read]),
            captions=[self.entries[i].caption for i in picks],
            subject_ids=[self.entries[i].subject for i in picks],
            masks=torch.stack([r[1] for r in read]) if has_masks else None,
            boxes=[r[2] for r in read],
            references=torch.stack([r[0] for r in ref_read]),
            reference_masks=torch.stack([r[1] for r in ref_read]) if has_masks else None,
        )

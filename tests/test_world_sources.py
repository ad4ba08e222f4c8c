"""The mini world as a pre-training source (miniworld/sources.py): batches are a pure function of (seed, step, rank,
world size), ranks take slices of one global batch, hard-negative groups differ in one attribute, and no held-out
subject ever occurs."""
from __future__ import annotations

import pytest
import torch

from helpers import pack_module


@pytest.fixture(scope="module")
def src(host):
    return pack_module(host, "miniworld.sources")


@pytest.fixture(scope="module")
def world(host):
    return pack_module(host, "miniworld.world")


def test_deterministic_and_ranks_slice_the_global_batch(src):
    s = src.WorldSource("views", seed=3)
    whole = s.batch(5, 0, 1, 8)
    again = s.batch(5, 0, 1, 8)
    assert torch.equal(whole.images, again.images) and whole.captions == again.captions
    halves = [s.batch(5, r, 2, 4) for r in range(2)]
    assert torch.equal(torch.cat([h.images for h in halves]), whole.images)
    assert torch.equal(torch.cat([h.references for h in halves]), whole.references)
    assert s.batch(6, 0, 1, 8).captions != whole.captions
    # a reference is another view of the same subject: same subject id, another image
    assert not torch.equal(whole.references, whole.images)
    assert all(c.split(" on ")[0] for c in whole.captions)
    assert whole.masks.shape == (8, 64, 64) and len(whole.boxes) == 8


def test_hard_negative_groups_differ_in_one_attribute(src):
    s = src.WorldSource("single", seed=0, hard_negatives=8, hard_attributes=("shape", "pattern"))
    b = s.batch(0, 0, 1, 16)
    subjects, scenes = b.extras["subjects"], b.extras["scenes"]
    for g, varied in ((0, "shape"), (1, "pattern")):
        members = subjects[8 * g:8 * g + 8]
        assert len(set(scenes[8 * g:8 * g + 8])) == 1
        assert len({m.colour for m in members}) == 1
        kept = {"shape": lambda m: m.pattern, "pattern": lambda m: m.shape}[varied]
        assert len({kept(m) for m in members}) == 1
        assert len({getattr(m, varied) for m in members}) > 1
    with pytest.raises(ValueError, match="hard_attributes"):
        src.WorldSource("single", hard_negatives=4, hard_attributes=("scene",))


@pytest.mark.parametrize("kwargs", [{"mode": "single"}, {"mode": "views"},
                                    {"mode": "single", "hard_negatives": 8}])
def test_no_heldout_subject_in_any_source(src, world, kwargs):
    held = {s.words for s in world.heldout_subjects()}
    s = src.WorldSource(seed=11, **kwargs)
    seen = set()
    for step in range(6):
        b = s.batch(step, 0, 1, 48)
        seen |= {x.words for x in b.extras["subjects"]}
    assert not seen & held
    # held-out subjects are new combinations of seen attributes: their shapes, colours and patterns do occur
    words = {w for name in seen for w in name}
    assert {w for name in held for w in name} <= words

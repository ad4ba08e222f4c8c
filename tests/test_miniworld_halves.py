"""The two fixed halves of the held-out subjects (miniworld/world.py): tuning and reporting."""
from __future__ import annotations

import pytest

from comfyui_personalize.miniworld import world


def test_halves_are_disjoint_and_cover_the_heldout_list():
    tuning, reporting = set(world.TUNING_HALF), set(world.REPORTING_HALF)
    assert not tuning & reporting
    assert tuning | reporting == set(range(len(world.heldout_subjects())))
    assert len(world.TUNING_HALF) == len(tuning) == len(world.REPORTING_HALF) == len(reporting) == 12


def test_halves_come_from_their_documented_rule():
    assert world.split_heldout() == {"tuning": world.TUNING_HALF, "reporting": world.REPORTING_HALF}
    assert world.split_heldout(seed=world.HALVES_SEED + 1) != world.split_heldout()  # the shuffle matters


def test_subjects_swept_before_the_split_never_report():
    assert set(world.PRE_SPLIT_TUNED) <= set(world.TUNING_HALF)


def test_reporting_half_spreads_over_shapes_and_patterns():
    subjects = world.heldout_subjects()
    shapes = [subjects[i].shape for i in world.REPORTING_HALF]
    assert len(set(shapes)) == 9 and max(shapes.count(s) for s in shapes) == 2
    assert {subjects[i].pattern for i in world.REPORTING_HALF} == set(world.PATTERNS)


def test_heldout_half_kits():
    kits = world.heldout_half("reporting", seed=1, views=2)
    every = world.heldout_set(seed=1, views=2)
    assert [k.subject for k in kits] == [every[i].subject for i in world.REPORTING_HALF]
    assert all(len(k.references) == 2 for k in kits)
    with pytest.raises(ValueError, match="tuning, reporting"):
        world.heldout_half("test")

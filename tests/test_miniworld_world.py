"""The procedural mini world: determinism, geometry, captions, splits, scene and pattern properties."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from comfyui_personalize.miniworld import (  # the pack as a package (harness.pytest_plugin)
    COLOUR_RGB,
    COLOURS,
    IMAGE_SIZE,
    PATTERNS,
    SCALE_RANGE,
    SCENES,
    SHAPES,
    Pose,
    Subject,
    all_subjects,
    base_subjects,
    caption,
    class_prompt,
    heldout_set,
    heldout_subjects,
    render,
    render_batch,
    sample,
    training_batch,
)

STAR = Subject("star", "blue", "striped", "white")


def _batch(n: int, seed: int = 0):
    return training_batch(n, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_is_bit_identical_alone_and_in_a_batch():
    a, b = sample(STAR, "sand", 7), sample(STAR, "sand", 7)
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.box == b.box and a.pose == b.pose
    batch = render_batch([Subject("moon", "red"), STAR, Subject("ring", "cyan")], ["grass", "sand", "night"], [1, 7, 2])
    assert torch.equal(batch[1].image, a.image) and torch.equal(batch[1].mask, a.mask)


def test_explicit_pose_reproduces_the_random_one():
    s = sample(STAR, "water", 11)
    p = s.pose
    r = render(STAR, "water", seed=11, x=p.x, y=p.y, scale=p.scale, rotation=p.rotation)
    assert torch.equal(r.image, s.image)


def test_different_seeds_differ():
    a, b = sample(STAR, "snow", 1), sample(STAR, "snow", 2)
    assert a.pose != b.pose
    assert (a.image - b.image).abs().mean() > 0.01
    # same pose, different seed: still different noise
    p = a.pose
    c = render(STAR, "snow", seed=2, x=p.x, y=p.y, scale=p.scale, rotation=p.rotation)
    assert torch.equal(c.mask, a.mask) and not torch.equal(c.image, a.image)


def test_training_batch_is_deterministic_in_its_generator():
    a, b, c = _batch(6, seed=3), _batch(6, seed=3), _batch(6, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)


# ------------------------------------------------------------------------------------------------ layout and ranges


def test_shapes_dtypes_and_value_ranges():
    batch = _batch(12)
    assert batch.images.shape == (12, IMAGE_SIZE, IMAGE_SIZE, 3) and batch.images.dtype == torch.float32
    assert batch.masks.shape == (12, IMAGE_SIZE, IMAGE_SIZE) and batch.masks.dtype == torch.float32
    assert batch.boxes.shape == (12, 4)
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    assert batch.masks.min() >= 0 and batch.masks.max() <= 1
    one = batch[0]
    assert one.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and isinstance(one.box, tuple) and len(one.box) == 4
    assert one.caption == caption(one.subject, one.scene)


def test_box_bounds_the_mask_and_subject_is_fully_inside():
    batch = _batch(40, seed=5)
    for i in range(len(batch)):
        s = batch[i]
        on = s.mask > 0.5
        ys, xs = torch.nonzero(on, as_tuple=True)
        assert s.box == (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        x0, y0, x1, y1 = s.box
        assert not on[:, :x0].any() and not on[:, x1:].any() and not on[:y0].any() and not on[y1:].any()
        border = torch.cat([s.mask[0], s.mask[-1], s.mask[:, 0], s.mask[:, -1]])
        assert border.max() == 0, "subject touches the image border"
        assert 10 <= max(x1 - x0, y1 - y0) <= 2 * SCALE_RANGE[1], "bounding size out of the expected range"


@pytest.mark.parametrize(
    ("shape", "area_per_scale2"),
    [
        ("circle", math.pi * 0.9**2),
        ("square", 1.36**2),
        ("diamond", 2 * 0.6 * 0.98),
        ("triangle", 3 * math.sqrt(3) / 4),
        ("arrow", 0.5 * 1.4 * 0.9 + 0.5 * 1.0),
        ("ring", math.pi * (0.92**2 - 0.52**2)),
    ],
)
def test_mask_area_matches_the_analytic_area(shape, area_per_scale2):
    for k, (scale, rot) in enumerate([(10.0, 0.0), (14.5, 0.4), (21.0, -0.5)]):
        s = render(Subject(shape, "red"), "grass", seed=k, x=30.3 + k, y=33.7 - k, scale=scale, rotation=rot)
        expected = area_per_scale2 * scale**2
        assert float(s.mask.sum()) == pytest.approx(expected, rel=0.03)


def test_shapes_have_distinct_silhouettes():
    batch = render_batch([Subject(sh, "red") for sh in SHAPES], ["snow"] * len(SHAPES), [0] * len(SHAPES),
                         [Pose(32, 32, 18, 0.0)] * len(SHAPES))
    masks = batch.masks
    for i in range(len(SHAPES)):
        for j in range(i):
            iou = (torch.minimum(masks[i], masks[j]).sum() / torch.maximum(masks[i], masks[j]).sum()).item()
            assert iou < 0.85, f"{SHAPES[i]} and {SHAPES[j]} look alike (IoU {iou:.2f})"


# ------------------------------------------------------------------------------------------------ captions


def test_caption_grammar():
    assert caption(Subject("heart", "orange"), "sand") == "a photo of an orange heart on the beach"
    assert caption(STAR, "snow") == "a photo of a striped blue star in the snow"
    assert caption(Subject("ring", "red", "dotted", "white"), "brick") == (
        "a photo of a dotted red ring in front of a brick wall")
    assert caption(Subject("moon", "white"), "night") == "a photo of a white moon under the night sky"
    assert class_prompt("arrow", "water") == "a photo of an arrow on the water"
    assert class_prompt("star", "grass", token="<sks>") == "a photo of a <sks> star on the grass"
    assert STAR.name == "striped blue star" and STAR.words == ("striped", "blue", "star") and STAR.class_word == "star"


def test_subject_validation_and_identity():
    with pytest.raises(ValueError):
        Subject("blob", "red")
    with pytest.raises(ValueError):
        Subject("star", "red", "plain", "blue")
    with pytest.raises(ValueError):
        Subject("star", "red", "striped")
    with pytest.raises(ValueError):
        Subject("star", "orange", "striped", "yellow")  # too little contrast
    assert dataclasses.replace(STAR, texture=0.1) == STAR
    assert Subject("star", "blue", "striped", "black") != STAR


# ------------------------------------------------------------------------------------------------ splits


def test_splits_are_disjoint_novel_combinations_of_known_attributes():
    base, held = base_subjects(), heldout_subjects()
    assert 16 <= len(held) <= 30 and len(set(held)) == len(held)
    assert len({s.words for s in held}) == len(held), "held-out names must be unique"
    assert not set(base) & set(held)
    assert not {s.words for s in base} & {s.words for s in held}, "a held-out name occurs in base training"
    assert set(base) | set(held) <= set(all_subjects())
    for attr in ("shape", "colour", "pattern", "pattern_colour"):
        assert {getattr(s, attr) for s in held} <= {getattr(s, attr) for s in base}, attr
    assert {s.shape for s in base} == set(SHAPES) and {s.colour for s in base} == set(COLOURS)
    assert {s.pattern for s in base} == set(PATTERNS)
    assert heldout_subjects() == held and base_subjects() == base


def test_training_batch_draws_only_base_subjects():
    batch = _batch(48, seed=9)
    base = set(base_subjects())
    assert all(s in base for s in batch.subjects)
    assert all(sc in SCENES for sc in batch.scenes)
    assert len(set(batch.scenes)) >= 5 and len({s.shape for s in batch.subjects}) >= 7


def test_heldout_set_structure_and_determinism():
    heldouts = heldout_set(seed=0)
    assert [k.subject for k in heldouts] == list(heldout_subjects())
    for k in heldouts:
        assert len(k.references) == 4 and len({r.scene for r in k.references}) == 4
        assert all(r.subject == k.subject for r in k.references)
        assert all(r.mask[0].max() == 0 and r.mask[-1].max() == 0 for r in k.references)
        assert k.scenes == SCENES and len(k.prompts) == len(SCENES)
        assert all(k.class_word in p and k.subject.colour not in p.split() for p in k.prompts)
        assert k.prompts_with("<v>")[0] == class_prompt(k.class_word, SCENES[0], token="<v>")
    again, other = heldout_set(seed=0), heldout_set(seed=1)
    assert torch.equal(heldouts[3].references[2].image, again[3].references[2].image)
    assert not torch.equal(heldouts[3].references[2].image, other[3].references[2].image)


# ------------------------------------------------------------------------------------------------ appearance


def _background_features(batch) -> torch.Tensor:
    """Per image: mean background RGB and mean absolute horizontal / vertical neighbour differences."""
    feats = []
    for i in range(len(batch)):
        img, bg = batch.images[i], batch.masks[i] < 0.01
        bg = bg & (torch.arange(IMAGE_SIZE)[:, None] > 0) & (torch.arange(IMAGE_SIZE)[None] > 0)
        dx = (img[:, 1:] - img[:, :-1]).abs().mean(-1)[1:]
        dy = (img[1:] - img[:-1]).abs().mean(-1)[:, 1:]
        m = bg[1:, 1:] & bg[1:, :-1] & bg[:-1, 1:]
        feats.append(torch.cat([img[bg].mean(0), dx[m].mean().view(1), dy[m].mean().view(1)]))
    return torch.stack(feats)


def _scene_batch(scene: str, seeds: range):
    subjects = [base_subjects()[(97 * s) % len(base_subjects())] for s in seeds]
    return render_batch(subjects, [scene] * len(seeds), list(seeds))


def test_scenes_are_separable_by_a_nearest_mean_classifier():
    means = torch.stack([_background_features(_scene_batch(sc, range(0, 5))).mean(0) for sc in SCENES])
    for label, scene in enumerate(SCENES):
        feats = _background_features(_scene_batch(scene, range(1000, 1010)))
        predicted = torch.cdist(feats, means).argmin(dim=1)
        assert (predicted == label).all(), f"{scene} misclassified as {[SCENES[p] for p in predicted.tolist()]}"


def test_water_waves_are_horizontal_and_grass_blades_vertical():
    water, grass = (_background_features(_scene_batch(sc, range(20, 24))) for sc in ("water", "grass"))
    assert (water[:, 4] > 1.5 * water[:, 3]).all(), "water should vary more vertically (horizontal waves)"
    assert (grass[:, 3] > 1.5 * grass[:, 4]).all(), "grass should vary more horizontally (vertical blades)"


def _interior_gradient_energy(subject: Subject, rotation: float) -> tuple[float, float]:
    s = render(subject, "snow", seed=0, x=32, y=32, scale=20, rotation=rotation)
    grey, inner = s.image.mean(-1), s.mask >= 1
    m = inner[1:, 1:] & inner[:-1, 1:] & inner[1:, :-1]
    gx = (grey[1:, 1:] - grey[1:, :-1]).abs()[m].mean().item()
    gy = (grey[1:, 1:] - grey[:-1, 1:]).abs()[m].mean().item()
    return gx, gy


def test_stripes_rotate_with_the_subject():
    stripes = Subject("circle", "black", "striped", "white")
    gx0, gy0 = _interior_gradient_energy(stripes, 0.0)
    gx90, gy90 = _interior_gradient_energy(stripes, math.pi / 2)
    gx45, gy45 = _interior_gradient_energy(stripes, math.pi / 4)
    assert gx0 > 3 * gy0, "unrotated stripes should be vertical"
    assert gy90 > 3 * gx90, "stripes of a subject turned by 90° should be horizontal"
    assert 0.7 < gx45 / gy45 < 1.4


@pytest.mark.parametrize("pattern", ["striped", "checkered", "dotted"])
def test_pattern_colour_covers_the_expected_fraction(pattern):
    s = render(Subject("square", "black", pattern, "white"), "night", seed=3, x=32, y=32, scale=20, rotation=0.2)
    interior = s.image[s.mask >= 1].mean(-1)
    light = (interior > 0.5).float().mean().item()
    expected = {"striped": 0.3, "checkered": 0.5 * 0.7**2, "dotted": math.pi * 0.12**2 / 0.42**2}[pattern]
    assert light == pytest.approx(expected, abs=0.08)


@pytest.mark.parametrize("colour", ["red", "blue", "white"])
def test_subject_colour_is_rendered(colour):
    s = render(Subject("circle", colour), "sand", seed=1, x=32, y=32, scale=18, rotation=0.0)
    mean = s.image[s.mask >= 1].mean(0)
    assert torch.allclose(mean, torch.tensor(COLOUR_RGB[colour]), atol=0.08)

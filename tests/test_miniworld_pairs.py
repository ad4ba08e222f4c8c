"""The mini world's identity sets, view pairs and two-subject scenes (miniworld/world.py), the held-out subjects'
absence from every pre-training source, and that the single-subject renders did not move when they were added."""
from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from comfyui_personalize.miniworld import world as W
from comfyui_personalize.miniworld import (  # the pack as a package (harness.pytest_plugin)
    IMAGE_SIZE,
    PAIR_SCALE_RANGE,
    SCENES,
    Pose,
    Subject,
    base_subjects,
    caption,
    heldout_subjects,
    identity_set,
    pair_caption,
    render_batch,
    render_pair,
    render_pairs,
    training_batch,
    training_pairs,
    view_pairs,
)

ROOT = Path(__file__).resolve().parents[1]
STAR = Subject("star", "blue", "striped", "white")
CIRCLE = Subject("circle", "red")

# ------------------------------------------------------------------------------------------------ old outputs kept

#: sha256 of :func:`_fingerprint` computed with the world as it was before identity sets and pairs were added
#: (commit f0a8c01, torch 2.14.1 on x86-64). The world's renders feed the shipped models and the benchmark, so
#: refactoring render_batch must leave every byte as it was.
GOLDEN_FINGERPRINT = "9c619fbcdddbac94484fb6b56028d7c83b811025102fbf590655b7936642ab61"
#: The commit whose world.py the fingerprint came from (compared directly when git can show it).
GOLDEN_COMMIT = "f0a8c01"


def _fingerprint(w) -> str:
    """Hash of training_batch, render_batch (explicit and random poses; every shape, a few patterns) and
    heldout_set renders of the world module ``w``."""
    h = hashlib.sha256()

    def add(b):
        for t in (b.images, b.masks, b.boxes):
            h.update(t.numpy().tobytes())
        h.update("|".join(b.captions).encode())
        h.update(repr(b.poses).encode())

    add(w.training_batch(12, torch.Generator().manual_seed(2024)))
    subs = [w.Subject(sh, c) for sh, c in zip(w.SHAPES, w.COLOURS)] + [w.heldout_subjects()[i] for i in (1, 2, 3)]
    n = len(subs)
    add(w.render_batch(subs, [w.SCENES[i % 6] for i in range(n)], list(range(100, 100 + n)),
                       [w.Pose(20 + 2 * i, 40 - i, 12 + i * 0.7, 0.1 * i - 0.5) for i in range(n)]))
    add(w.render_batch(subs, [w.SCENES[(i + 3) % 6] for i in range(n)], list(range(7, 7 + n))))
    for k in w.heldout_set(seed=1, views=2)[:5]:
        for r in k.references:
            h.update(r.image.numpy().tobytes())
            h.update(repr(r.box).encode())
    return h.hexdigest()


def test_single_subject_renders_are_bit_identical_to_the_golden_hash():
    assert _fingerprint(W) == GOLDEN_FINGERPRINT, (
        "training_batch / render_batch / heldout_set output changed: the shipped models and the benchmark "
        "depend on it (if only the platform differs, the next test compares with the old code directly)")


def test_single_subject_renders_match_the_old_world_module(tmp_path):
    try:
        old = subprocess.run(["git", "-C", str(ROOT), "show", f"{GOLDEN_COMMIT}:miniworld/world.py"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"git unavailable: {e}")
    if old.returncode != 0:
        pytest.skip(f"commit {GOLDEN_COMMIT} not in this checkout")
    path = tmp_path / "old_world.py"
    path.write_text(old.stdout)
    spec = importlib.util.spec_from_file_location("old_miniworld_world", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module
    try:
        spec.loader.exec_module(module)
        assert _fingerprint(module) == _fingerprint(W)
    finally:
        del sys.modules[spec.name]


# ------------------------------------------------------------------------------------------------ identity sets


def test_identity_set_is_deterministic_and_shares_the_subject():
    a, b, c = identity_set(STAR, 6, seed=3), identity_set(STAR, 6, seed=3), identity_set(STAR, 6, seed=4)
    assert torch.equal(a.images, b.images) and a.scenes == b.scenes and a.poses == b.poses
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3) and a.masks.shape == (6, IMAGE_SIZE, IMAGE_SIZE)
    assert all(s == STAR for s in a.subjects)
    assert sorted(a.scenes) == sorted(SCENES), "six views should visit six scenes"
    assert len(set(a.poses)) == 6 and len({p.scale for p in a.poses}) == 6 and len(set(a.seeds)) == 6
    assert a.captions == [caption(STAR, sc) for sc in a.scenes]
    # each view is the plain single-subject render of its seed (independent reference: render_batch one by one)
    for i in (0, 5):
        one = render_batch([STAR], [a.scenes[i]], [a.seeds[i]])
        assert torch.equal(one.images[0], a.images[i]) and torch.equal(one.masks[0], a.masks[i])


def test_identity_set_scene_choices_and_errors():
    many = identity_set(CIRCLE, 14, seed=0)
    assert all(many.scenes[k] != many.scenes[k + 1] for k in range(5))
    assert all(sc in SCENES for sc in many.scenes) and {sc for sc in many.scenes} == set(SCENES)
    assert identity_set(CIRCLE, 3, seed=0, scenes="snow").scenes == ["snow"] * 3
    assert identity_set(CIRCLE, 2, seed=0, scenes=["night", "grass"]).scenes == ["night", "grass"]
    held = heldout_subjects()[5]
    assert identity_set(held, 2, seed=1).subjects == [held, held]  # evaluation data may show held-out subjects
    with pytest.raises(ValueError, match="one per view"):
        identity_set(CIRCLE, 3, seed=0, scenes=["snow"])
    with pytest.raises(ValueError, match="views"):
        identity_set(CIRCLE, 0, seed=0)
    with pytest.raises(ValueError, match="unknown scene"):
        identity_set(CIRCLE, 1, seed=0, scenes=["moon"])


def test_view_pairs_show_one_base_subject_twice_in_different_poses_and_scenes():
    pairs = view_pairs(32, torch.Generator().manual_seed(1))
    ref, tgt = pairs.reference, pairs.target
    assert len(ref) == len(tgt) == 32
    assert ref.subjects == tgt.subjects and all(s in set(base_subjects()) for s in ref.subjects)
    assert all(r != t for r, t in zip(ref.seeds, tgt.seeds))
    assert all(r != t for r, t in zip(ref.poses, tgt.poses))
    assert all(r != t for r, t in zip(ref.scenes, tgt.scenes)), "default targets are in another scene"
    assert len(set(ref.scenes)) >= 5 and len(set(tgt.scenes)) >= 5
    assert ref.captions == [caption(s, sc) for s, sc in zip(ref.subjects, ref.scenes)]
    assert tgt.captions == [caption(s, sc) for s, sc in zip(tgt.subjects, tgt.scenes)]
    # the views really differ: pixels and masks (pose), and each is the plain render of its seed
    assert ((ref.images - tgt.images).abs().flatten(1).mean(1) > 0.02).all()
    assert ((ref.masks - tgt.masks).abs().flatten(1).sum(1) > 5).all()
    one = render_batch([tgt.subjects[7]], [tgt.scenes[7]], [tgt.seeds[7]])
    assert torch.equal(one.images[0], tgt.images[7]) and torch.equal(one.boxes[0], tgt.boxes[7])

    again = view_pairs(32, torch.Generator().manual_seed(1))
    assert torch.equal(again.reference.images, ref.images) and torch.equal(again.target.images, tgt.images)
    same = view_pairs(16, torch.Generator().manual_seed(2), same_scene=True)
    assert same.reference.scenes == same.target.scenes and same.reference.seeds != same.target.seeds


# ------------------------------------------------------------------------------------------------ two subjects


def test_pair_caption_matches_the_single_subject_wording():
    assert pair_caption(STAR, CIRCLE, "sand") == "a photo of a striped blue star and a red circle on the beach"
    assert pair_caption(Subject("heart", "orange"), Subject("arrow", "white"), "brick") == (
        "a photo of an orange heart and a white arrow in front of a brick wall")
    for s, sc in ((STAR, "snow"), (Subject("ring", "orange", "dotted", "blue"), "night")):
        single = caption(s, sc)
        assert pair_caption(s, CIRCLE, sc) == single.replace(f" {W.SCENE_PHRASES[sc]}",
                                                             f" and a red circle {W.SCENE_PHRASES[sc]}")


def test_pair_batch_shapes_dtypes_and_determinism():
    gen = torch.Generator().manual_seed(5)
    batch = training_pairs(10, gen)
    assert batch.images.shape == (10, IMAGE_SIZE, IMAGE_SIZE, 3) and batch.images.dtype == torch.float32
    assert batch.subject_masks.shape == (10, 2, IMAGE_SIZE, IMAGE_SIZE) and batch.subject_masks.dtype == torch.float32
    assert batch.boxes.shape == (10, 2, 4) and batch.boxes.dtype == torch.int64
    assert batch.masks.shape == (10, IMAGE_SIZE, IMAGE_SIZE) and batch.masks.dtype == torch.float32
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    assert len(batch.captions) == len(batch.subjects) == len(batch.poses) == len(batch) == 10
    again = training_pairs(10, torch.Generator().manual_seed(5))
    assert torch.equal(again.images, batch.images) and again.captions == batch.captions
    assert not torch.equal(training_pairs(10, torch.Generator().manual_seed(6)).images, batch.images)
    one = batch[3]
    alone = render_pair(*one.subjects, one.scene, one.seed)
    assert torch.equal(alone.image, one.image) and torch.equal(alone.subject_masks, one.subject_masks)
    assert torch.equal(alone.mask, one.mask) and alone.boxes == one.boxes
    assert one.caption == pair_caption(*one.subjects, one.scene)
    assert all(a.words != b.words for a, b in batch.subjects), "a pair names two different subjects"


def test_pair_masks_boxes_and_union_are_consistent():
    batch = training_pairs(40, torch.Generator().manual_seed(8))
    half = IMAGE_SIZE // 2
    for i in range(len(batch)):
        s = batch[i]
        for k in range(2):
            mask = s.subject_masks[k]
            on = mask > 0.5
            ys, xs = torch.nonzero(on, as_tuple=True)
            assert s.boxes[k] == (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            cover = mask > 0
            x0, y0, x1, y1 = s.boxes[k]
            assert mask[:, :x0].max() <= 0.5 and mask[:, x1:].max() <= 0.5
            # fully inside the image, and inside its own half (left for the first-named subject)
            assert torch.cat([mask[0], mask[-1], mask[:, 0], mask[:, -1]]).max() == 0
            side = cover[:, half:] if k == 0 else cover[:, :half]
            assert not side.any(), f"subject {k} leaves its half"
            scale = s.poses[k].scale
            assert PAIR_SCALE_RANGE[0] <= scale <= PAIR_SCALE_RANGE[1]
            assert 0.6 * scale <= max(x1 - x0, y1 - y0) <= 2 * scale + 1
        overlap = float(torch.minimum(s.subject_masks[0], s.subject_masks[1]).sum())
        assert overlap == 0, "random pair poses never overlap"
        assert torch.allclose(s.subject_masks.sum(0), s.mask, atol=1e-6)
    # independent reference: the union is the single-subject coverages of the two poses
    single = render_batch([a for a, _ in batch.subjects] + [b for _, b in batch.subjects], ["snow"] * 80,
                          [0] * 80, [p[0] for p in batch.poses] + [p[1] for p in batch.poses])
    assert torch.allclose(batch.masks, single.masks[:40] + single.masks[40:], atol=1e-6)
    assert torch.equal(batch.subject_masks[:, 0], single.masks[:40])
    assert torch.equal(batch.subject_masks[:, 1], single.masks[40:])


def test_pair_pixels_are_the_single_subject_renders_of_each_pose():
    """Inside each subject the pair image is that subject's single render at the same pose and seed; far from both
    subjects (beyond the shadows) it is the same background."""
    a, b, scene, seed = STAR, Subject("heart", "green", "dotted", "white"), "grass", 31
    pair = render_pair(a, b, scene, seed)
    singles = render_batch([a, b], [scene, scene], [seed, seed], list(pair.poses))
    for k in range(2):
        inside = singles.masks[k] >= 1
        assert inside.sum() > 100
        assert torch.allclose(pair.image[inside], singles.images[k][inside], atol=1e-6)
    near = F.max_pool2d(pair.mask[None, None], 11, stride=1, padding=5)[0, 0] > 0
    assert (~near).sum() > 500
    assert torch.allclose(pair.image[~near], singles.images[0][~near], atol=1e-6)


def test_explicit_overlapping_poses_draw_the_second_subject_on_top():
    poses = (Pose(30, 32, 14, 0.0), Pose(36, 32, 14, 0.0))
    s = render_pair(Subject("square", "red"), Subject("circle", "blue"), "snow", 0, poses=poses)
    alone = render_batch([Subject("square", "red"), Subject("circle", "blue")], ["snow"] * 2, [0, 0], list(poses))
    assert torch.allclose(s.subject_masks[0], alone.masks[0] * (1 - alone.masks[1]), atol=1e-6)
    assert torch.equal(s.subject_masks[1], alone.masks[1])
    assert torch.allclose(s.mask, 1 - (1 - alone.masks[0]) * (1 - alone.masks[1]), atol=1e-6)
    centre = s.image[32, 33]
    assert centre[2] > 0.7 and centre[0] < 0.3, "the overlap shows the second (blue) subject"
    with pytest.raises(ValueError, match="equal lengths"):
        render_pairs([STAR], [CIRCLE, CIRCLE], ["snow"], [0])


# ------------------------------------------------------------------------------------------------ held-out subjects


def _pretraining_subjects() -> dict[str, tuple[list[Subject], list[str]]]:
    """Subjects and captions of many draws from every pre-training source of the world and the trainers."""
    from comfyui_personalize.miniworld.train_family import training_samples

    gen = torch.Generator().manual_seed(12345)
    sources: dict[str, tuple[list[Subject], list[str]]] = {}
    b = training_batch(300, gen)
    sources["training_batch"] = (b.subjects, b.captions)
    v = view_pairs(150, gen)
    sources["view_pairs"] = (v.reference.subjects + v.target.subjects, v.reference.captions + v.target.captions)
    p = training_pairs(150, gen)
    sources["training_pairs"] = ([s for pair in p.subjects for s in pair], p.captions)
    _, _, subjects, scenes = training_samples(300, gen)  # the diffusion stage's pool (train_family.py)
    sources["train_family.training_samples"] = (subjects, [caption(s, sc) for s, sc in zip(subjects, scenes)])
    return sources


def _world_source_subjects(host) -> dict[str, tuple[list, list[str]]]:
    """Subjects and captions of miniworld/sources.py's WorldSource (the pre-training engine's world data) in every
    mode, with and without hard-negative groups (it imports core/, so it is loaded through the booted host)."""
    from helpers import pack_module

    sources = pack_module(host, "miniworld.sources")
    out: dict[str, tuple[list, list[str]]] = {}
    for mode in sources.MODES:
        for groups in (0, 8):
            if groups and mode == "pairs":
                continue
            src = sources.WorldSource(mode, seed=11, hard_negatives=groups)
            batches = [src.batch(step, 0, 1, 80) for step in range(2)]
            subjects = [s for b in batches for row in b.extras["subjects"]
                        for s in (row if isinstance(row, tuple) else (row,))]
            captions = [c for b in batches for c in b.captions + b.extras.get("reference_captions", [])]
            out[f"WorldSource({mode!r}, hard_negatives={groups})"] = (subjects, captions)
    return out


def _assert_no_heldout_names(sources: dict[str, tuple[list, list[str]]]) -> None:
    held = heldout_subjects()
    held_names = {s.words for s in held}
    for name, (subjects, captions) in sources.items():
        assert len(subjects) >= 160, name
        assert not {s.words for s in subjects} & held_names, f"{name} draws a held-out subject"
        for text in captions:
            # a held-out name right after its article would be the held-out subject (base names such as "dotted
            # red circle" contain "red circle", but never "a red circle")
            leaked = [h.name for h in held if f" {W.article(h.name)} {h.name} " in f" {text} "]
            assert not leaked, f"{name}: {text!r} names {leaked}"
        # compositional: every attribute of the held-out subjects still occurs in pre-training
        for attr in ("shape", "colour", "pattern", "pattern_colour"):
            missing = {getattr(h, attr) for h in held} - {getattr(s, attr) for s in subjects}
            assert not missing, f"{name} never shows held-out {attr}s {missing}"


# ------------------------------------------------------------------------------------------------ the judge's crops


def test_the_two_subject_judge_reads_world_pair_renders_right():
    """scripts/eval_two_subjects.py's instrument: the evaluators on the edge-padded halves of correct two-subject
    images name each subject's shape and colour, and a mismatched pair (the next row's) scores near chance."""
    from comfyui_personalize.miniworld.evaluators import load_evaluator

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import eval_two_subjects as script
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    pairs = script.pick_pairs(48, 3, W)
    assert all(a.shape != b.shape and a.colour != b.colour and a in set(base_subjects()) for a, b, *_ in pairs)
    images = render_pairs([a for a, *_ in pairs], [b for _, b, *_ in pairs], [p[2] for p in pairs],
                          [p[3] for p in pairs]).images
    ev = load_evaluator()
    left, right = script.half_crops(ev, images)
    assert left.shape == right.shape == images.shape and left.min() >= 0 and left.max() <= 1
    # each view comes from its own half: the left view of an image whose right half is blanked is unchanged
    blanked = images.clone()
    blanked[:, :, 32:] = 0
    assert torch.equal(script.half_crops(ev, blanked)[0], left)
    right_pairs = script.score(ev, images, pairs)
    assert right_pairs["both shapes + colours"] >= 0.8 and right_pairs["scene"] >= 0.9
    wrong = script.score(ev, images, pairs[1:] + pairs[:1])
    assert wrong["both shapes"] <= 0.1


def test_heldout_subjects_stay_out_of_every_pretraining_source():
    _assert_no_heldout_names(_pretraining_subjects())


def test_heldout_subjects_stay_out_of_the_pretraining_engines_world_source(host):
    _assert_no_heldout_names(_world_source_subjects(host))

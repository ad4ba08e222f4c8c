"""Seeded procedural 64×64 images of simple subjects (shape, colour, pattern) in textured scenes.

Every image is a pure function of ``(subject, scene, seed)`` (plus an optional explicit pose): the seed feeds one
CPU ``torch.Generator`` per sample that draws the pose and all noise fields, so equal seeds give bit-identical
images whether a sample is rendered alone or inside a batch.

Rendering: the subject's inside-test is evaluated in a rotated, scaled local frame on a 4× supersampled grid and
average-pooled to 64×64 (anti-aliased coverage). Patterns live in the same local frame, so they move, scale and
rotate with the subject. A light gradient, per-pixel texture noise and a soft drop shadow keep it from looking flat.
Backgrounds are procedural textures rendered directly at 64×64.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

IMAGE_SIZE = 64
SUPERSAMPLE = 4
SCALE_RANGE = (12.0, 22.0)
"""Half-size of a subject in pixels: every shape fits in a disc of this radius (bounding size ≈ 22–42 px), so that
the shape spans at least 3 cells of an 8× downsampled latent."""
MAX_ROTATION = math.pi / 6
"""Random poses rotate by at most ±30° so that orientation-bearing shapes (heart, triangle, cross) stay upright."""
MIN_PATTERN_CONTRAST = 0.55
"""Smallest RGB distance between a subject's colour and its pattern colour."""

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "ring", "arrow", "moon")
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "orange": (1.0, 0.55, 0.0),
    "yellow": (1.0, 0.9, 0.1),
    "green": (0.12, 0.8, 0.2),
    "blue": (0.12, 0.28, 0.95),
    "purple": (0.55, 0.15, 0.78),
    "pink": (1.0, 0.5, 0.78),
    "white": (0.97, 0.97, 0.97),
    "black": (0.06, 0.06, 0.06),
    "cyan": (0.1, 0.88, 0.92),
}
COLOURS = tuple(COLOUR_RGB)
PATTERNS = ("plain", "striped", "dotted", "checkered")
SCENE_PHRASES: dict[str, str] = {
    "grass": "on the grass",
    "sand": "on the beach",
    "snow": "in the snow",
    "water": "on the water",
    "brick": "in front of a brick wall",
    "night": "under the night sky",
}
SCENES = tuple(SCENE_PHRASES)

_NUM_PARAMS = 8  # uniform per-sample scene parameters (phases, offsets)
_NOISE_SHAPES = {"fine": (IMAGE_SIZE, IMAGE_SIZE), "texture": (IMAGE_SIZE, IMAGE_SIZE), "coarse": (8, 8)}


# --------------------------------------------------------------------------------------------------- vocabulary


def article(word: str) -> str:
    """"a" or "an" before ``word``."""
    return "an" if word[0] in "aeiou" else "a"


def pattern_colours(colour: str) -> tuple[str, ...]:
    """Colours allowed as the second (pattern) colour of a ``colour`` subject: the ones that contrast with it."""
    return _PATTERN_COLOURS[colour]


_PATTERN_COLOURS = {
    colour: tuple(c for c in COLOURS if c != colour and math.dist(rgb, COLOUR_RGB[c]) >= MIN_PATTERN_CONTRAST)
    for colour, rgb in COLOUR_RGB.items()
}


@dataclass(frozen=True)
class Subject:
    """A subject: a shape in a colour, optionally patterned with a second colour.

    Identity (equality, hashing) is ``(shape, colour, pattern, pattern_colour)``; ``pattern_colour`` is ``None``
    for plain subjects. ``texture`` is the standard deviation of the per-pixel brightness noise on the subject.
    The name (and caption) does not mention the pattern colour: it is a detail only the images carry.
    """

    shape: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str | None = None
    texture: float = field(default=0.04, compare=False)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS or self.pattern not in PATTERNS:
            raise ValueError(f"unknown shape/colour/pattern in {self!r}")
        if (self.pattern == "plain") != (self.pattern_colour is None):
            raise ValueError(f"pattern_colour must be None exactly for plain subjects: {self!r}")
        if self.pattern_colour is not None and self.pattern_colour not in pattern_colours(self.colour):
            raise ValueError(f"pattern colour {self.pattern_colour!r} does not contrast with {self.colour!r}")

    @property
    def words(self) -> tuple[str, ...]:
        """Caption words, e.g. ``("striped", "blue", "star")``; plain subjects omit the pattern word."""
        prefix = () if self.pattern == "plain" else (self.pattern,)
        return (*prefix, self.colour, self.shape)

    @property
    def name(self) -> str:
        """E.g. ``"striped blue star"``."""
        return " ".join(self.words)

    @property
    def class_word(self) -> str:
        """The subject's class noun (its shape word), used in class prompts: ``"star"``."""
        return self.shape

    @property
    def identity(self) -> tuple[str, str, str, str | None]:
        return (self.shape, self.colour, self.pattern, self.pattern_colour)


def caption(subject: Subject, scene: str) -> str:
    """``"a photo of an orange heart on the beach"``."""
    return f"a photo of {article(subject.name)} {subject.name} {SCENE_PHRASES[scene]}"


def class_prompt(class_word: str, scene: str, token: str | None = None) -> str:
    """``"a photo of a star on the beach"``, or with a token ``"a photo of a <tok> star on the beach"``."""
    noun = class_word if token is None else f"{token} {class_word}"
    return f"a photo of {article(noun)} {noun} {SCENE_PHRASES[scene]}"


# --------------------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Pose:
    """Subject placement in pixel units: centre ``(x, y)`` (image spans [0, 64]), half-size, rotation (radians)."""

    x: float
    y: float
    scale: float
    rotation: float


@dataclass(frozen=True, eq=False)
class Sample:
    """One rendered image. ``image`` is float32 [64, 64, 3] in [0, 1] (ComfyUI IMAGE layout); ``mask`` float32
    [64, 64] is the subject's pixel coverage; ``box`` = (x0, y0, x1, y1), end-exclusive, bounds ``mask > 0.5``."""

    image: torch.Tensor
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    caption: str
    subject: Subject
    scene: str
    pose: Pose
    seed: int


@dataclass(frozen=True, eq=False)
class SampleBatch:
    """A batch of samples: ``images`` [B, 64, 64, 3], ``masks`` [B, 64, 64], ``boxes`` int64 [B, 4]."""

    images: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    captions: list[str]
    subjects: list[Subject]
    scenes: list[str]
    poses: list[Pose]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> Sample:
        return Sample(
            image=self.images[i], mask=self.masks[i], box=tuple(self.boxes[i].tolist()), caption=self.captions[i],
            subject=self.subjects[i], scene=self.scenes[i], pose=self.poses[i], seed=self.seeds[i],
        )


# --------------------------------------------------------------------------------------------------- shapes
# Inside-tests in the local frame (u right, v up, units of the subject's half-size); every shape fits in r <= 1.


def _circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u * u + v * v <= 0.9**2


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.68


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Equilateral, pointing up, circumradius 1."""
    c = math.cos(math.pi / 6)
    return (v >= -0.5) & (c * u.abs() + 0.5 * v <= 0.5)


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Five-pointed star (pentagram outline), pointing up, outer radius 1: inside at least 4 of its 5 lines."""
    count = torch.zeros(u.shape, dtype=torch.uint8)
    for k in range(5):
        angle = math.radians(162 + 72 * k)
        count += (math.cos(angle) * u + math.sin(angle) * v) <= math.cos(math.radians(72))
    return count >= 4


def _heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The classic implicit heart (x² + y² − 1)³ ≤ x² y³, scaled and shifted to fit the unit disc."""
    x, y = 1.28 * u, 1.28 * v + 0.12
    q = x * x + y * y - 1
    return q * q * q <= x * x * y * y * y


def _diamond(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u.abs() / 0.6 + v.abs() / 0.98 <= 1


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    a, b = u.abs(), v.abs()
    return (torch.minimum(a, b) <= 0.28) & (torch.maximum(a, b) <= 0.92)


def _ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r2 = u * u + v * v
    return (r2 <= 0.92**2) & (r2 >= 0.52**2)


def _arrow(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Arrow pointing up: a triangular head (apex at v = 0.95, base half-width 0.7 at v = 0.05) on a shaft of
    half-width 0.25 down to v = -0.95."""
    head = (v >= 0.05) & (u.abs() <= 0.7 * (0.95 - v) / 0.9)
    shaft = (v < 0.05) & (v >= -0.95) & (u.abs() <= 0.25)
    return head | shaft


def _moon(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Crescent: a disc minus an offset disc, opening to the upper right."""
    du, dv = u - 0.4, v - 0.28
    return (u * u + v * v <= 0.92**2) & (du * du + dv * dv >= 0.72**2)


_SHAPE_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "heart": _heart,
    "diamond": _diamond, "cross": _cross, "ring": _ring, "arrow": _arrow, "moon": _moon,
}


# --------------------------------------------------------------------------------------------------- patterns
# Pattern-colour tests in the same local frame.


def _striped(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stripes across u (vertical when unrotated), period 0.5, the pattern colour on 30 % of it (so the main colour
    stays the subject's dominant one)."""
    return torch.frac(u / 0.5 + 100.35) < 0.3


def _dotted(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dots of radius 0.12 on a 0.42 grid, one at the centre."""
    fu, fv = torch.frac(u / 0.42 + 100.5) - 0.5, torch.frac(v / 0.42 + 100.5) - 0.5
    return fu * fu + fv * fv <= (0.12 / 0.42) ** 2


def _checkered(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Checkerboard with 0.45 cells whose pattern-colour squares are inset to 70 % of the cell (≈ 25 % of the
    area, so the main colour stays dominant)."""
    fu, fv = torch.frac(u / 0.45 + 100.0), torch.frac(v / 0.45 + 100.0)
    odd = (torch.floor(u / 0.45) + torch.floor(v / 0.45)).remainder(2) == 1
    return odd & ((fu - 0.5).abs() <= 0.35) & ((fv - 0.5).abs() <= 0.35)


_PATTERN_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "striped": _striped, "dotted": _dotted, "checkered": _checkered,
}


# --------------------------------------------------------------------------------------------------- scenes
# Each scene maps noise fields of b samples (fine [b,64,64] and coarse [b,8,8] standard normals, params [b,8]
# uniforms) to backgrounds [b, 3, 64, 64].


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel row and column indices, each [64, 64] float."""
    idx = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    return idx[:, None].expand(IMAGE_SIZE, IMAGE_SIZE), idx[None, :].expand(IMAGE_SIZE, IMAGE_SIZE)


def _rgb(values: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


def _smooth(coarse: torch.Tensor) -> torch.Tensor:
    """Coarse noise [b, 8, 8] bilinearly upsampled to a soft field [b, 1, 64, 64]."""
    return F.interpolate(coarse[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


def _grass(fine: torch.Tensor, coarse: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Green with vertical blade streaks (fine noise smeared vertically), lighter towards the bottom."""
    blades = 3.0 * F.avg_pool2d(fine[:, None], (9, 1), stride=1, padding=(4, 0), count_include_pad=False)
    rows, _ = _grid()
    light = 0.85 + 0.3 * rows / IMAGE_SIZE + 0.08 * _smooth(coarse)
    return _rgb((0.24, 0.48, 0.15)) * (light + 0.22 * blades)


def _sand(fine: torch.Tensor, coarse: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Beige with fine grey speckle and faint diagonal ripples."""
    rows, cols = _grid()
    phase = 2 * math.pi * params[:, 0].view(-1, 1, 1, 1)
    ripples = torch.sin(0.55 * rows + 0.25 * cols + phase)
    return _rgb((0.88, 0.79, 0.57)) * (1 + 0.03 * ripples + 0.04 * _smooth(coarse)) + 0.07 * fine[:, None]


def _snow(fine: torch.Tensor, coarse: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """White to light blue with soft low-frequency shading."""
    soft = _smooth(coarse)
    return _rgb((0.9, 0.93, 0.98)) + _rgb((0.035, 0.03, 0.015)) * soft + 0.012 * fine[:, None]


def _water(fine: torch.Tensor, coarse: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Blue with bright horizontal wave crests that wobble slightly along x."""
    rows, cols = _grid()
    p0 = 2 * math.pi * params[:, 0].view(-1, 1, 1, 1)
    p1 = 2 * math.pi * params[:, 1].view(-1, 1, 1, 1)
    waves = torch.sin(0.9 * rows + p0 + 0.8 * torch.sin(0.19 * cols + p1))
    crests = waves.clamp(min=0) ** 4
    depth = 1.15 - 0.3 * rows / IMAGE_SIZE + 0.06 * _smooth(coarse)
    return _rgb((0.1, 0.32, 0.68)) * depth + _rgb((0.3, 0.35, 0.3)) * crests + 0.015 * fine[:, None]


def _brick(fine: torch.Tensor, coarse: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Red-brown bricks (16×8 px, alternate rows offset by half) with light mortar lines and per-brick tint."""
    rows, cols = _grid()
    y = rows + 8 * params[:, 0].view(-1, 1, 1)
    row = torch.floor(y / 8)
    x = cols + 16 * params[:, 1].view(-1, 1, 1) + 8 * row.remainder(2)
    col = torch.floor(x / 16)
    mortar = ((y.remainder(8) < 1.5) | (x.remainder(16) < 1.5))[:, None]
    brick_id = (row.remainder(8) * 8 + col.remainder(8)).long().flatten(1)
    tint = coarse.flatten(1).gather(1, brick_id).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    bricks = _rgb((0.62, 0.26, 0.17)) * (1 + 0.1 * tint)
    noise = 0.035 * fine[:, None]
    return torch.where(mortar, _rgb((0.78, 0.75, 0.7)), bricks) + noise


def _night(fine: torch.Tensor, coarse: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Dark blue, lighter towards the horizon, with small bright stars."""
    rows, _ = _grid()
    t = rows / IMAGE_SIZE
    sky = _rgb((0.01, 0.02, 0.1)) * (1 - t) + _rgb((0.05, 0.07, 0.26)) * t
    stars = (fine[:, None] - 2.5).clamp(min=0, max=0.5) * 2
    return sky + _rgb((0.95, 0.95, 0.85)) * stars


_SCENE_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grass": _grass, "sand": _sand, "snow": _snow, "water": _water, "brick": _brick, "night": _night,
}


# --------------------------------------------------------------------------------------------------- rendering


def _pose_from_uniforms(r: torch.Tensor) -> Pose:
    """Random pose from 4 uniforms: the subject's enclosing disc lies at least 1 px inside the image."""
    lo_s, hi_s = SCALE_RANGE
    scale = lo_s + (hi_s - lo_s) * float(r[0])
    lo, hi = scale + 1, IMAGE_SIZE - scale - 1
    return Pose(
        x=lo + (hi - lo) * float(r[1]), y=lo + (hi - lo) * float(r[2]), scale=scale,
        rotation=MAX_ROTATION * (2 * float(r[3]) - 1),
    )


def _draw(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """All random numbers of one sample: pose uniforms [4], scene params [8], named noise fields."""
    return _draw_with_generator(seed)[:3]


def _draw_with_generator(
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Generator]:
    """:func:`_draw`, plus its generator in the state after the draw (two-subject scenes draw the second pose from
    it, so a pair image shares its background with the single-subject image of the same seed and scene)."""
    gen = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(4 + _NUM_PARAMS, generator=gen)
    sizes = [math.prod(s) for s in _NOISE_SHAPES.values()]
    flat = torch.randn(sum(sizes), generator=gen).split(sizes)
    noise = {name: t.view(shape) for (name, shape), t in zip(_NOISE_SHAPES.items(), flat)}
    return uniforms[:4], uniforms[4:], noise, gen


def _stack_draws(
    draws: Sequence[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scene params [B, 8] and noise fields (each [B, ...]) of per-sample draws."""
    params = torch.stack([d[1] for d in draws])
    noise = {name: torch.stack([d[2][name] for d in draws]) for name in _NOISE_SHAPES}
    return params, noise


def _apply_grouped(fns: dict[str, Callable], keys: Sequence[str], out: torch.Tensor, *args: torch.Tensor) -> None:
    """``out[i] = fns[keys[i]](*(a[i] for a in args))``, vectorised over the samples sharing a key; samples whose
    key has no function (the plain pattern) keep their ``out`` values."""
    for key in dict.fromkeys(keys):
        if key not in fns:
            continue
        idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
        out[idx] = fns[key](*(a[idx] for a in args)).to(out.dtype)


def _local_frame(poses: Sequence[Pose], size: int, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local coordinates (u right, v up, in half-sizes) of the sample points ``(i + 0.5) * step``: [B, size, size]."""
    t = (torch.arange(size, dtype=torch.float32) + 0.5) * step
    cx, cy, s, rot = torch.tensor([[p.x, p.y, p.scale, p.rotation] for p in poses], dtype=torch.float32).unbind(1)
    cos, sin = (torch.cos(rot) / s).view(-1, 1, 1), (torch.sin(rot) / s).view(-1, 1, 1)
    dx, dy = (t[None] - cx[:, None])[:, None, :], (t[None] - cy[:, None])[:, :, None]
    return cos * dx + sin * dy, sin * dx - cos * dy


def _coverage(subjects: Sequence[Subject], poses: Sequence[Pose]) -> tuple[torch.Tensor, torch.Tensor]:
    """Supersampled subject coverage and pattern-colour coverage, each [B, 64, 64] in [0, 1]."""
    u, v = _local_frame(poses, IMAGE_SIZE * SUPERSAMPLE, 1 / SUPERSAMPLE)
    inside = torch.zeros(u.shape, dtype=torch.bool)
    _apply_grouped(_SHAPE_FNS, [s.shape for s in subjects], inside, u, v)
    marked = torch.zeros(u.shape, dtype=torch.bool)
    _apply_grouped(_PATTERN_FNS, [s.pattern for s in subjects], marked, u, v)
    both = torch.stack([inside, marked & inside], dim=1).float()
    pooled = F.avg_pool2d(both, SUPERSAMPLE)
    return pooled[:, 0], pooled[:, 1]


def _drop_shadow(cover: torch.Tensor) -> torch.Tensor:
    """Soft shadow [B, 1, 64, 64]: the coverage shifted 2 px down-right and blurred."""
    shifted = F.pad(cover[:, None], (2, 0, 2, 0))[:, :, :IMAGE_SIZE, :IMAGE_SIZE]
    return F.avg_pool2d(shifted, 5, stride=1, padding=2, count_include_pad=False)


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """End-exclusive (x0, y0, x1, y1) of ``mask > 0.5`` for each mask [B, 64, 64]; int64 [B, 4]."""
    on = masks > 0.5
    idx = torch.arange(IMAGE_SIZE)
    cols, rows = on.any(dim=1), on.any(dim=2)
    big = IMAGE_SIZE + 1
    x0 = torch.where(cols, idx, big).min(dim=1).values
    y0 = torch.where(rows, idx, big).min(dim=1).values
    x1 = torch.where(cols, idx, -1).max(dim=1).values + 1
    y1 = torch.where(rows, idx, -1).max(dim=1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=1)


def _colour_table(names: Sequence[str]) -> torch.Tensor:
    """RGB rows [B, 3, 1, 1] of colour ``names``."""
    return torch.tensor([COLOUR_RGB[n] for n in names], dtype=torch.float32).view(-1, 3, 1, 1)


def _shade(poses: Sequence[Pose]) -> torch.Tensor:
    """Additive light gradient over each subject, brighter at its top-left: [B, 1, 64, 64], about ±0.12."""
    u, v = _local_frame([Pose(p.x, p.y, p.scale, 0.0) for p in poses], IMAGE_SIZE, 1.0)
    return (0.085 * (v - u)).clamp(-0.12, 0.12)[:, None]


def _background(scenes: Sequence[str], noise: dict[str, torch.Tensor], params: torch.Tensor) -> torch.Tensor:
    """The scenes' backgrounds [B, 3, 64, 64] from the stacked draws (before any shadow)."""
    background = torch.empty(len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE)
    _apply_grouped(_SCENE_FNS, scenes, background, noise["fine"], noise["coarse"], params)
    return background


def _subject_colour(subjects: Sequence[Subject], poses: Sequence[Pose], cover: torch.Tensor, marked: torch.Tensor,
                    texture_noise: torch.Tensor) -> torch.Tensor:
    """Each subject's unclamped colour over the whole image [B, 3, 64, 64]: main and pattern colour mixed by the
    pattern's share of the pixel's coverage, plus the light gradient and the texture noise (``texture_noise``
    [B, 64, 64])."""
    base = _colour_table([s.colour for s in subjects])
    second = _colour_table([s.pattern_colour or s.colour for s in subjects])
    texture = torch.tensor([s.texture for s in subjects]).view(-1, 1, 1, 1)
    frac = (marked / cover.clamp(min=1e-6))[:, None]
    return base * (1 - frac) + second * frac + _shade(poses) + texture * texture_noise[:, None]


def render_batch(
    subjects: Sequence[Subject], scenes: Sequence[str], seeds: Sequence[int], poses: Sequence[Pose] | None = None,
) -> SampleBatch:
    """Render ``len(seeds)`` samples at once. Sample ``i`` depends only on (subjects[i], scenes[i], seeds[i],
    poses[i]); without ``poses`` each pose is drawn from its seed (see :func:`sample`)."""
    if not len(subjects) == len(scenes) == len(seeds) or (poses is not None and len(poses) != len(seeds)):
        raise ValueError("subjects, scenes, seeds (and poses) must have equal lengths")
    if any(sc not in SCENE_PHRASES for sc in scenes):
        raise ValueError(f"unknown scene in {list(scenes)}; known: {SCENES}")
    draws = [_draw(int(s)) for s in seeds]
    if poses is None:
        poses = [_pose_from_uniforms(d[0]) for d in draws]
    params, noise = _stack_draws(draws)

    cover, marked = _coverage(subjects, poses)
    background = _background(scenes, noise, params) * (1 - 0.4 * _drop_shadow(cover))
    colour = _subject_colour(subjects, poses, cover, marked, noise["texture"])
    alpha = cover[:, None]
    images = (background * (1 - alpha) + colour * alpha).clamp(0, 1)
    return SampleBatch(
        images=images.permute(0, 2, 3, 1).contiguous(), masks=cover, boxes=_boxes(cover),
        captions=[caption(s, sc) for s, sc in zip(subjects, scenes)], subjects=list(subjects), scenes=list(scenes),
        poses=list(poses), seeds=[int(s) for s in seeds],
    )


def render(subject: Subject, scene: str, *, seed: int, x: float, y: float, scale: float, rotation: float) -> Sample:
    """Render one sample with an explicit pose (centre in pixels, half-size in pixels, rotation in radians)."""
    return render_batch([subject], [scene], [seed], [Pose(x, y, scale, rotation)])[0]


def sample(subject: Subject, scene: str, seed: int) -> Sample:
    """Render one sample with a random pose drawn from ``seed``: fully inside the image, half-size in
    :data:`SCALE_RANGE`, rotation within ±:data:`MAX_ROTATION`."""
    return render_batch([subject], [scene], [seed])[0]


# --------------------------------------------------------------------------------------------------- splits

HELDOUT_COUNT = 24
REFERENCE_VIEWS = 4


@functools.cache
def all_subjects() -> tuple[Subject, ...]:
    """Every subject: shape × colour × (plain, or a patterned one with each contrasting pattern colour)."""
    return tuple(
        Subject(shape, colour, pattern, second)
        for shape in SHAPES
        for colour in COLOURS
        for pattern in PATTERNS
        for second in ((None,) if pattern == "plain" else pattern_colours(colour))
    )


@functools.cache
def heldout_subjects() -> tuple[Subject, ...]:
    """The 24 personalisation subjects, by a fixed formula: subject ``i`` has shape ``i mod 10``, colour
    ``(3i + i // 10) mod 10`` and pattern ``i mod 4``, so every shape, colour and pattern occurs 2–6 times and the
    (shape, colour, pattern) triples are distinct; a patterned one takes its ``7i``-th allowed pattern colour."""
    subjects = []
    for i in range(HELDOUT_COUNT):
        colour = COLOURS[(3 * i + i // len(SHAPES)) % len(COLOURS)]
        pattern = PATTERNS[i % len(PATTERNS)]
        allowed = pattern_colours(colour)
        second = None if pattern == "plain" else allowed[(7 * i) % len(allowed)]
        subjects.append(Subject(SHAPES[i % len(SHAPES)], colour, pattern, second))
    return tuple(subjects)


@functools.cache
def base_subjects() -> tuple[Subject, ...]:
    """Base-training subjects: all subjects whose caption name (shape, colour, pattern) is not a held-out one.

    Held-out names never occur in base training (in any pattern colour), while each held-out shape, colour,
    pattern and pattern colour does, in other combinations.
    """
    held = {s.words for s in heldout_subjects()}
    return tuple(s for s in all_subjects() if s.words not in held)


@functools.cache
def _base_by_name() -> tuple[tuple[Subject, ...], ...]:
    """Base subjects grouped by caption name, in :func:`base_subjects` order."""
    by_name: dict[tuple[str, ...], list[Subject]] = {}
    for s in base_subjects():
        by_name.setdefault(s.words, []).append(s)
    return tuple(tuple(group) for group in by_name.values())


def training_batch(batch_size: int, generator: torch.Generator) -> SampleBatch:
    """Random base-training samples: caption name (shape, colour, pattern) uniform over the base names, then its
    pattern colour, the scene and the render seed uniform; all drawn from ``generator`` (a CPU generator)."""
    subjects = _base_draw(batch_size, generator)
    scenes = torch.randint(len(SCENES), (batch_size,), generator=generator).tolist()
    seeds = torch.randint(2**62, (batch_size,), generator=generator).tolist()
    return render_batch(subjects, [SCENES[k] for k in scenes], seeds)


@dataclass(frozen=True, eq=False)
class HeldoutSubject:
    """A held-out subject's personalisation set: reference views (in distinct random scenes) and prompts placing
    its class word in every scene. ``templates`` hold a ``{token}`` slot before the class word."""

    subject: Subject
    references: tuple[Sample, ...]
    scenes: tuple[str, ...]
    prompts: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def class_word(self) -> str:
        return self.subject.class_word

    def prompts_with(self, token: str) -> tuple[str, ...]:
        """The prompts with ``token`` before the class word: ``"a photo of a <tok> star on the beach"``."""
        return tuple(t.format(token=token) for t in self.templates)


def heldout_set(seed: int = 0, views: int = REFERENCE_VIEWS) -> tuple[HeldoutSubject, ...]:
    """For each held-out subject: ``views`` reference samples in distinct scenes (random poses) and one class
    prompt per scene. Deterministic in ``seed``."""
    if not 1 <= views <= len(SCENES):
        raise ValueError(f"views must be in [1, {len(SCENES)}]")
    gen = torch.Generator().manual_seed(seed)
    subjects = heldout_subjects()
    ref_scenes = [[SCENES[k] for k in torch.randperm(len(SCENES), generator=gen)[:views].tolist()] for _ in subjects]
    seeds = torch.randint(2**62, (len(subjects) * views,), generator=gen).tolist()
    batch = render_batch([s for s in subjects for _ in range(views)], [sc for row in ref_scenes for sc in row], seeds)
    return tuple(
        HeldoutSubject(
            subject=s,
            references=tuple(batch[i * views + j] for j in range(views)),
            scenes=SCENES,
            prompts=tuple(class_prompt(s.class_word, sc) for sc in SCENES),
            templates=tuple(class_prompt(s.class_word, sc, token="{token}") for sc in SCENES),
        )
        for i, s in enumerate(subjects)
    )


# --------------------------------------------------------------------------------------------------- halves

#: held-out subjects (indices into :func:`heldout_subjects`) that sweeps before the split was made were run on (the
#: first six of every 7th entry: `make eval`'s old default, HiFi's ``w_s`` and Textual Inversion's settings were
#: chosen on them). They belong to the tuning half for good.
PRE_SPLIT_TUNED = (0, 7, 14, 21, 4, 11)
HALVES_SEED = 26
#: The tuning half: every sweep, default and ablation choice is made on these subjects.
TUNING_HALF = (0, 4, 6, 7, 9, 11, 12, 14, 15, 18, 21, 23)
#: The reporting half: published tables come only from these subjects (scripts refuse to sweep on them).
REPORTING_HALF = (1, 2, 3, 5, 8, 10, 13, 16, 17, 19, 20, 22)
HALVES = {"tuning": TUNING_HALF, "reporting": REPORTING_HALF}


def split_heldout(seed: int = HALVES_SEED) -> dict[str, tuple[int, ...]]:
    """The rule that made :data:`TUNING_HALF` and :data:`REPORTING_HALF` (kept as literals so they never move; a
    test re-derives them): the :data:`PRE_SPLIT_TUNED` subjects go to the tuning half; the others are dealt shape by
    shape (in :data:`SHAPES` order, each shape's subjects in a ``torch.Generator(seed)`` shuffle), each to the half
    holding fewer subjects of its shape, ties to the half with more free places, then to the tuning half; a half
    takes at most 12. Result: disjoint halves of 12 covering the held-out list, every shape in the reporting half
    but the heart (both hearts were in the earlier sweeps)."""
    subjects = heldout_subjects()
    size = len(subjects) // 2
    halves: dict[str, list[int]] = {"tuning": list(PRE_SPLIT_TUNED), "reporting": []}
    gen = torch.Generator().manual_seed(seed)
    for shape in SHAPES:
        rest = [i for i, s in enumerate(subjects) if s.shape == shape and i not in PRE_SPLIT_TUNED]
        for i in [rest[k] for k in torch.randperm(len(rest), generator=gen).tolist()]:
            def rank(h: str, shape=shape) -> tuple:
                return (sum(subjects[j].shape == shape for j in halves[h]), len(halves[h]), h != "tuning")
            halves[min((h for h in halves if len(halves[h]) < size), key=rank)].append(i)
    return {h: tuple(sorted(v)) for h, v in halves.items()}


def heldout_half(half: str, seed: int = 0, views: int = REFERENCE_VIEWS) -> tuple[HeldoutSubject, ...]:
    """The held-out subjects (:func:`heldout_set` with reference-view draw ``seed``) of one half, ``"tuning"`` or
    ``"reporting"``, in the half's order."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {', '.join(HALVES)}, not {half!r}")
    heldouts = heldout_set(seed=seed, views=views)
    return tuple(heldouts[i] for i in HALVES[half])


# --------------------------------------------------------------------------------------------------- identity sets
# Several views of one subject (random pose, scale and scene), for encoders that learn a subject from one view and
# are scored on the others (PromptNet, hypernetworks, Subject-Diffusion pre-training).


def _scene_cycle(views: int, gen: torch.Generator) -> list[str]:
    """``views`` scenes: concatenated random permutations of :data:`SCENES`, so up to 6 views have distinct
    scenes and consecutive views never share one inside a permutation."""
    out: list[str] = []
    while len(out) < views:
        out += [SCENES[k] for k in torch.randperm(len(SCENES), generator=gen).tolist()]
    return out[:views]


def identity_set(subject: Subject, views: int, seed: int, scenes: str | Sequence[str] | None = None) -> SampleBatch:
    """``views`` renders of ONE subject, each with its own render seed (so its own random pose, scale and noise),
    drawn from ``torch.Generator().manual_seed(seed)``: deterministic in ``seed``.

    ``scenes``: ``None`` draws them (distinct for up to 6 views, see :func:`_scene_cycle`), a scene name puts every
    view there, a sequence gives one scene per view. Any subject is accepted (held-out ones too: an identity set of
    a held-out subject is evaluation data); pre-training must draw from :func:`view_pairs`, which only uses
    :func:`base_subjects`.
    """
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    gen = torch.Generator().manual_seed(int(seed))
    if scenes is None:
        scene_list = _scene_cycle(views, gen)
    elif isinstance(scenes, str):
        scene_list = [scenes] * views
    else:
        scene_list = list(scenes)
        if len(scene_list) != views:
            raise ValueError(f"scenes has {len(scene_list)} entries for {views} views; give one per view")
    seeds = torch.randint(2**62, (views,), generator=gen).tolist()
    return render_batch([subject] * views, scene_list, seeds)


class ViewPairs(NamedTuple):
    """Row ``i`` of ``reference`` and of ``target`` show the same subject (equal :class:`Subject`, so the same
    pattern colour too) with different render seeds, hence different poses and noise."""

    reference: SampleBatch
    target: SampleBatch


def _base_draw(batch_size: int, generator: torch.Generator) -> list[Subject]:
    """Base subjects as :func:`training_batch` draws them: the caption name uniform over the base names, then the
    pattern colour uniform."""
    names = _base_by_name()
    picks = torch.randint(len(names), (batch_size,), generator=generator).tolist()
    variants = torch.rand(batch_size, generator=generator).tolist()
    return [names[p][int(r * len(names[p]))] for p, r in zip(picks, variants)]


def _distinct_seeds(batch_size: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Two render seeds per row, drawn from ``generator``; the second is moved off the first on a (vanishingly
    rare) collision."""
    first = torch.randint(2**62, (batch_size,), generator=generator).tolist()
    second = torch.randint(2**62, (batch_size,), generator=generator).tolist()
    return first, [t if t != r else (t + 1) % 2**62 for r, t in zip(first, second)]


def view_pairs(batch_size: int, generator: torch.Generator, same_scene: bool = False) -> ViewPairs:
    """Pre-training pairs for subject encoders: for each row a base subject (drawn like :func:`training_batch`), a
    reference view and a target view of it with different render seeds (so different poses) and, unless
    ``same_scene``, a different scene. Captions, masks and boxes are each view's own. Only
    :func:`base_subjects` are drawn; everything comes from ``generator`` (a CPU generator)."""
    subjects = _base_draw(batch_size, generator)
    ref_scenes = torch.randint(len(SCENES), (batch_size,), generator=generator)
    if same_scene:
        tgt_scenes = ref_scenes
    else:
        tgt_scenes = (ref_scenes + torch.randint(1, len(SCENES), (batch_size,), generator=generator)) % len(SCENES)
    ref_seeds, tgt_seeds = _distinct_seeds(batch_size, generator)
    return ViewPairs(
        reference=render_batch(subjects, [SCENES[k] for k in ref_scenes.tolist()], ref_seeds),
        target=render_batch(subjects, [SCENES[k] for k in tgt_scenes.tolist()], tgt_seeds),
    )


# --------------------------------------------------------------------------------------------------- two subjects
# Two subjects in one image: the first on the left half, the second on the right half, each fully inside its half
# (so they never overlap), smaller than single subjects so that two fit in 64×64. The caption names them left to
# right. The background, the texture noise and the first pose's uniforms are the seed's single-subject draw
# (:func:`_draw`); the second pose's uniforms follow from the same generator.

PAIR_SCALE_RANGE = (11.0, 14.5)
"""Half-size of each subject of a two-subject scene in pixels (bounding size ≈ 22–29 px, ≥ 2.75 latent cells): the
enclosing disc fits a 32-px half of the image with a 1 px margin up to a half-size of 15."""


def pair_caption(subject_a: Subject, subject_b: Subject, scene: str) -> str:
    """``"a photo of a striped blue star and a red circle on the beach"`` (the single-subject wording of
    :func:`caption`, the first subject named first)."""
    return (f"a photo of {article(subject_a.name)} {subject_a.name} and {article(subject_b.name)} {subject_b.name} "
            f"{SCENE_PHRASES[scene]}")


@dataclass(frozen=True, eq=False)
class PairSample:
    """One two-subject image: ``image`` [64, 64, 3]; ``mask`` [64, 64] the coverage of both subjects (the
    compositing alpha); ``subject_masks`` [2, 64, 64] each subject's visible coverage (first subject, second
    subject); ``boxes`` their end-exclusive (x0, y0, x1, y1) of ``subject_masks > 0.5``."""

    image: torch.Tensor
    mask: torch.Tensor
    subject_masks: torch.Tensor
    boxes: tuple[tuple[int, int, int, int], tuple[int, int, int, int]]
    caption: str
    subjects: tuple[Subject, Subject]
    scene: str
    poses: tuple[Pose, Pose]
    seed: int


@dataclass(frozen=True, eq=False)
class PairBatch:
    """A batch of two-subject images: ``images`` [B, 64, 64, 3], ``masks`` [B, 64, 64] (union of both subjects, as
    :class:`SampleBatch` ``masks`` covers its one subject), ``subject_masks`` [B, 2, 64, 64] (per subject, visible
    coverage), ``boxes`` int64 [B, 2, 4] (per subject, of ``subject_masks > 0.5``)."""

    images: torch.Tensor
    masks: torch.Tensor
    subject_masks: torch.Tensor
    boxes: torch.Tensor
    captions: list[str]
    subjects: list[tuple[Subject, Subject]]
    scenes: list[str]
    poses: list[tuple[Pose, Pose]]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> PairSample:
        boxes = self.boxes[i].tolist()
        return PairSample(
            image=self.images[i], mask=self.masks[i], subject_masks=self.subject_masks[i],
            boxes=(tuple(boxes[0]), tuple(boxes[1])), caption=self.captions[i], subjects=self.subjects[i],
            scene=self.scenes[i], poses=self.poses[i], seed=self.seeds[i],
        )


def _pair_pose_from_uniforms(r: torch.Tensor, side: int) -> Pose:
    """Random pose from 4 uniforms inside the left (``side`` 0) or right (1) half of the image: half-size in
    :data:`PAIR_SCALE_RANGE`, the enclosing disc at least 1 px inside the half."""
    lo_s, hi_s = PAIR_SCALE_RANGE
    scale = lo_s + (hi_s - lo_s) * float(r[0])
    half = IMAGE_SIZE / 2
    lo_x, hi_x = side * half + scale + 1, (side + 1) * half - scale - 1
    lo_y, hi_y = scale + 1, IMAGE_SIZE - scale - 1
    return Pose(
        x=lo_x + (hi_x - lo_x) * float(r[1]), y=lo_y + (hi_y - lo_y) * float(r[2]), scale=scale,
        rotation=MAX_ROTATION * (2 * float(r[3]) - 1),
    )


def render_pairs(
    subjects_a: Sequence[Subject], subjects_b: Sequence[Subject], scenes: Sequence[str], seeds: Sequence[int],
    poses: Sequence[tuple[Pose, Pose]] | None = None,
) -> PairBatch:
    """Render ``len(seeds)`` two-subject images: ``subjects_a[i]`` on the left, ``subjects_b[i]`` on the right.
    Image ``i`` depends only on its own arguments. Explicit ``poses`` may place the subjects anywhere (the second
    is drawn over the first where they overlap; the first one's subject mask is then its visible part)."""
    n = len(seeds)
    if not len(subjects_a) == len(subjects_b) == len(scenes) == n or (poses is not None and len(poses) != n):
        raise ValueError("subjects_a, subjects_b, scenes, seeds (and poses) must have equal lengths")
    if any(sc not in SCENE_PHRASES for sc in scenes):
        raise ValueError(f"unknown scene in {list(scenes)}; known: {SCENES}")
    draws = [_draw_with_generator(int(s)) for s in seeds]
    if poses is None:
        poses = [(_pair_pose_from_uniforms(d[0], 0), _pair_pose_from_uniforms(torch.rand(4, generator=d[3]), 1))
                 for d in draws]
    poses = [tuple(p) for p in poses]
    params, noise = _stack_draws(draws)

    subjects, flat_poses = [*subjects_a, *subjects_b], [p[0] for p in poses] + [p[1] for p in poses]
    cover, marked = _coverage(subjects, flat_poses)
    texture_noise = torch.cat([noise["texture"], noise["texture"]])
    colour = _subject_colour(subjects, flat_poses, cover, marked, texture_noise)
    alpha_a, alpha_b = cover[:n, None], cover[n:, None]
    union = 1 - (1 - alpha_a) * (1 - alpha_b)
    background = _background(scenes, noise, params) * (1 - 0.4 * _drop_shadow(union[:, 0]))
    images = background * (1 - alpha_a) + colour[:n] * alpha_a
    images = (images * (1 - alpha_b) + colour[n:] * alpha_b).clamp(0, 1)
    subject_masks = torch.cat([alpha_a * (1 - alpha_b), alpha_b], dim=1)
    boxes = _boxes(subject_masks.flatten(0, 1)).view(n, 2, 4)
    return PairBatch(
        images=images.permute(0, 2, 3, 1).contiguous(), masks=union[:, 0], subject_masks=subject_masks, boxes=boxes,
        captions=[pair_caption(a, b, sc) for a, b, sc in zip(subjects_a, subjects_b, scenes)],
        subjects=list(zip(subjects_a, subjects_b)), scenes=list(scenes), poses=list(poses),
        seeds=[int(s) for s in seeds],
    )


def render_pair(subject_a: Subject, subject_b: Subject, scene: str, seed: int,
                poses: tuple[Pose, Pose] | None = None) -> PairSample:
    """One two-subject image (:func:`render_pairs`): ``subject_a`` left, ``subject_b`` right, random poses from
    ``seed`` unless ``poses`` are given."""
    return render_pairs([subject_a], [subject_b], [scene], [seed], None if poses is None else [poses])[0]


def training_pairs(batch_size: int, generator: torch.Generator) -> PairBatch:
    """Random two-subject pre-training images over :func:`base_subjects`: each subject drawn like
    :func:`training_batch` (caption name uniform, then pattern colour), the second one's caption name different
    from the first's; scene and render seed uniform; all from ``generator`` (a CPU generator)."""
    names = _base_by_name()
    first = torch.randint(len(names), (batch_size,), generator=generator)
    second = (first + torch.randint(1, len(names), (batch_size,), generator=generator)) % len(names)
    variants = torch.rand(batch_size, 2, generator=generator).tolist()
    scenes = torch.randint(len(SCENES), (batch_size,), generator=generator).tolist()
    seeds = torch.randint(2**62, (batch_size,), generator=generator).tolist()
    subjects_a = [names[k][int(r[0] * len(names[k]))] for k, r in zip(first.tolist(), variants)]
    subjects_b = [names[k][int(r[1] * len(names[k]))] for k, r in zip(second.tolist(), variants)]
    return render_pairs(subjects_a, subjects_b, [SCENES[k] for k in scenes], seeds)

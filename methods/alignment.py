"""Mask alignment with a similarity transform, for HiFi Tuner's reference-guided generation (Wang et al. 2023,
arXiv 2312.00079, §3.3, Eq. 9, Algorithm 2 step 2).

``T_θ = Translate(θ3, θ4)·Rotate(θ2)·Scale(θ1)`` maps the reference mask ``M_r`` onto the generated subject's mask
``M_g``; Eq. 9 is ``min_θ ‖T_θ(M_r) − M_g‖₁``. We minimise Eq. 9 itself, with the warp done by kornia's
differentiable ``warp_affine`` (bilinear), by Adam on ``(log s, angle, tx, ty)``. The appendix's one-directional
Chamfer variant (foreground points of ``T_θ(M_r)`` to their nearest point of ``M_g``) is not used: a transform that
shrinks ``M_r`` to a point inside ``M_g`` drives it to zero.

Eq. 9 is not convex in θ, so the optimisation starts from the moment match - centroids aligned, scale
``√(area_g/area_r)`` - at the rotations that align the masks' principal axes (θ and θ+π) and at 0, and keeps the
best. All of it runs on a working copy at most ``work_size`` pixels on a side; the transform is then expressed in
full-resolution pixels (translation scales with the resolution, scale and angle do not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Similarity:
    """``p ↦ s·R(angle)·(p − centre) + centre + shift`` in pixel coordinates (x right, y down) of the source;
    the result is in pixel coordinates of the target."""
    scale: float
    angle: float          # radians
    shift: tuple          # (tx, ty)
    centre: tuple         # (cx, cy), the source mask's centroid
    iou: float = float("nan")  # of the warped source mask with the target mask (full resolution, threshold 0.5)

    def matrix(self, dtype=torch.float32) -> torch.Tensor:
        """The 2×3 forward matrix kornia's ``warp_affine`` takes (source pixel → target pixel)."""
        return _matrix(torch.tensor(math.log(self.scale)), torch.tensor(self.angle), torch.tensor(self.shift),
                       torch.tensor(self.centre)).to(dtype)


def _matrix(log_scale, angle, shift, centre) -> torch.Tensor:
    s = torch.exp(log_scale)
    c, si = torch.cos(angle) * s, torch.sin(angle) * s
    rot = torch.stack([torch.stack([c, -si]), torch.stack([si, c])])
    t = centre + shift - rot @ centre
    return torch.cat([rot, t[:, None]], dim=1)


def _moments(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Area, centroid (x, y) and principal-axis angle of a soft mask ``[H, W]``."""
    h, w = mask.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=mask.dtype), torch.arange(w, dtype=mask.dtype), indexing="ij")
    area = mask.sum()
    cx, cy = (mask * xs).sum() / area, (mask * ys).sum() / area
    dx, dy = xs - cx, ys - cy
    mxx, myy, mxy = (mask * dx * dx).sum() / area, (mask * dy * dy).sum() / area, (mask * dx * dy).sum() / area
    return area, torch.stack([cx, cy]), 0.5 * math.atan2(float(2 * mxy), float(mxx - myy))


def warp(image: torch.Tensor, sim: Similarity, size: tuple[int, int]) -> torch.Tensor:
    """Warp ``image [B, C, H, W]`` by ``sim`` into a ``size = (H', W')`` canvas (zeros outside), bilinear."""
    from kornia.geometry.transform import warp_affine
    m = sim.matrix(image.dtype).to(image.device)[None].expand(image.shape[0], 2, 3)
    return warp_affine(image, m, dsize=size, mode="bilinear", padding_mode="zeros", align_corners=True)


def _downscale(mask: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return mask
    size = (max(1, round(mask.shape[0] / factor)), max(1, round(mask.shape[1] / factor)))
    return F.interpolate(mask[None, None], size=size, mode="area")[0, 0]


def align_masks(source: torch.Tensor, target: torch.Tensor, *, iterations: int = 200, lr: float = 0.03,
                work_size: int = 128) -> Similarity:
    """The similarity transform that maps the soft mask ``source [H, W]`` onto ``target [H', W']`` (Eq. 9).

    Both masks must have some foreground (callers check, with a message). Deterministic: no random starts.
    """
    with torch.inference_mode(False), torch.enable_grad():  # nodes run under the executor's inference mode
        return _align(source.detach().float().cpu().clone(), target.detach().float().cpu().clone(), iterations,
                      lr, work_size)


def _align(source: torch.Tensor, target: torch.Tensor, iterations: int, lr: float, work_size: int) -> Similarity:
    from kornia.geometry.transform import warp_affine
    factor = max(1.0, max(source.shape + target.shape) / work_size)
    src, tgt = _downscale(source, factor), _downscale(target, factor)
    a_s, c_s, ang_s = _moments(src)
    a_t, c_t, ang_t = _moments(tgt)
    log_s0 = 0.5 * math.log(float(a_t / a_s))
    shift0 = c_t - c_s
    starts = (0.0, ang_t - ang_s, ang_t - ang_s + math.pi)

    def loss_of(params):
        m = _matrix(params[0], params[1], params[2:4], c_s)[None]
        warped = warp_affine(src[None, None], m, dsize=tuple(tgt.shape), mode="bilinear", padding_mode="zeros",
                             align_corners=True)[0, 0]
        return (warped - tgt).abs().mean()

    best = None
    for angle0 in starts:
        params = torch.tensor([log_s0, angle0, float(shift0[0]), float(shift0[1])], requires_grad=True)
        opt = torch.optim.Adam([params], lr=lr)  # Adam: ~lr per step on each of log s, angle, tx, ty (px)
        for _ in range(iterations):
            loss = loss_of(params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            final = float(loss_of(params))
        if best is None or final < best[0]:
            best = (final, params.detach().clone())
    p = best[1]
    off = (factor - 1.0) / 2.0  # working pixel i covers full pixels [i·f, (i+1)·f): its centre is i·f + (f−1)/2
    sim = Similarity(scale=math.exp(float(p[0])), angle=float(p[1]),
                     shift=(float(p[2]) * factor, float(p[3]) * factor),
                     centre=(float(c_s[0]) * factor + off, float(c_s[1]) * factor + off))
    warped = warp(source[None, None], sim, tuple(target.shape))[0, 0]
    inter = ((warped > 0.5) & (target > 0.5)).sum()
    union = ((warped > 0.5) | (target > 0.5)).sum()
    sim.iou = float(inter) / max(1.0, float(union))
    return sim

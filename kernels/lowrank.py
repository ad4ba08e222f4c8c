"""Low-rank weight deltas (LoRA, Hu et al. 2021, Eq. 3: ``h = W x + (alpha / r) * B A x``).

Two ways to apply the same delta:

* :func:`lowrank_forward` ("bypass"): adds ``scale * up(down(x))`` to the frozen layer's output. Costs
  ``tokens * r * (in + out)`` FLOPs and never materialises an ``out x in`` matrix, which is what training
  wants (only ``down``/``up`` receive gradients).
* :func:`lowrank_merge` ("merge"): ``W + scale * up @ down``, what inference wants (zero overhead per step).
  ComfyUI's stock LoRA loader does exactly this merge, so a bypass-trained delta saved in kohya format and
  re-loaded by ``LoraLoader`` must give the same layer output (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lowrank_delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense ``scale * up @ down`` for a Linear (``down [r, in]``, ``up [out, r]``) or a 1x1/kxk conv.

    Conv deltas use ``down [r, in, kh, kw]`` and ``up [out, r, 1, 1]`` (kohya's layout).
    """
    if down.dim() == 2:
        return scale * (up @ down)
    r = down.shape[0]
    return scale * (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:])


def lowrank_merge(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``weight + scale * up @ down`` in ``weight``'s dtype (computed in float32)."""
    delta = lowrank_delta_weight(down.float(), up.float(), scale)
    return (weight.float() + delta).to(weight.dtype)


def lowrank_forward(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The bypass term ``scale * up(down(x))`` for a Linear layer, in ``x``'s dtype.

    ``x [..., in]``, ``down [r, in]``, ``up [out, r]`` -> ``[..., out]``. The factors are cast to ``x``'s dtype
    so a float32 delta trains against fp16/bf16 base weights (the cast is differentiable). ``scale == 1`` (the
    default ``alpha == rank``) skips the multiply: one kernel and one ``[..., out]`` temporary less per layer and
    call, bit-identical result.
    """
    h = F.linear(x, down.to(x.dtype))
    out = F.linear(h, up.to(x.dtype))
    return out if scale == 1.0 else out * scale

"""Small utility nodes."""
from __future__ import annotations

import numpy as np
import torch

from comfy_api.v0_0_2 import io

from . import sockets as S


def plot_losses(losses: list, width: int = 512, height: int = 256) -> torch.Tensor:
    """Render a loss curve (raw, light; moving average, dark) as an IMAGE ``[1, H, W, 3]`` with PIL."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    pad = 24
    if losses:
        vals = np.asarray(losses, dtype=np.float64)
        k = max(1, len(vals) // 20)
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid") if len(vals) >= k else vals
        lo, hi = float(vals.min()), float(vals.max())
        span = (hi - lo) or 1.0

        def pts(v, offset=0):
            n = max(len(vals) - 1, 1)
            return [(pad + (i + offset) * (width - 2 * pad) / n, height - pad - (y - lo) / span * (height - 2 * pad))
                    for i, y in enumerate(v)]
        if len(vals) > 1:
            d.line(pts(vals), fill=(170, 190, 230), width=1)
            d.line(pts(smooth, offset=(k - 1) / 2), fill=(20, 60, 160), width=2)
        d.text((pad, 4), f"loss  first {vals[0]:.4g}  last {vals[-1]:.4g}  min {lo:.4g}  steps {len(vals)}", fill=(0, 0, 0))
    d.rectangle([pad, pad, width - pad, height - pad], outline=(120, 120, 120))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class LossGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeLossGraph",
            display_name="Personalize Loss Graph",
            category=S.CATEGORY + "/utils",
            description="Plots a training loss curve (any LOSS_MAP) as an image.",
            search_aliases=["loss curve", "training loss plot"],
            inputs=[
                S.LossMap.Input("loss"),
                io.Int.Input("width", default=512, min=128, max=4096, step=8),
                io.Int.Input("height", default=256, min=64, max=4096, step=8),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, loss, width, height) -> io.NodeOutput:
        return io.NodeOutput(plot_losses(list(loss.get("loss", [])), width, height))


NODES = [LossGraph]

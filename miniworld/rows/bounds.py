"""The bounds and the words-only baseline: the world's own renders (ceiling), the base model with the class word
(floor) and with the full description (what words alone achieve; held-out subjects are novel combinations of seen
attributes)."""
from __future__ import annotations

from .. import world
from ..registry import Personalised, register


@register("real", "real images (world renders)", order=10, tuned=False, personalises=False)
def real(bench, heldout, index):
    return Personalised(images=bench.real_images(heldout))


@register("base-class", "base model, class word only", order=20, tuned=False, personalises=False, floor=True)
def base_class(bench, heldout, index):
    return Personalised(bench.model, bench.clip, list(heldout.prompts))


@register("base-full", "base model, full description", order=30, tuned=False, personalises=False, baseline=True)
def base_full(bench, heldout, index):
    return Personalised(bench.model, bench.clip, [world.caption(heldout.subject, sc) for sc in heldout.scenes])

"""Textual Inversion (Gal et al. 2022) through Train Subject Embedding; the prompts name the subject by the token."""
from __future__ import annotations

import time

from .. import world
from ..registry import Personalised, register


@register("ti", "Textual Inversion", order=40, gated=True, baseline=True, bench=("bench/bench_training.py",))
def textual_inversion(b, heldout, index):
    c = b.cfg
    images, masks = b.references(heldout)
    name = b.artifact_name("ti", index)
    t0 = time.perf_counter()
    clip, _emb, _loss, _prev = b.call(
        "PersonalizeTrainSubjectEmbedding", model=b.model, clip=b.clip, vae=b.vae, images=images,
        placeholder=b.token, init_word=heldout.class_word, steps=c.ti_steps, learning_rate=c.ti_lr,
        batch_size=c.ti_batch_size, seed=c.seed + index, embedding_name=name, overwrite=True, mask=masks)
    seconds = time.perf_counter() - t0
    prompts = [world.class_prompt(b.token, sc) for sc in heldout.scenes]
    return Personalised(b.model, clip, prompts, seconds, b.artifact("embeddings", name).stat().st_size)

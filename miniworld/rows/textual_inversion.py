"""Textual Inversion (Gal et al. 2022) through Train Subject Embedding; the prompts name the subject by the token."""
from __future__ import annotations

import time

from .. import world
from ..registry import Personalised, register


@register("ti", "Textual Inversion", order=40, gated=True, baseline=True, bench=("bench/bench_training.py",))
def textual_inversion(bench, heldout, index):
    config = bench.cfg
    images, masks = bench.references(heldout)
    name = bench.artifact_name("ti", index)
    t0 = time.perf_counter()
    clip, _emb, _loss, _prev = bench.call(
        "PersonalizeTrainSubjectEmbedding", model=bench.model, clip=bench.clip, vae=bench.vae, images=images,
        placeholder=bench.token, init_word=heldout.class_word, steps=config.ti_steps, learning_rate=config.ti_lr,
        batch_size=config.ti_batch_size, seed=config.seed + index, embedding_name=name, overwrite=True, mask=masks)
    seconds = time.perf_counter() - t0
    prompts = [world.class_prompt(bench.token, sc) for sc in heldout.scenes]
    return Personalised(bench.model, clip, prompts, seconds, bench.artifact("embeddings", name).stat().st_size)

"""DreamBooth (Ruiz et al. 2023) with a rank-r LoRA on the attention layers, through Train Subject LoRA."""
from __future__ import annotations

import time

from ..registry import Personalised, register


@register("lora", "DreamBooth-LoRA (rank 4)", order=50, gated=True, baseline=True,
          bench=("bench/bench_training.py",))
def dreambooth_lora(bench, heldout, index):
    config = bench.cfg
    images, masks = bench.references(heldout)
    t0 = time.perf_counter()
    model, clip, lora_name, _loss, _prev = bench.call(
        "PersonalizeTrainSubjectLoRA", model=bench.model, clip=bench.clip, vae=bench.vae, images=images,
        instance_prompt=f"a photo of a {bench.token} {heldout.class_word}", rank=config.lora_rank, steps=config.lora_steps,
        learning_rate=config.lora_lr, batch_size=config.batch_size, seed=config.seed + index, layers="attention",
        train_text_encoder=False, lora_name=bench.artifact_name("lora", index), overwrite=True, mask=masks)
    seconds = time.perf_counter() - t0
    return Personalised(model, clip, list(heldout.prompts_with(bench.token)), seconds,
                        bench.artifact("loras", lora_name).stat().st_size)

"""DreamBooth (Ruiz et al. 2023) with a rank-r LoRA on the attention layers, through Train Subject LoRA."""
from __future__ import annotations

import time

from ..registry import Personalised, register


@register("lora", "DreamBooth-LoRA (rank 4)", order=50, gated=True, baseline=True,
          bench=("bench/bench_training.py",))
def dreambooth_lora(b, heldout, index):
    c = b.cfg
    images, masks = b.references(heldout)
    t0 = time.perf_counter()
    model, clip, lora_name, _loss, _prev = b.call(
        "PersonalizeTrainSubjectLoRA", model=b.model, clip=b.clip, vae=b.vae, images=images,
        instance_prompt=f"a photo of a {b.token} {heldout.class_word}", rank=c.lora_rank, steps=c.lora_steps,
        learning_rate=c.lora_lr, batch_size=c.batch_size, seed=c.seed + index, layers="attention",
        train_text_encoder=False, lora_name=b.artifact_name("lora", index), overwrite=True, mask=masks)
    seconds = time.perf_counter() - t0
    return Personalised(model, clip, list(heldout.prompts_with(b.token)), seconds,
                        b.artifact("loras", lora_name).stat().st_size)

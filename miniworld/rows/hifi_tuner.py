"""HiFi Tuner (Wang et al. 2023) through HiFi Subject Tune + HiFi Subject Conditioning, and its ablation rows
(opt-in diagnostics, `--methods hifi-no-mask,...`: one of them, no mask, is expected to fall to the floor, so they
are not gated, and they are not in `make eval`'s default rows, which they would make ~40 % longer)."""
from __future__ import annotations

import functools
import time

from .. import world
from ..registry import Personalised, register


def hifi(bench, heldout, index, *, key: str, use_mask: bool = True, use_regularisation: bool = True,
         use_stepwise: bool = True):
    config = bench.cfg
    images, masks = bench.references(heldout)
    t0 = time.perf_counter()
    subject, _loss, file_name = bench.call(
        "PersonalizeHiFiSubjectTune", model=bench.model, clip=bench.clip, vae=bench.vae, images=images,
        caption=f"a photo of {world.article(heldout.class_word)} {heldout.class_word}", n_tokens=5,
        global_steps=config.hifi_global_steps, steps_per_step=config.hifi_steps_per_step, sampling_steps=config.sampler_steps,
        learning_rate=config.hifi_lr, reg_weight=config.hifi_reg_weight, seed=config.seed + index,
        subject_name=bench.artifact_name(key, index), overwrite=True, mask=masks, batch_size=config.batch_size,
        use_mask=use_mask, use_regularisation=use_regularisation, use_stepwise=use_stepwise)
    seconds = time.perf_counter() - t0

    def transform(conditioning):
        return bench.call("PersonalizeHiFiSubjectConditioning", conditioning=conditioning, subject=subject,
                      use_stepwise=use_stepwise)[0]

    return Personalised(bench.model, bench.clip, list(heldout.prompts), seconds,
                        bench.artifact("personalize_subjects", file_name).stat().st_size, transform)


for _order, _key, _title, _switches in (
        (60, "hifi", "HiFi Tuner", {}),
        (61, "hifi-no-mask", "HiFi Tuner, no mask", {"use_mask": False}),
        (62, "hifi-no-reg", "HiFi Tuner, no regularisation", {"use_regularisation": False}),
        (63, "hifi-no-stepwise", "HiFi Tuner, no step-wise", {"use_stepwise": False})):
    register(_key, _title, order=_order, gated=_key == "hifi", default=_key == "hifi",
             bench=("bench/bench_hifi.py",) if _key == "hifi" else ())(
        functools.partial(hifi, key=_key, **_switches))

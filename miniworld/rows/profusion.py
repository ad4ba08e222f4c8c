"""ProFusion (Zhou et al. 2023) from one image: PromptNet Encode + the Fusion Sampler (tuning-free, m = 0 and m = 1),
and ProFusion Tune + the Fusion Sampler, through the pack's nodes with the shipped mini PromptNet and mini CLIP vision.

Each row personalises from ONE image, view 0 of the draw (``bench.references(heldout)[0]``: under the one-image
protocol that is all a method sees; under the multi-image protocol it would still read view 0 alone, so these rows
run in the one-image table only, ``protocols=("one",)``). The image goes in unmasked, as PromptNet's references
were in pre-training (scripts/pretrain_promptnet.py: other views of the subject in other scenes).

Generation: each caption is sampled by stock SamplerCustom with the Fusion Sampler node's SAMPLER built for it
(``Personalised.sampler``) on the benchmark's SIGMAS (BasicScheduler ddim_uniform, the same steps), noise seeds and
empty latent as every other row. The caption names the subject by the placeholder, ``"a photo of holder on the
beach"`` (the form PromptNet was pre-trained on: the caption with the subject's phrase replaced), and the class word
is given with its article (``"a star"``), so the refinement's class-word prompt is exactly the floor row's prompt
``"a photo of a star on the beach"``. Guidance: the method's own defaults (the node's, the official notebook's: ω1 7,
ω2 5, ω_f 7, γ 0.6, η_fuse 1), not the benchmark's cfg 5 (which other rows use as their one guidance scale):
SamplerCustom's cfg goes unused by the Fusion Sampler.

Cost columns: seconds to personalise = PromptNet Encode (+ ProFusion Tune for the tuned row); bytes per subject =
what has to be kept per subject: the reference (latent + CLIP vision tokens; the PromptNet file is shared by all
subjects) and, tuned, the tuned PromptNet's weights and the q/k/v deltas (fp32, as held in memory)."""
from __future__ import annotations

import functools
import time

from .. import world
from ..registry import Personalised, register

PROMPTNET = "mini_world_promptnet.safetensors"
CLIP_VISION = "mini_world_clip_vision.safetensors"
PLACEHOLDER = "holder"
TUNE_STEPS = 100          # ProFusion Tune's defaults (official: 100 steps, lr 2e-5, batch 4, 31 copies)
TUNE_LR = 2e-5
TUNE_BATCH = 4
TUNE_COPIES = 31
FUSION = dict(omega1=7.0, omega2=5.0, gamma=0.6, omega_f=7.0, eta_fuse=1.0)  # the Fusion Sampler node's defaults


def captions(heldout) -> list[str]:
    """One caption per scene with the placeholder where the subject goes: ``"a photo of holder on the beach"``."""
    return [f"a photo of {PLACEHOLDER} {world.SCENE_PHRASES[sc]}" for sc in heldout.scenes]


def class_word(heldout) -> str:
    """The class word with its article (``"a star"``): the refinement's class prompt is then the floor row's."""
    return f"{world.article(heldout.class_word)} {heldout.class_word}"


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) tuple / list / dict, e.g. a ModelPatcher's ``patches``."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def reference_bytes(reference) -> int:
    return tensor_bytes([reference.latent, reference.vision_tokens])


def fusion_sampler(bench, promptnet, reference, heldout, m: int):
    """``caption -> SAMPLER``: the Fusion Sampler node for that caption (Personalised.sampler)."""
    word = class_word(heldout)

    def sampler(caption: str):
        return bench.call("PersonalizeFusionSampler", promptnet=promptnet, reference=reference, clip=bench.clip,
                          prompt=caption, class_word=word, placeholder=PLACEHOLDER, m=m, **FUSION)[0]
    return sampler


def tune_prompt(heldout, kind: str) -> str:
    """ProFusion Tune's prompt: ``"official"`` ``"a photo of holder"`` (the node's default), or ``"caption"`` the
    seen view's caption in the form PromptNet was pre-trained on, ``"a photo of holder on the beach"``."""
    if kind == "official":
        return f"a photo of {PLACEHOLDER}"
    return f"a photo of {PLACEHOLDER} {world.SCENE_PHRASES[heldout.references[0].scene]}"


def profusion(bench, heldout, index, *, m: int = 1, tune: bool = False, prompt: str = "official",
              learning_rate: float | None = None, qkv: bool = True, step_fraction: float = 1.0,
              copies: int | None = None, padding: str = "reflection", masked: bool = False):
    images, masks = bench.references(heldout)
    image = images[:1]  # ProFusion reads one image: view 0
    promptnet = bench.call("PersonalizePromptNetLoader", promptnet_name=PROMPTNET)[0]
    clip_vision = bench.call("PersonalizeLoadMiniCLIPVision", clip_name=CLIP_VISION)[0]
    model, nbytes = bench.model, 0
    t0 = time.perf_counter()
    if tune:
        promptnet, model, _loss, _previews = bench.call(
            "PersonalizeProFusionTune", promptnet=promptnet, model=bench.model, clip=bench.clip, vae=bench.vae,
            clip_vision=clip_vision, image=image, steps=max(1, round(TUNE_STEPS * step_fraction)),
            learning_rate=learning_rate or TUNE_LR, batch_size=TUNE_BATCH,
            augmented_copies=TUNE_COPIES if copies is None else copies, tune_unet_qkv=qkv, seed=bench.cfg.seed + index,
            prompt=tune_prompt(heldout, prompt), padding=padding,
            **({"mask": masks[:1]} if masked else {}))
        nbytes += tensor_bytes(list(promptnet.state_dict().values())) + tensor_bytes(model.patches)
    (reference,) = bench.call("PersonalizePromptNetEncode", image=image, promptnet=promptnet, vae=bench.vae,
                              clip_vision=clip_vision)
    seconds = time.perf_counter() - t0
    nbytes += reference_bytes(reference)
    return Personalised(model, bench.clip, captions(heldout), seconds, nbytes,
                        sampler=fusion_sampler(bench, promptnet, reference, heldout, m))


# ProFusion Tune's settings for the mini world, chosen on the tuning half (README, "Choosing ProFusion Tune's
# settings"): no augmented copies (without the official inpainting fill, the copies' zoom-out and shift padding taught
# PromptNet a distorted subject), the tuning prompt in the pre-training captions' form (its scene words explain the
# background, so S* need not absorb it), 50 steps (as good as 100 there, at half the time).
CHOSEN = {"copies": 0, "prompt": "caption", "step_fraction": 0.5}
TUNED = {"m": 1, "tune": True}
for _order, _key, _title, _kw in (
        (70, "profusion-m0", "ProFusion, PromptNet only (m=0)", {"m": 0}),
        (71, "profusion", "ProFusion, PromptNet only (m=1)", {"m": 1}),
        (72, "profusion-tune", "ProFusion Tune + Fusion Sampler", {**TUNED, **CHOSEN}),
        # opt-in diagnostics (--methods ...), the tuning-half study behind CHOSEN: the official recipe (31 copies
        # padded by reflection, "a photo of holder", 100 steps, lr 2e-5) and one change at a time
        (73, "profusion-tune-official", "ProFusion Tune (official recipe) + Fusion Sampler", TUNED),
        (74, "profusion-tune-caption", "ProFusion Tune (caption prompt) + Fusion Sampler",
         {**TUNED, "prompt": "caption"}),
        (75, "profusion-tune-lr1e-4", "ProFusion Tune (lr 1e-4) + Fusion Sampler", {**TUNED, "learning_rate": 1e-4}),
        (76, "profusion-tune-noqkv", "ProFusion Tune (PromptNet only) + Fusion Sampler", {**TUNED, "qkv": False}),
        (77, "profusion-tune-s25", "ProFusion Tune (25 steps) + Fusion Sampler", {**TUNED, "step_fraction": 0.25}),
        (78, "profusion-tune-c3", "ProFusion Tune (3 copies) + Fusion Sampler", {**TUNED, "copies": 3}),
        (79, "profusion-tune-border", "ProFusion Tune (border padding) + Fusion Sampler",
         {**TUNED, "padding": "border"}),
        (80, "profusion-tune-zeros", "ProFusion Tune (black padding) + Fusion Sampler", {**TUNED, "padding": "zeros"}),
        (81, "profusion-tune-mask", "ProFusion Tune (subject mask) + Fusion Sampler", {**TUNED, "masked": True}),
        (82, "profusion-tune-noaug", "ProFusion Tune (no copies) + Fusion Sampler", {**TUNED, "copies": 0}),
        (83, "profusion-tune-noaug-s50", "ProFusion Tune (no copies, 50 steps) + Fusion Sampler",
         {**TUNED, "copies": 0, "step_fraction": 0.5}),
        (84, "profusion-tune-noaug-caption", "ProFusion Tune (no copies, caption prompt, 100 steps) + Fusion Sampler",
         {**TUNED, "copies": 0, "prompt": "caption"})):
    register(_key, _title, order=_order, tuned=_kw.get("tune", False), personalises=True, protocols=("one",),
             default=_order <= 72, bench=("bench/bench_profusion.py",) if _key == "profusion" else ())(
        functools.partial(profusion, **_kw))

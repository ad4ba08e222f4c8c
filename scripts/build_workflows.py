"""Regenerate the UI-format workflows in workflows/ from compact graph descriptions.

The files are what ComfyUI's "Save" writes (nodes, links, widgets_values in INPUT_TYPES order, a seed control
value after seed widgets), so they load in the UI and in the test harness alike. Run after changing a node's
inputs:  .venv/bin/python scripts/build_workflows.py   (boots the default host to read INPUT_TYPES)

Layout: every node gets at least the size the real frontend computes for it (``computeSize()``: its inputs, outputs,
widgets and title), read from ``scripts/node_sizes.json`` (``scripts/measure_node_sizes.py`` measures it in headless
Chromium in both frontends the browser test runs). Nodes stand in columns by data flow (a node one column right of
its rightmost input; a node that only feeds others pulled right to just before its first consumer); each group of
``GROUPS`` is a horizontal band of its own, so groups never overlap and nodes never do; a short note opens a band
where a person needs one. ``tests/test_frontend.py`` checks the result in the real frontend.

Two workflows per method (``METHODS``), one graph built for two targets (``Target``):

* ``<method>_mini.json`` runs out of the box, offline: the pack's mini model (Load Mini Model, mini_world.safetensors)
  and the subject the pack ships (``subjects/striped_red_star``, Load Subject Images finds it on a fresh install),
  64 px, the mini-world benchmark's settings;
* ``<method>_sd15.json`` is set for a real SD1.5 checkpoint at 512 px (``v1-5-pruned-emaonly-fp16.safetensors``, with
  the download the frontend's missing-model dialog offers, ``MODEL_DOWNLOADS``) and the papers' settings, with notes
  on where a user's photos go and what to change.

``SD15_FAST`` and ``SD15_AT_64`` are the same graphs with the values the tests and the thumbnails run instead
(``harness.workflow_variants``); the files themselves stay what a user needs. No workflow reads a file its own run
writes: a node that would (HiFi Load Subject, for a later session) is muted. Files in workflows/ that no graph
names are removed (with their thumbnails).
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)
SIZE_TABLE = ROOT / "scripts" / "node_sizes.json"
log = logging.getLogger("build_workflows")

MINI_CKPT = "mini_world.safetensors"  # the trained mini family shipped in the pack's models/ (make mini-world)
SD15_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"  # the name ComfyUI's own SD1.5 templates use
# The download a frontend offers for a missing model: ``properties.models`` of the loader node, the format of ComfyUI's
# own templates (comfyui-workflow-templates' CheckpointLoaderSimple nodes); frontend 1.58 reads {name, url, directory,
# hash?, hash_type?} of the entries whose name is one of the node's widget values.
MODEL_DOWNLOADS = {
    SD15_CKPT: {"name": SD15_CKPT, "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                + SD15_CKPT, "directory": "checkpoints"},
}
SUBJECT = "striped_red_star"  # subjects/ of the pack (scripts/build_subjects.py): a held-out mini-world subject
PHOTO = "blue_circle_photo"   # subjects/ of the pack: a photo (a blue circle on the grass) with the region to replace
CLASS_WORD = "star"
TOKEN = "sks"
MINI_SCENES = ("on the grass", "in the snow", "under the night sky")
MUTED = {"mode": 2}  # a node the frontend shows but never queues (LiteGraph mode NEVER)


@dataclass(frozen=True)
class Target:
    """What differs between a method's two workflows: ``mini`` (the pack's mini model, offline, 64 px; the settings
    of the mini-world benchmark, miniworld/benchmark.py BenchConfig) and ``sd15`` (a real SD1.5 checkpoint at 512 px,
    the papers' settings). The graphs are the same; only the loader and these values differ."""
    name: str
    size: int                     # pixels: subject photos, latents
    batch: int                    # images per prompt
    negative: str                 # negative prompt of Textual Inversion and LoRA sampling (HiFi: always "")
    sampler: tuple                # (steps, cfg, sampler_name, scheduler) for Textual Inversion and LoRA
    ddim_steps: int               # DDIM steps of the HiFi, inversion and replacement workflows (ddim_uniform)
    cfg: float                    # cfg of those
    ti: dict = field(default_factory=dict)         # Train Subject Embedding
    lora: dict = field(default_factory=dict)       # Train Subject LoRA
    hifi: dict = field(default_factory=dict)       # HiFi Subject Tune (its sampling_steps = ddim_steps)
    guidance: dict = field(default_factory=dict)   # HiFi Reference-Guided Sampler
    null_text: dict = field(default_factory=dict)  # Invert Image and HiFi Subject Replace
    checkpointing: bool = False   # gradient checkpointing in the training nodes (memory on a consumer GPU)


MINI = Target(
    "mini", size=64, batch=4, negative="", sampler=(20, 5.0, "ddim", "ddim_uniform"), ddim_steps=20, cfg=5.0,
    ti={"steps": 300, "learning_rate": 5e-3, "batch_size": 8},
    lora={"rank": 4, "steps": 200, "learning_rate": 6e-3, "batch_size": 2},
    hifi={"global_steps": 300, "steps_per_step": 3, "learning_rate": 2e-2, "batch_size": 2},
    guidance={"t_start": 16, "t_end": 4, "inner_steps": 5, "learning_rate": 1e-2},
    null_text={"null_text_steps": 10, "learning_rate": 1e-2})
SD15 = Target(
    "sd15", size=512, batch=2, negative="blurry, low quality, deformed", sampler=(25, 7.0, "dpmpp_2m", "karras"),
    ddim_steps=50, cfg=7.5,
    # Gal et al. 2022: lr 5e-3; a few thousand steps (diffusers' textual_inversion example: 3000).
    ti={"steps": 2500, "learning_rate": 5e-3, "batch_size": 2},
    # DreamBooth with a LoRA: rank 8, lr 1e-4, a few hundred steps on 3-5 photos.
    lora={"rank": 8, "steps": 600, "learning_rate": 1e-4, "batch_size": 1},
    # HiFi Tuner (Wang et al. 2023): 1000 global steps at 5e-3, 10 per timestep of a 50-step DDIM schedule.
    hifi={"global_steps": 1000, "steps_per_step": 10, "learning_rate": 5e-3, "batch_size": 1},
    guidance={"t_start": 40, "t_end": 10, "inner_steps": 10, "learning_rate": 1e-2},
    null_text={"null_text_steps": 10, "learning_rate": 1e-2}, checkpointing=True)
# What the tests and scripts/render_thumbnails.py run in place of an _sd15 file (harness.workflow_variants): the same
# graph at 64 px, on the shipped mini model with the file's own settings (thumbnails), or on the tiny random SD1.5
# test checkpoint with a few steps (tests).
SD15_AT_64 = replace(SD15, size=64)
SD15_FAST = replace(
    SD15, size=64, batch=1, sampler=(3, 7.0, "dpmpp_2m", "karras"), ddim_steps=4,
    ti={"steps": 3, "learning_rate": 5e-3, "batch_size": 1},
    lora={"rank": 4, "steps": 3, "learning_rate": 1e-4, "batch_size": 1},
    hifi={"global_steps": 3, "steps_per_step": 1, "learning_rate": 5e-3, "batch_size": 1},
    guidance={"t_start": 3, "t_end": 1, "inner_steps": 1, "learning_rate": 1e-2},
    null_text={"null_text_steps": 2, "learning_rate": 1e-2}, checkpointing=False)
TARGETS = {"mini": MINI, "sd15": SD15}


def _loader(t: Target) -> tuple:
    if t.name == "mini":
        return (1, "PersonalizeLoadMiniModel", {"ckpt_name": MINI_CKPT}, "Load Mini Model (swap for Load Checkpoint)")
    return (1, "CheckpointLoaderSimple", {"ckpt_name": SD15_CKPT}, None)


def _subject(t: Target) -> tuple:
    return (2, "PersonalizeLoadSubjectImages", {"folder": SUBJECT, "size": t.size}, "Subject photos")


def _ksampler(model, positive, negative, latent, seed, t: Target, ddim: bool = False) -> dict:
    steps, cfg, sampler, scheduler = (t.ddim_steps, t.cfg, "ddim", "ddim_uniform") if ddim else t.sampler
    return {"model": model, "positive": positive, "negative": negative, "latent_image": latent, "seed": seed,
            "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}


def _training(t: Target) -> dict:
    return {"seed": 0, "overwrite": True, "gradient_checkpointing": t.checkpointing, "mixed_precision": "auto"}


def _hifi_tune(t: Target, subject_name: str) -> tuple:
    return (3, "PersonalizeHiFiSubjectTune", {
        "model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0), "mask": (2, 1),
        "caption": f"a photo of a {CLASS_WORD}", "n_tokens": 5, "sampling_steps": t.ddim_steps, "reg_weight": 5e-3,
        "use_mask": True, "use_regularisation": True, "use_stepwise": True, "subject_name": subject_name,
        **t.hifi, **_training(t)}, None)


def textual_inversion(t: Target) -> list:
    return [
        _loader(t), _subject(t),
        (3, "PersonalizeTrainSubjectEmbedding", {
            "model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0), "mask": (2, 1), "placeholder": TOKEN,
            "init_word": CLASS_WORD, "embedding_name": f"{SUBJECT}_{t.name}", "preview_every": 0, **t.ti,
            **_training(t)}, None),
        (4, "CLIPTextEncode", {"clip": (3, 0), "text": f"a photo of a {TOKEN} on the beach"}, "Positive (uses sks)"),
        (5, "CLIPTextEncode", {"clip": (1, 1), "text": t.negative}, "Negative"),
        (6, "EmptyLatentImage", {"width": t.size, "height": t.size, "batch_size": t.batch}, None),
        (7, "KSampler", _ksampler((1, 0), (4, 0), (5, 0), (6, 0), 42, t), None),
        (8, "VAEDecode", {"samples": (7, 0), "vae": (1, 2)}, None),
        (9, "SaveImage", {"images": (8, 0), "filename_prefix": f"personalize/textual_inversion_{t.name}"}, None),
        (10, "PersonalizeLossGraph", {"loss": (3, 2), "width": 512, "height": 256}, None),
        (11, "SaveImage", {"images": (10, 0), "filename_prefix": f"personalize/textual_inversion_{t.name}_loss"},
         None),
    ]


def dreambooth_lora(t: Target) -> list:
    return [
        _loader(t), _subject(t),
        (3, "PersonalizeTrainSubjectLoRA", {
            "model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0), "mask": (2, 1),
            "instance_prompt": f"a photo of a {TOKEN} {CLASS_WORD}", "layers": "attention",
            "train_text_encoder": False, "lora_name": f"{SUBJECT}_{t.name}_lora", "preview_every": 0,
            "class_prompt": "", "prior_loss_weight": 1.0, "alpha": 0.0, **t.lora, **_training(t)}, None),
        (4, "CLIPTextEncode", {"clip": (3, 1), "text": f"a photo of a {TOKEN} {CLASS_WORD} in the snow"},
         "Positive (uses sks)"),
        (5, "CLIPTextEncode", {"clip": (3, 1), "text": t.negative}, "Negative"),
        (6, "EmptyLatentImage", {"width": t.size, "height": t.size, "batch_size": t.batch}, None),
        (7, "KSampler", _ksampler((3, 0), (4, 0), (5, 0), (6, 0), 42, t), None),
        (8, "VAEDecode", {"samples": (7, 0), "vae": (1, 2)}, None),
        (9, "SaveImage", {"images": (8, 0), "filename_prefix": f"personalize/dreambooth_lora_{t.name}"}, None),
        (11, "PersonalizeLossGraph", {"loss": (3, 3), "width": 512, "height": 256}, None),
        (12, "SaveImage", {"images": (11, 0), "filename_prefix": f"personalize/dreambooth_lora_{t.name}_loss"},
         None),
    ]


def hifi_subject_tune(t: Target) -> list:
    subject_name = f"{SUBJECT}_{t.name}"
    return [
        _loader(t), _subject(t), _hifi_tune(t, subject_name),
        (4, "CLIPTextEncode", {"clip": (1, 1), "text": f"a photo of a {CLASS_WORD} on the beach"},
         "Positive (class word)"),
        (5, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (6, "PersonalizeHiFiSubjectConditioning", {"conditioning": (4, 0), "subject": (3, 0), "use_stepwise": True},
         None),
        (7, "EmptyLatentImage", {"width": t.size, "height": t.size, "batch_size": t.batch}, None),
        (8, "KSampler", _ksampler((1, 0), (6, 0), (5, 0), (7, 0), 42, t, ddim=True), None),
        (9, "VAEDecode", {"samples": (8, 0), "vae": (1, 2)}, None),
        (10, "SaveImage", {"images": (9, 0), "filename_prefix": f"personalize/hifi_subject_tune_{t.name}"}, None),
        (16, "PersonalizeLossGraph", {"loss": (3, 1), "width": 512, "height": 256}, None),
        (17, "SaveImage", {"images": (16, 0), "filename_prefix": f"personalize/hifi_subject_tune_{t.name}_loss"},
         None),
        # A later session: the file this workflow saved, without tuning again. Muted: no run reads a file that the
        # same run writes.
        (11, "PersonalizeHiFiLoadSubject", {"subject_file": f"{subject_name}.safetensors"}, "Saved subject", MUTED),
        (12, "PersonalizeHiFiSubjectConditioning", {"conditioning": (4, 0), "subject": (11, 0), "use_stepwise": True},
         None, MUTED),
        (13, "KSampler", _ksampler((1, 0), (12, 0), (5, 0), (7, 0), 43, t, ddim=True), None, MUTED),
        (14, "VAEDecode", {"samples": (13, 0), "vae": (1, 2)}, None, MUTED),
        (15, "SaveImage", {"images": (14, 0), "filename_prefix": f"personalize/hifi_saved_subject_{t.name}"}, None,
         MUTED),
    ]


def hifi_reference_guided(t: Target) -> list:
    half, quarter = t.size // 2, t.size // 4
    return [
        _loader(t), _subject(t), _hifi_tune(t, f"{SUBJECT}_{t.name}_reference"),
        (4, "CLIPTextEncode", {"clip": (1, 1), "text": f"a photo of a {CLASS_WORD} on the beach"},
         "Positive (class word)"),
        (5, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (6, "PersonalizeHiFiSubjectConditioning", {"conditioning": (4, 0), "subject": (3, 0), "use_stepwise": True},
         None),
        (7, "EmptyLatentImage", {"width": t.size, "height": t.size, "batch_size": 1}, None),
        (8, "BasicScheduler", {"model": (1, 0), "scheduler": "ddim_uniform", "steps": t.ddim_steps, "denoise": 1.0},
         None),
        (9, "KSamplerSelect", {"sampler_name": "euler"}, "DDIM (= euler on these sigmas)"),
        (10, "SamplerCustom", {"model": (1, 0), "add_noise": True, "noise_seed": 42, "cfg": t.cfg, "positive": (6, 0),
                               "negative": (5, 0), "sampler": (9, 0), "sigmas": (8, 0), "latent_image": (7, 0)},
         "1st pass: unguided"),
        (11, "VAEDecode", {"samples": (10, 0), "vae": (1, 2)}, None),
        (12, "SaveImage", {"images": (11, 0), "filename_prefix": f"personalize/hifi_reference_unguided_{t.name}"},
         None),
        (13, "SolidMask", {"value": 0.0, "width": t.size, "height": t.size}, None),
        (14, "SolidMask", {"value": 1.0, "width": half, "height": half}, None),
        (15, "MaskComposite", {"destination": (13, 0), "source": (14, 0), "x": quarter, "y": quarter,
                               "operation": "add"}, "Generated-subject mask (a stand-in)"),
        (16, "CLIPTextEncode", {"clip": (1, 1), "text": f"a photo of a {CLASS_WORD}"}, "Reference caption"),
        (17, "PersonalizeHiFiReferenceGuidedSampler", {
            "model": (1, 0), "vae": (1, 2), "subject": (3, 0), "reference_conditioning": (16, 0), "sigmas": (8, 0),
            "reference_images": (2, 0), "reference_masks": (2, 1), "generated_mask": (15, 0), **t.guidance,
            "reference_index": 0, "generated_image": (11, 0)}, None),
        (18, "SamplerCustom", {"model": (1, 0), "add_noise": True, "noise_seed": 42, "cfg": t.cfg, "positive": (6, 0),
                               "negative": (5, 0), "sampler": (17, 0), "sigmas": (8, 0), "latent_image": (7, 0)},
         "2nd pass: same seed, reference-guided"),
        (19, "VAEDecode", {"samples": (18, 0), "vae": (1, 2)}, None),
        (20, "SaveImage", {"images": (19, 0), "filename_prefix": f"personalize/hifi_reference_guided_{t.name}"}, None),
    ]


def hifi_subject_replace(t: Target) -> list:
    return [
        _loader(t), _subject(t), _hifi_tune(t, f"{SUBJECT}_{t.name}_replace"),
        (4, "PersonalizeLoadSubjectImages", {"folder": PHOTO, "size": t.size}, "The photo and its region"),
        (8, "BasicScheduler", {"model": (1, 0), "scheduler": "ddim_uniform", "steps": t.ddim_steps, "denoise": 1.0},
         None),
        (9, "PersonalizeHiFiSubjectReplace", {
            "model": (1, 0), "clip": (1, 1), "vae": (1, 2), "image": (4, 0), "mask": (4, 1),
            "caption": "a photo of a blue circle on the grass", "source_word": "circle", "target_word": CLASS_WORD,
            "sigmas": (8, 0), "cfg": t.cfg, **t.null_text, "cross_replace": 0.8, "subject": (3, 0),
            "use_stepwise": True}, None),
        (10, "ImageCompositeMasked", {"destination": (4, 0), "source": (9, 0), "x": 0, "y": 0,
                                      "resize_source": False, "mask": (4, 1)}, "Keep the photo outside the mask"),
        (11, "SaveImage", {"images": (9, 0), "filename_prefix": f"personalize/hifi_subject_replace_{t.name}"}, None),
        (12, "SaveImage", {"images": (10, 0),
                           "filename_prefix": f"personalize/hifi_subject_replace_{t.name}_composite"}, None),
    ]


def invert_image(t: Target) -> list:
    return [
        _loader(t), _subject(t),
        (3, "ImageFromBatch", {"image": (2, 0), "batch_index": 0, "length": 1}, None),
        (4, "VAEEncode", {"pixels": (3, 0), "vae": (1, 2)}, None),
        (5, "CLIPTextEncode", {"clip": (1, 1), "text": f"a photo of a striped red {CLASS_WORD} in the snow"},
         "Caption (positive)"),
        (6, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (7, "BasicScheduler", {"model": (1, 0), "scheduler": "ddim_uniform", "steps": t.ddim_steps, "denoise": 1.0},
         None),
        (8, "PersonalizeInvertImage", {"model": (1, 0), "positive": (5, 0), "negative": (6, 0), "latent": (4, 0),
                                       "sigmas": (7, 0), "cfg": t.cfg, **t.null_text, "fixed_point_iterations": 0,
                                       "early_stop": 1e-5}, None),
        (9, "SamplerCustom", {"model": (1, 0), "add_noise": False, "noise_seed": 0, "cfg": t.cfg, "positive": (5, 0),
                              "negative": (6, 0), "sampler": (8, 2), "sigmas": (7, 0), "latent_image": (8, 0)},
         "Reconstruct (same sigmas and cfg)"),
        (10, "VAEDecode", {"samples": (9, 0), "vae": (1, 2)}, None),
        (11, "SaveImage", {"images": (10, 0), "filename_prefix": f"personalize/invert_image_{t.name}"}, None),
        (12, "SaveImage", {"images": (3, 0), "filename_prefix": f"personalize/invert_image_{t.name}_input"}, None),
    ]


def _mini_demo_graph() -> list:
    """Load Mini Model -> Load Subject Images -> HiFi Subject Tune (masked) -> per new scene: the class prompt with
    the subject's rows (HiFi Subject Conditioning) -> KSampler (ddim_uniform, the tuned timesteps) -> one batch."""
    graph = [
        _loader(MINI),
        (2, "PersonalizeLoadSubjectImages", {"folder": SUBJECT, "size": 64}, "Reference views (held-out subject)"),
        _hifi_tune(MINI, "mini_demo_subject"),
        (4, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (5, "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}, None),
    ]
    decoded = []
    for k, scene in enumerate(MINI_SCENES):
        enc, cond, samp, dec = 10 + 4 * k, 11 + 4 * k, 12 + 4 * k, 13 + 4 * k
        graph += [
            (enc, "CLIPTextEncode", {"clip": (1, 1), "text": f"a photo of a {CLASS_WORD} {scene}"},
             f"Positive: {scene}"),
            (cond, "PersonalizeHiFiSubjectConditioning", {"conditioning": (enc, 0), "subject": (3, 0),
                                                          "use_stepwise": True}, None),
            (samp, "KSampler", _ksampler((1, 0), (cond, 0), (4, 0), (5, 0), 7 + k, MINI, ddim=True), None),
            (dec, "VAEDecode", {"samples": (samp, 0), "vae": (1, 2)}, None),
        ]
        decoded.append(dec)
    batch_id, previous = 30, decoded[0]
    for dec in decoded[1:]:
        graph.append((batch_id, "ImageBatch", {"image1": (previous, 0), "image2": (dec, 0)}, None))
        previous, batch_id = batch_id, batch_id + 1
    graph += [
        (40, "SaveImage", {"images": (previous, 0), "filename_prefix": "personalize/mini_world_demo"}, None),
        (41, "SaveImage", {"images": (2, 0), "filename_prefix": "personalize/mini_world_demo_references"}, None),
    ]
    return graph


PROMPTNET_MINI = "mini_world_promptnet.safetensors"  # models/promptnet of the pack (scripts/pretrain_promptnet.py)
CLIP_VISION_MINI = "mini_world_clip_vision.safetensors"  # models/clip_vision of the pack (pretrain_clip_vision.py)
# Fusion Sampler on the mini model: the official notebook's values (the node's defaults), which the one-image
# benchmark measured (README: ProFusion rows).
FUSION_MINI = {"omega1": 7.0, "omega2": 5.0, "m": 1, "gamma": 0.6, "omega_f": 7.0, "eta_fuse": 1.0}


def _profusion_inputs() -> list:
    """Nodes 3-5 of every ProFusion graph: one reference view of the shipped subject (node 2), the mini CLIP vision
    tower and the mini PromptNet."""
    return [
        (3, "ImageFromBatch", {"image": (2, 0), "batch_index": 0, "length": 1}, "One reference view"),
        (4, "PersonalizeLoadMiniCLIPVision", {"clip_name": CLIP_VISION_MINI},
         "Load Mini CLIP Vision (swap for Load CLIP Vision)"),
        (5, "PersonalizePromptNetLoader", {"promptnet_name": PROMPTNET_MINI}, None),
    ]


def _fusion_sampler(node_id: int, promptnet: tuple, reference: tuple, prompt: str, title=None) -> tuple:
    return (node_id, "PersonalizeFusionSampler", {
        "promptnet": promptnet, "reference": reference, "clip": (1, 1), "prompt": prompt, "class_word": CLASS_WORD,
        "placeholder": "holder", **FUSION_MINI, "scale_2": 3.0, "scale_3": 3.0}, title)


def profusion_encode_mini() -> list:
    """One reference view of the shipped subject -> PromptNet Encode -> Fusion Sampler -> stock SamplerCustom on
    ddim_uniform SIGMAS (20 steps, the mini-world benchmark's), no tuning (the pre-trained mini PromptNet)."""
    return [
        _loader(MINI), _subject(MINI),
        *_profusion_inputs(),
        (6, "PersonalizePromptNetEncode", {"image": (3, 0), "promptnet": (5, 0), "vae": (1, 2),
                                           "clip_vision": (4, 0)}, None),
        _fusion_sampler(7, (5, 0), (6, 0), "a photo of holder on the beach"),
        (8, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Unused (SamplerCustom needs a prompt)"),
        (9, "BasicScheduler", {"model": (1, 0), "scheduler": "ddim_uniform", "steps": MINI.ddim_steps,
                               "denoise": 1.0}, None),
        (10, "EmptyLatentImage", {"width": MINI.size, "height": MINI.size, "batch_size": MINI.batch}, None),
        (11, "SamplerCustom", {"model": (1, 0), "add_noise": True, "noise_seed": 42, "cfg": MINI.cfg,
                               "positive": (8, 0), "negative": (8, 0), "sampler": (7, 0), "sigmas": (9, 0),
                               "latent_image": (10, 0)}, None),
        (12, "VAEDecode", {"samples": (11, 0), "vae": (1, 2)}, None),
        (13, "SaveImage", {"images": (12, 0), "filename_prefix": "personalize/profusion_encode_mini"}, None),
        (14, "SaveImage", {"images": (3, 0), "filename_prefix": "personalize/profusion_encode_mini_reference"},
         None),
    ]


# ProFusion Tune on the mini model at the settings the one-image benchmark chose on its tuning half
# (miniworld/rows/profusion.py CHOSEN; README "Choosing ProFusion Tune's settings"): the official lr 2e-5 and batch 4,
# no augmented copies (without the official inpainting fill they lowered subject fidelity), 50 steps, and a tuning
# prompt that names the view's background ("in the snow": view 1 of the shipped subject), so S* need not absorb it.
PROFUSION_TUNE_MINI = {"steps": 50, "learning_rate": 2e-5, "batch_size": 4, "augmented_copies": 0,
                       "tune_unet_qkv": True}
PROFUSION_TUNE_PROMPT = "a photo of holder in the snow"


def profusion_tune_mini() -> list:
    """ProFusion Tune on one reference view (the tuned PROMPTNET and MODEL) -> PromptNet Encode of the same view ->
    Fusion Sampler in SamplerCustom with the tuned MODEL; and the tuned MODEL alone in a plain KSampler with the
    class-word prompt, for comparison; the tuning loss."""
    return [
        _loader(MINI), _subject(MINI),
        *_profusion_inputs(),
        (6, "PersonalizeProFusionTune", {
            "promptnet": (5, 0), "model": (1, 0), "clip": (1, 1), "vae": (1, 2), "clip_vision": (4, 0),
            "image": (3, 0), **PROFUSION_TUNE_MINI, "seed": 0, "gradient_checkpointing": False,
            "mixed_precision": "auto", "preview_every": 0, "prompt": PROFUSION_TUNE_PROMPT,
            "padding": "reflection"}, None),
        (7, "PersonalizePromptNetEncode", {"image": (3, 0), "promptnet": (6, 0), "vae": (1, 2),
                                           "clip_vision": (4, 0)}, None),
        _fusion_sampler(8, (6, 0), (7, 0), "a photo of holder on the beach"),
        (9, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (10, "BasicScheduler", {"model": (6, 1), "scheduler": "ddim_uniform", "steps": MINI.ddim_steps,
                                "denoise": 1.0}, None),
        (11, "EmptyLatentImage", {"width": MINI.size, "height": MINI.size, "batch_size": MINI.batch}, None),
        (12, "SamplerCustom", {"model": (6, 1), "add_noise": True, "noise_seed": 42, "cfg": MINI.cfg,
                               "positive": (9, 0), "negative": (9, 0), "sampler": (8, 0), "sigmas": (10, 0),
                               "latent_image": (11, 0)}, None),
        (13, "VAEDecode", {"samples": (12, 0), "vae": (1, 2)}, None),
        (14, "SaveImage", {"images": (13, 0), "filename_prefix": "personalize/profusion_tune_mini"}, None),
        (15, "CLIPTextEncode", {"clip": (1, 1), "text": f"a photo of a {CLASS_WORD} on the beach"},
         "Positive (class word, no S*)"),
        (16, "KSampler", _ksampler((6, 1), (15, 0), (9, 0), (11, 0), 42, MINI, ddim=True),
         "Tuned MODEL alone (plain KSampler)"),
        (17, "VAEDecode", {"samples": (16, 0), "vae": (1, 2)}, None),
        (18, "SaveImage", {"images": (17, 0), "filename_prefix": "personalize/profusion_tune_mini_ksampler"}, None),
        (19, "PersonalizeLossGraph", {"loss": (6, 2), "width": 512, "height": 256}, None),
        (20, "SaveImage", {"images": (19, 0), "filename_prefix": "personalize/profusion_tune_mini_loss"}, None),
    ]


def _profusion_demo_graph() -> list:
    """make demo's second grid: ProFusion from ONE reference view of the held-out subject, no tuning (the untuned
    PromptNet rows are ProFusion's best in the one-image benchmark; README) - PromptNet Encode -> per new scene a
    Fusion Sampler in SamplerCustom."""
    graph = [
        _loader(MINI),
        (2, "PersonalizeLoadSubjectImages", {"folder": SUBJECT, "size": 64}, "Reference views (held-out subject)"),
        *_profusion_inputs(),
        (7, "PersonalizePromptNetEncode", {"image": (3, 0), "promptnet": (5, 0), "vae": (1, 2),
                                           "clip_vision": (4, 0)}, None),
        (8, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Unused (SamplerCustom needs a prompt)"),
        (9, "BasicScheduler", {"model": (1, 0), "scheduler": "ddim_uniform", "steps": MINI.ddim_steps,
                               "denoise": 1.0}, None),
        (10, "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}, None),
    ]
    decoded = []
    for k, scene in enumerate(MINI_SCENES):
        fs, samp, dec = 11 + 3 * k, 12 + 3 * k, 13 + 3 * k
        graph += [
            _fusion_sampler(fs, (5, 0), (7, 0), f"a photo of holder {scene}", f"Fusion Sampler: {scene}"),
            (samp, "SamplerCustom", {"model": (1, 0), "add_noise": True, "noise_seed": 7 + k, "cfg": MINI.cfg,
                                     "positive": (8, 0), "negative": (8, 0), "sampler": (fs, 0), "sigmas": (9, 0),
                                     "latent_image": (10, 0)}, None),
            (dec, "VAEDecode", {"samples": (samp, 0), "vae": (1, 2)}, None),
        ]
        decoded.append(dec)
    batch_id, previous = 30, decoded[0]
    for dec in decoded[1:]:
        graph.append((batch_id, "ImageBatch", {"image1": (previous, 0), "image2": (dec, 0)}, None))
        previous, batch_id = batch_id, batch_id + 1
    graph += [
        (40, "SaveImage", {"images": (previous, 0), "filename_prefix": "personalize/mini_world_demo_profusion"}, None),
        (41, "SaveImage", {"images": (3, 0), "filename_prefix": "personalize/mini_world_demo_profusion_references"},
         None),
    ]
    return graph


MINI_NOTE = (f"Runs offline, out of the box: the pack's mini model (64 px) and the subject the pack ships "
             f"(subjects/{SUBJECT}: four views of a mini-world subject the model never saw in pre-training), with "
             "the mini-world benchmark's settings. For a real model, open the _sd15 version of this workflow.")


def _sd15_note(what: str) -> str:
    return (f"Model: {SD15_CKPT} in models/checkpoints (the missing-model dialog offers the download), or choose "
            "any SD1.x checkpoint.\nYour subject: put 3-5 photos in a folder ComfyUI/input/<folder> (masks: "
            "<photo>_mask.png, white = subject, or the photos' alpha) and type <folder> in Subject photos; until "
            f"then it loads the pack's example subject ({SUBJECT}, 64 px renders).\n" + what)


METHODS = {
    "textual_inversion": ("Textual Inversion: learn a word for the subject, then use it in a prompt",
                          textual_inversion),
    "dreambooth_lora": ("DreamBooth-LoRA: fine-tune a LoRA on the subject, then sample with the tuned model",
                        dreambooth_lora),
    "hifi_subject_tune": ("HiFi Tuner: learn a subject, then place it in a new scene", hifi_subject_tune),
    "hifi_reference_guided": ("HiFi Tuner: sample, then sample again guided by a reference photo (Algorithm 2)",
                              hifi_reference_guided),
    "hifi_subject_replace": ("HiFi Tuner: replace the subject of a photo by a learned subject (Algorithm 3)",
                             hifi_subject_replace),
    "invert_image": ("Invert an image (DDIM + null-text), then reconstruct it with SamplerCustom", invert_image),
}


def _groups(method: str, t: Target) -> list:
    """[(group title, node ids, note or None)] of a method's workflow for target ``t``."""
    def first(what: str) -> str:
        return MINI_NOTE if t.name == "mini" else _sd15_note(what)

    if method == "textual_inversion":
        return [
            ("1. Learn a new word for the subject (Textual Inversion)", [1, 2, 3, 10, 11], first(
                "Set init_word to your subject's class word (dog, mug, ...). The word sks is saved as "
                "models/embeddings/<embedding_name>; any prompt can use it as embedding:<embedding_name>.")),
            ("2. Sample with the word", [4, 5, 6, 7, 8, 9], None),
        ]
    if method == "dreambooth_lora":
        return [
            ("1. Fine-tune a LoRA on the subject (DreamBooth)", [1, 2, 3, 11, 12], first(
                "Replace 'star' in instance_prompt and in the prompt by your subject's class word (dog, mug, ...). "
                "The LoRA is saved in models/loras; the stock Load LoRA node reads it.")),
            ("2. Sample with the tuned model", [4, 5, 6, 7, 8, 9], None),
        ]
    if method == "hifi_subject_tune":
        return [
            ("1. Learn the subject (HiFi Tuner)", [1, 2, 3, 16, 17], first(
                "Replace 'star' in the caption and the prompt by your subject's class word (dog, mug, ...). "
                "Settings: the paper's (1000 global steps; 10 per timestep of a 50-step DDIM schedule).")),
            ("2. Sample with the subject", [4, 5, 6, 7, 8, 9, 10], None),
            ("3. A later session: the saved subject without tuning (muted)", [11, 12, 13, 14, 15],
             "HiFi Subject Tune saves the subject in models/personalize/subjects. To reuse it later without tuning: "
             "unmute this group's nodes (select them, Ctrl+M), refresh the lists (R), and mute group 2 and HiFi "
             "Subject Tune."),
        ]
    if method == "hifi_reference_guided":
        return [
            ("1. Learn the subject (HiFi Tuner)", [1, 2, 3], first(
                "Replace 'star' in the caption and the prompts by your subject's class word.")),
            ("2. First pass: sample without guidance", [4, 5, 6, 7, 8, 9, 10, 11, 12], None),
            ("3. Second pass: guided by a reference photo", [13, 14, 15, 16, 17, 18, 19, 20],
             "Same seed, sigmas and cfg as the first pass. generated_mask marks the subject in the first image: here a "
             "fixed centre square; use a segmentation of that image (e.g. SAM)."),
        ]
    if method == "hifi_subject_replace":
        return [
            ("1. Learn the subject (HiFi Tuner)", [1, 2, 3], first(
                "Replace 'star' in the caption and in target_word by your subject's class word.")),
            ("2. The photo and the region to replace", [4, 8],
             f"subjects/{PHOTO}: photo.png and photo_mask.png (white = the region the new subject may take). For "
             "your own photo: a folder in ComfyUI/input with the photo and its mask; then write its caption in HiFi "
             "Subject Replace and the word of the thing to replace in source_word."),
            ("3. Replace the subject, keep the rest of the photo", [9, 10, 11, 12], None),
        ]
    if method == "invert_image":
        return [
            ("1. Invert the photo", [1, 2, 3, 4, 5, 6, 7, 8],
             "Invert Image finds the noise that DDIM sampling turns back into the photo, and null-text embeddings so "
             "that it also comes back with cfg.\n" + (MINI_NOTE if t.name == "mini" else (
                 f"Model: {SD15_CKPT} in models/checkpoints (the missing-model dialog offers the download). Your "
                 "photo: a folder in ComfyUI/input, named in Subject photos (the first photo is inverted); write "
                 "its caption in Caption (positive)."))),
            ("2. Reconstruct: same sigmas and cfg, no added noise", [9, 10, 11, 12], None),
        ]
    raise KeyError(method)


# name -> (title, demo?, nodes); a node is (id, type, {input: value | (src_id, slot)}, title[, {"mode": 2}])
GRAPHS = {
    "mini_world_sample": ("Sample the mini-world model (a small SD1-architecture model trained by the pack)", False, [
        (1, "PersonalizeLoadMiniModel", {"ckpt_name": MINI_CKPT}, "Load Mini Model (swap for Load Checkpoint)"),
        (2, "CLIPTextEncode", {"clip": (1, 1), "text": "a photo of a striped blue star on the beach"}, "Positive"),
        (3, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (4, "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 4}, None),
        (5, "KSampler", {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0),
                         "seed": 0, "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}, None),
        (6, "VAEDecode", {"samples": (5, 0), "vae": (1, 2)}, None),
        (7, "SaveImage", {"images": (6, 0), "filename_prefix": "personalize/mini_world_sample"}, None),
    ]),
    "mini_world_demo": ("Personalise a held-out mini-world subject (HiFi Tuner) and place it in new scenes "
                        "(make demo)", True, _mini_demo_graph()),
    "mini_world_demo_profusion": ("Personalise a held-out mini-world subject from ONE image (ProFusion: PromptNet "
                                  "and Fusion Sampling, no tuning) and place it in new scenes (make demo)", True,
                                  _profusion_demo_graph()),
    "profusion_encode_mini": ("ProFusion: one reference image, PromptNet's word in the prompt, Fusion Sampling "
                              "(the mini model, offline, no tuning)", False, profusion_encode_mini()),
    "profusion_tune_mini": ("ProFusion: tune PromptNet and the UNet's q/k/v on one image, then Fusion Sampling (the "
                            "mini model, offline)", False, profusion_tune_mini()),
}
for _method, (_title, _graph_of) in METHODS.items():
    for _kind, _target in TARGETS.items():
        GRAPHS[f"{_method}_{_kind}"] = (
            f"{_title} ({'the mini model, offline' if _kind == 'mini' else 'Stable Diffusion 1.5'})", False,
            _graph_of(_target))


def graph(name: str, target: Target | None = None) -> list:
    """The nodes of workflow ``name``; for a method's workflow (``<method>_mini``, ``<method>_sd15``) ``target``
    builds the same graph (same node ids, types and links) with another target's values (SD15_FAST, SD15_AT_64)."""
    if target is None:
        return GRAPHS[name][2]
    method, _, _kind = name.rpartition("_")
    return METHODS[method][1](target)


# name -> [(group title, node ids, note or None)]; a workflow without an entry is one band without a group.
GROUPS = {
    "mini_world_demo": [
        ("1. Learn a held-out subject (HiFi Tuner, mini model)", [1, 2, 3, 41],
         f"Runs offline on the pack's mini model (64 px) and the subject the pack ships (subjects/{SUBJECT}). HiFi "
         "Subject Tune learns the subject from its reference views; each scene prompt then names the subject's "
         f"class ({CLASS_WORD})."),
        ("2. Place it in new scenes", [4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 30, 31, 40], None),
    ],
    **{f"{m}_{k}": _groups(m, t) for m in METHODS for k, t in TARGETS.items()},
    "mini_world_demo_profusion": [
        ("1. One image of a held-out subject (ProFusion's PromptNet, mini model)", [1, 2, 3, 4, 5, 7, 41],
         f"Runs offline on the pack's mini model (64 px), its CLIP vision tower and the PromptNet pre-trained on the "
         f"mini world, with ONE view of the subject the pack ships (subjects/{SUBJECT}), never seen in pre-training. "
         "No tuning: PromptNet turns the view (and, at every step, the noisy image) into the subject's word."),
        ("2. Place it in new scenes (Fusion Sampling)", [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 30, 31, 40],
         "Each Fusion Sampler has the scene's prompt with 'holder' where the subject goes; SamplerCustom's own "
         "prompts and cfg are not used."),
    ],
    "profusion_encode_mini": [
        ("1. One reference image for PromptNet", [1, 2, 3, 4, 5, 6, 14],
         "Runs offline on the pack's mini model (64 px), its CLIP vision tower and the PromptNet pre-trained on the "
         f"mini world (models/promptnet), with one view of the subject the pack ships (subjects/{SUBJECT}). For a "
         "real model: Load Checkpoint, Load CLIP Vision and a PromptNet made for that checkpoint (the official one is "
         "SD2-base with OpenCLIP ViT-H/14: scripts/convert_profusion.py), 512 px."),
        ("2. Fusion Sampling with stock SamplerCustom", [7, 8, 9, 10, 11, 12, 13],
         "Write 'holder' where the subject goes and its class in class_word. PromptNet computes the subject's word "
         "at every step from the reference and the noisy image. SamplerCustom's own prompts and cfg are not used."),
    ],
    "profusion_tune_mini": [
        ("1. Tune PromptNet and the UNet's q/k/v on one image (ProFusion Tune)", [1, 2, 3, 4, 5, 6, 19, 20],
         "Runs offline on the pack's mini model (64 px), its CLIP vision tower and the PromptNet pre-trained on the "
         f"mini world, with one view of the subject the pack ships (subjects/{SUBJECT}): ProFusion Tune trains a "
         "copy of PromptNet and q/k/v deltas of the MODEL on it (lr 2e-5, batch 4 as official; 50 steps and no "
         "augmented copies, what the mini-world benchmark chose). The prompt names the photo's background, so the "
         "subject's word does not take it in."),
        ("2. Fusion Sampling with the tuned PromptNet and MODEL", [7, 8, 9, 10, 11, 12, 13, 14],
         "Encode the same image for the tuned PromptNet; sample with the tuned MODEL. SamplerCustom's own prompts "
         "and cfg are not used (the Fusion Sampler has its own)."),
        ("3. For comparison: the tuned MODEL alone, class-word prompt", [15, 16, 17, 18], None),
    ],
}


# Layout constants (canvas units). LiteGraph draws a node's title bar above ``pos``.
TITLE_H = 30
GAP_X, GAP_Y = 60, 30
GROUP_PAD, GROUP_TITLE_H, BAND_GAP = 20, 50, 50
NOTE_ID_BASE = 100
NOTE_WIDTH = 360
# Minimum sizes that leave room to read and use a node (a prompt box; the image a Save Image node shows).
MIN_SIZE = {"CLIPTextEncode": (400, 150), "SaveImage": (280, 300), "PersonalizeLossGraph": (280, 0)}
GROUP_COLOR = "#3f789e"


def _is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def node_types_in_use() -> set[str]:
    return {n[1] for _, _, graph in GRAPHS.values() for n in graph}


def titled_nodes_in_use() -> set[tuple[str, str]]:
    return {(n[1], n[3]) for _, _, graph in GRAPHS.values() for n in graph if n[3]}


def load_size_table(path: Path = SIZE_TABLE) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run scripts/measure_node_sizes.py")
    return json.loads(path.read_text(encoding="utf-8"))["nodes"]


def node_size(table: dict, ctype: str, title: str | None) -> list[int]:
    """The measured computeSize() of (type, title) plus a margin, at least ``MIN_SIZE``, in whole tens."""
    try:
        w, h = table[ctype][title or ""]
    except KeyError:
        raise SystemExit(f"scripts/node_sizes.json has no size for {ctype!r} titled {title!r}: "
                         "run scripts/measure_node_sizes.py") from None
    min_w, min_h = MIN_SIZE.get(ctype, (0, 0))
    w, h = max(w + 20, min_w), max(h + 10, min_h)
    return [int(-(-w // 10) * 10), int(-(-h // 10) * 10)]


def note_size(text: str) -> list[int]:
    chars_per_line = (NOTE_WIDTH - 30) // 7
    lines = sum(-(-max(len(part), 1) // chars_per_line) for part in text.split("\n"))
    return [NOTE_WIDTH, 40 + 18 * lines]


def columns(graph: list) -> dict:
    """Column of each node by data flow: one right of its rightmost source (longest path); then every node that
    feeds others moves right to just before its leftmost consumer, so short links stay short."""
    sources = {nid: [v[0] for v in values.values() if isinstance(v, tuple)] for nid, _, values, *_ in graph}
    consumers: dict = {nid: [] for nid in sources}
    for nid, srcs in sources.items():
        for s in srcs:
            consumers[s].append(nid)
    col: dict = {}

    def depth(nid):
        if nid not in col:
            col[nid] = 1 + max((depth(s) for s in sources[nid]), default=-1)
        return col[nid]

    for nid in sources:
        depth(nid)
    for nid in sorted(sources, key=lambda n: -col[n]):  # right to left: consumers are final before their sources
        if consumers[nid]:
            col[nid] = min(col[c] for c in consumers[nid]) - 1
    return col


def layout(name: str, graph: list, table: dict) -> tuple[dict, dict, list, list]:
    """Positions and sizes of the graph's nodes and notes, the groups, and the note nodes (id, text)."""
    col = columns(graph)
    sizes = {nid: node_size(table, ctype, title) for nid, ctype, _, title, *_ in graph}
    spec = GROUPS.get(name) or [(None, [n[0] for n in graph], None)]
    grouped = [nid for _, ids, _ in spec for nid in ids]
    if sorted(grouped) != sorted(sizes) or len(set(grouped)) != len(grouped):
        raise ValueError(f"{name}: GROUPS must name every node exactly once (nodes {sorted(sizes)}, "
                         f"grouped {sorted(grouped)})")
    notes = []
    bands = []  # (title, {column: [ids]})
    for k, (title, ids, note) in enumerate(spec):
        cols: dict = {}
        for nid in sorted(ids, key=[n[0] for n in graph].index):
            cols.setdefault(col[nid], []).append(nid)
        if note:
            note_id = NOTE_ID_BASE + k
            notes.append((note_id, note))
            sizes[note_id] = note_size(note)
            cols.setdefault(min(cols), []).insert(0, note_id)
        bands.append((title, cols))
    used = sorted({c for _, cols in bands for c in cols})
    width = {c: max(sizes[n][0] for _, cols in bands for n in cols.get(c, [])) for c in used}
    x_of, x = {}, GROUP_PAD
    for c in used:
        x_of[c] = x
        x += width[c] + GAP_X
    pos, groups, top = {}, [], 0
    for title, cols in bands:
        y0 = top + (GROUP_TITLE_H if title else GROUP_PAD) + TITLE_H
        bottom = y0
        for c, ids in cols.items():
            y = y0
            for nid in ids:
                pos[nid] = [x_of[c], y]
                bottom = max(bottom, y + sizes[nid][1])
                y += sizes[nid][1] + TITLE_H + GAP_Y
        bottom += GROUP_PAD
        if title:
            left = min(x_of[c] for c in cols) - GROUP_PAD
            right = max(pos[n][0] + sizes[n][0] for ids in cols.values() for n in ids) + GROUP_PAD
            groups.append({"id": len(groups) + 1, "title": title, "bounding": [left, top, right - left, bottom - top],
                           "color": GROUP_COLOR, "font_size": 24, "flags": {}})
        top = bottom + BAND_GAP
    return pos, sizes, groups, notes


def build(name: str, title: str, demo: bool, graph: list, mappings: dict, table: dict) -> dict:
    pos, sizes, groups, notes = layout(name, graph, table)
    nodes, links = [], []
    out_links: dict = {}
    link_id = 0
    by_id = {n[0]: n for n in graph}
    for order, (nid, ctype, values, ntitle, *options) in enumerate(graph):
        cls = mappings[ctype]
        spec = cls.INPUT_TYPES()
        inputs, widgets = [], []
        for section in ("required", "optional"):
            for name_, s in spec.get(section, {}).items():
                v = values.get(name_)
                if isinstance(v, tuple):
                    link_id += 1
                    src, slot = v
                    src_type = mappings[by_id[src][1]].RETURN_TYPES[slot]
                    links.append([link_id, src, slot, nid, len(inputs), src_type])
                    out_links.setdefault((src, slot), []).append(link_id)
                    entry = {"name": name_, "type": src_type, "link": link_id}
                    if _is_widget(s):
                        entry["widget"] = {"name": name_}
                    inputs.append(entry)
                    if _is_widget(s):
                        widgets.append(None)
                elif _is_widget(s):
                    if v is None:
                        v = s[1].get("default") if len(s) > 1 else None
                        if v is None and isinstance(s[0], list):
                            v = s[0][0]
                        if v is None and s[0] == "COMBO":  # V3 schema nodes: ("COMBO", {"options": [...]})
                            v = s[1]["options"][0]
                    widgets.append(v)
                    if name_ in ("seed", "noise_seed"):
                        widgets.append("fixed")
                elif section == "required":
                    raise ValueError(f"{ctype}.{name_} is not connected")
        properties = {"Node name for S&R": ctype}
        downloads = [MODEL_DOWNLOADS[v] for v in widgets if isinstance(v, str) and v in MODEL_DOWNLOADS]
        if downloads:  # what the frontend's missing-model dialog offers to download
            properties["models"] = downloads
        node = {"id": nid, "type": ctype, "pos": pos[nid], "size": sizes[nid], "flags": {}, "order": order,
                "mode": (options[0] if options else {}).get("mode", 0), "inputs": inputs, "outputs": [],
                "properties": properties, "widgets_values": widgets}
        if ntitle:
            node["title"] = ntitle
        nodes.append(node)
    for node in nodes:
        cls = mappings[node["type"]]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node["outputs"] = [{"name": n, "type": t, "links": out_links.get((node["id"], i), []), "slot_index": i}
                           for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
    for note_id, text in notes:  # frontend-only nodes: never sent to the server
        nodes.append({"id": note_id, "type": "Note", "pos": pos[note_id], "size": sizes[note_id], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    right = max(p[0] + sizes[i][0] for i, p in pos.items())
    bottom = max(p[1] + sizes[i][1] for i, p in pos.items())
    # Opened at a zoom where the frontend still draws text (it stops below ~0.6), left and top clear of its bars.
    scale = round(max(0.7, min(1.0, 1800 / (right + 40), 1000 / (bottom + 40))), 2)
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": groups, "config": {},
            "extra": {"personalize": {"demo": demo, "title": title}, "ds": {"scale": scale, "offset": [80, 60]}},
            "version": 0.4}


def main() -> None:
    import os
    import tempfile
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from harness.host import boot_scratch
    table = load_size_table()
    host = boot_scratch("build_workflows_")
    for stale in sorted((ROOT / "workflows").glob("*.json")):
        if stale.stem not in GRAPHS:
            stale.unlink()
            stale.with_suffix(".jpg").unlink(missing_ok=True)
            log.info("removed workflows/%s and its thumbnail", stale.name)
    for name, (title, demo, nodes) in GRAPHS.items():
        wf = build(name, title, demo, nodes, host.nodes.NODE_CLASS_MAPPINGS, table)
        target = ROOT / "workflows" / f"{name}.json"
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(wf, indent=1) + "\n")
        os.replace(tmp, target)
        log.info("wrote workflows/%s.json", name)


if __name__ == "__main__":
    main()

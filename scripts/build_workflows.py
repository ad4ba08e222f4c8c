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
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)
SIZE_TABLE = ROOT / "scripts" / "node_sizes.json"

DEMO_CKPT = "personalize_test_sd15.safetensors"
MINI_CKPT = "mini_world.safetensors"  # the trained mini family shipped in the pack's models/ (make mini-world)
MINI_SUBJECT = "personalize_mini_demo_subject"  # harness.subjects.write_heldout_subject_folder: a held-out subject
MINI_CLASS = "star"
MINI_SCENES = ("on the grass", "in the snow", "under the night sky")



def _hifi_tune(**inputs) -> dict:
    """HiFi Subject Tune's inputs wired to nodes 1 (a loader) and 2 (Load Subject Images), with the short test
    settings unless ``inputs`` say otherwise."""
    return {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0), "mask": (2, 1),
            "caption": "a photo of an object", "n_tokens": 5, "global_steps": 4, "steps_per_step": 1,
            "learning_rate": 0.005, "reg_weight": 0.005, "use_mask": True, "use_regularisation": True,
            "use_stepwise": True, "seed": 0, "overwrite": True, "batch_size": 1, "gradient_checkpointing": False,
            "mixed_precision": "auto", **inputs}

def _mini_demo_graph() -> list:
    """Load Mini Model -> Load Subject Images -> HiFi Subject Tune (masked) -> per new scene: the class prompt with
    the subject's rows (HiFi Subject Conditioning) -> KSampler (ddim_uniform, the tuned timesteps) -> one batch."""
    graph = [
        (1, "PersonalizeLoadMiniModel", {"ckpt_name": MINI_CKPT}, "Load Mini Model (swap for Load Checkpoint)"),
        (2, "PersonalizeLoadSubjectImages", {"folder": MINI_SUBJECT, "size": 64}, "Reference views (held-out subject)"),
        (3, "PersonalizeHiFiSubjectTune", _hifi_tune(
            caption=f"a photo of a {MINI_CLASS}", global_steps=300, steps_per_step=3, sampling_steps=20,
            learning_rate=0.02, subject_name="mini_demo_subject", batch_size=2), None),
        (4, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (5, "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}, None),
    ]
    decoded = []
    for k, scene in enumerate(MINI_SCENES):
        enc, cond, samp, dec = 10 + 4 * k, 11 + 4 * k, 12 + 4 * k, 13 + 4 * k
        graph += [
            (enc, "CLIPTextEncode", {"clip": (1, 1), "text": f"a photo of a {MINI_CLASS} {scene}"}, f"Positive: {scene}"),
            (cond, "PersonalizeHiFiSubjectConditioning", {"conditioning": (enc, 0), "subject": (3, 0),
                                                          "use_stepwise": True}, None),
            (samp, "KSampler", {"model": (1, 0), "positive": (cond, 0), "negative": (4, 0), "latent_image": (5, 0),
                                "seed": 7 + k, "steps": 20, "cfg": 5.0, "sampler_name": "ddim",
                                "scheduler": "ddim_uniform", "denoise": 1.0}, None),
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
SUBJECT = "personalize_demo_subject"
NEG = "blurry, low quality"

# name -> (title, demo?, nodes); a node is (id, type, {input: value | (src_id, slot)}, title)
GRAPHS = {
    "textual_inversion": ("Train a subject embedding, then use it in a prompt", False, [
        (1, "CheckpointLoaderSimple", {"ckpt_name": DEMO_CKPT}, None),
        (2, "PersonalizeLoadSubjectImages", {"folder": SUBJECT, "size": 64}, None),
        (3, "PersonalizeTrainSubjectEmbedding", {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0),
                                                 "mask": (2, 1), "placeholder": "sks", "init_word": "object",
                                                 "steps": 20, "learning_rate": 0.02, "batch_size": 1, "seed": 0,
                                                 "embedding_name": "demo_subject", "overwrite": True,
                                                 "gradient_checkpointing": False, "mixed_precision": "auto",
                                                 "preview_every": 10}, None),
        (4, "CLIPTextEncode", {"clip": (3, 0), "text": "a photo of sks on the beach"}, "Positive (uses sks)"),
        (5, "CLIPTextEncode", {"clip": (1, 1), "text": NEG}, "Negative"),
        (6, "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}, None),
        (7, "KSampler", {"model": (1, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0),
                         "seed": 42, "steps": 8, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}, None),
        (8, "VAEDecode", {"samples": (7, 0), "vae": (1, 2)}, None),
        (9, "SaveImage", {"images": (8, 0), "filename_prefix": "personalize/textual_inversion"}, None),
        (10, "PersonalizeLossGraph", {"loss": (3, 2), "width": 512, "height": 256}, None),
        (11, "SaveImage", {"images": (10, 0), "filename_prefix": "personalize/textual_inversion_loss"}, None),
    ]),
    "dreambooth_lora": ("Train a subject LoRA (DreamBooth), then sample with the tuned model", False, [
        (1, "CheckpointLoaderSimple", {"ckpt_name": DEMO_CKPT}, None),
        (2, "PersonalizeLoadSubjectImages", {"folder": SUBJECT, "size": 64}, None),
        (3, "PersonalizeTrainSubjectLoRA", {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "images": (2, 0),
                                            "mask": (2, 1), "instance_prompt": "a photo of sks object", "rank": 4,
                                            "steps": 20, "learning_rate": 0.001, "batch_size": 1, "seed": 0,
                                            "layers": "attention", "train_text_encoder": False,
                                            "lora_name": "demo_subject_lora", "overwrite": True,
                                            "gradient_checkpointing": False, "mixed_precision": "auto",
                                            "preview_every": 10, "class_prompt": "", "prior_loss_weight": 1.0,
                                            "alpha": 0.0}, None),
        (4, "CLIPTextEncode", {"clip": (3, 1), "text": "a photo of sks object in the snow"}, "Positive"),
        (5, "CLIPTextEncode", {"clip": (3, 1), "text": NEG}, "Negative"),
        (6, "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}, None),
        (7, "KSampler", {"model": (3, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0),
                         "seed": 42, "steps": 8, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}, None),
        (8, "VAEDecode", {"samples": (7, 0), "vae": (1, 2)}, None),
        (9, "SaveImage", {"images": (8, 0), "filename_prefix": "personalize/dreambooth_lora"}, None),
        (10, "SaveImage", {"images": (3, 4), "filename_prefix": "personalize/dreambooth_lora_previews"}, None),
        (11, "PersonalizeLossGraph", {"loss": (3, 3), "width": 512, "height": 256}, None),
        (12, "SaveImage", {"images": (11, 0), "filename_prefix": "personalize/dreambooth_lora_loss"}, None),
    ]),
    "hifi_subject_tune": ("HiFi Tuner: learn a subject, sample with it; reload the saved file and sample again", False, [
        (1, "CheckpointLoaderSimple", {"ckpt_name": DEMO_CKPT}, None),
        (2, "PersonalizeLoadSubjectImages", {"folder": SUBJECT, "size": 64}, None),
        (3, "PersonalizeHiFiSubjectTune", _hifi_tune(sampling_steps=4, subject_name="hifi_test_subject"), None),
        (4, "CLIPTextEncode", {"clip": (1, 1), "text": "a photo of an object on the beach"}, "Positive (class noun)"),
        (5, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (6, "PersonalizeHiFiSubjectConditioning", {"conditioning": (4, 0), "subject": (3, 0), "use_stepwise": True},
         None),
        (7, "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}, None),
        (8, "KSampler", {"model": (1, 0), "positive": (6, 0), "negative": (5, 0), "latent_image": (7, 0),
                         "seed": 42, "steps": 4, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
                         "denoise": 1.0}, None),
        (9, "VAEDecode", {"samples": (8, 0), "vae": (1, 2)}, None),
        (10, "SaveImage", {"images": (9, 0), "filename_prefix": "personalize/hifi_subject_tune"}, None),
        (11, "PersonalizeHiFiLoadSubject", {"subject_file": "hifi_test_subject.safetensors",
                                            "subject_file_name": (3, 2)}, "Reload the saved file"),
        (12, "PersonalizeHiFiSubjectConditioning", {"conditioning": (4, 0), "subject": (11, 0),
                                                    "use_stepwise": False}, "Global rows only"),
        (13, "KSampler", {"model": (1, 0), "positive": (12, 0), "negative": (5, 0), "latent_image": (7, 0),
                          "seed": 42, "steps": 4, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                          "denoise": 1.0}, None),
        (14, "VAEDecode", {"samples": (13, 0), "vae": (1, 2)}, None),
        (15, "SaveImage", {"images": (14, 0), "filename_prefix": "personalize/hifi_subject_reload"}, None),
        (16, "PersonalizeLossGraph", {"loss": (3, 1), "width": 512, "height": 256}, None),
        (17, "SaveImage", {"images": (16, 0), "filename_prefix": "personalize/hifi_subject_tune_loss"}, None),
    ]),
    "invert_image": ("Invert an image (DDIM + null-text), then reconstruct it with SamplerCustom", False, [
        (1, "CheckpointLoaderSimple", {"ckpt_name": DEMO_CKPT}, None),
        (2, "PersonalizeLoadSubjectImages", {"folder": SUBJECT, "size": 64}, None),
        (3, "ImageFromBatch", {"image": (2, 0), "batch_index": 0, "length": 1}, None),
        (4, "VAEEncode", {"pixels": (3, 0), "vae": (1, 2)}, None),
        (5, "CLIPTextEncode", {"clip": (1, 1), "text": "a photo of an object"}, "Caption (positive)"),
        (6, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (7, "BasicScheduler", {"model": (1, 0), "scheduler": "normal", "steps": 8, "denoise": 1.0}, None),
        (8, "PersonalizeInvertImage", {"model": (1, 0), "positive": (5, 0), "negative": (6, 0), "latent": (4, 0),
                                       "sigmas": (7, 0), "cfg": 7.5, "null_text_steps": 5, "learning_rate": 0.01,
                                       "fixed_point_iterations": 0, "early_stop": 1e-5}, None),
        (9, "SamplerCustom", {"model": (1, 0), "add_noise": False, "noise_seed": 0, "cfg": 7.5, "positive": (5, 0),
                              "negative": (6, 0), "sampler": (8, 2), "sigmas": (7, 0), "latent_image": (8, 0)},
         "Reconstruct (same sigmas and cfg)"),
        (10, "VAEDecode", {"samples": (9, 0), "vae": (1, 2)}, None),
        (11, "SaveImage", {"images": (10, 0), "filename_prefix": "personalize/invert_image_reconstruction"}, None),
        (12, "SaveImage", {"images": (3, 0), "filename_prefix": "personalize/invert_image_input"}, None),
    ]),
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
    "hifi_reference_guided": ("HiFi Tuner: sample, then sample again guided by a reference photo (Algorithm 2)", False, [
        (1, "CheckpointLoaderSimple", {"ckpt_name": DEMO_CKPT}, None),
        (2, "PersonalizeLoadSubjectImages", {"folder": SUBJECT, "size": 64}, None),
        (3, "PersonalizeHiFiSubjectTune", _hifi_tune(sampling_steps=10, subject_name="hifi_reference_demo_subject"),
         None),
        (4, "CLIPTextEncode", {"clip": (1, 1), "text": "a photo of an object on the beach"}, "Positive (class noun)"),
        (5, "CLIPTextEncode", {"clip": (1, 1), "text": ""}, "Negative (empty prompt)"),
        (6, "PersonalizeHiFiSubjectConditioning", {"conditioning": (4, 0), "subject": (3, 0), "use_stepwise": True},
         None),
        (7, "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}, None),
        (8, "BasicScheduler", {"model": (1, 0), "scheduler": "ddim_uniform", "steps": 10, "denoise": 1.0}, None),
        (9, "KSamplerSelect", {"sampler_name": "euler"}, "DDIM (= euler on these sigmas)"),
        (10, "SamplerCustom", {"model": (1, 0), "add_noise": True, "noise_seed": 42, "cfg": 7.5, "positive": (6, 0),
                               "negative": (5, 0), "sampler": (9, 0), "sigmas": (8, 0), "latent_image": (7, 0)},
         "1st pass: unguided"),
        (11, "VAEDecode", {"samples": (10, 0), "vae": (1, 2)}, None),
        (12, "SaveImage", {"images": (11, 0), "filename_prefix": "personalize/hifi_reference_unguided"}, None),
        (13, "SolidMask", {"value": 0.0, "width": 64, "height": 64}, None),
        (14, "SolidMask", {"value": 1.0, "width": 32, "height": 32}, None),
        (15, "MaskComposite", {"destination": (13, 0), "source": (14, 0), "x": 16, "y": 16, "operation": "add"},
         "Generated-subject mask (a stand-in)"),
        (16, "CLIPTextEncode", {"clip": (1, 1), "text": "a photo of an object"}, "Reference caption"),
        (17, "PersonalizeHiFiReferenceGuidedSampler", {"model": (1, 0), "vae": (1, 2), "subject": (3, 0),
                                                       "reference_conditioning": (16, 0), "sigmas": (8, 0),
                                                       "reference_images": (2, 0), "reference_masks": (2, 1),
                                                       "generated_mask": (15, 0), "t_start": 8, "t_end": 2,
                                                       "inner_steps": 3, "learning_rate": 0.01,
                                                       "reference_index": 0, "generated_image": (11, 0)}, None),
        (18, "SamplerCustom", {"model": (1, 0), "add_noise": True, "noise_seed": 42, "cfg": 7.5, "positive": (6, 0),
                               "negative": (5, 0), "sampler": (17, 0), "sigmas": (8, 0), "latent_image": (7, 0)},
         "2nd pass: same seed, reference-guided"),
        (19, "VAEDecode", {"samples": (18, 0), "vae": (1, 2)}, None),
        (20, "SaveImage", {"images": (19, 0), "filename_prefix": "personalize/hifi_reference_guided"}, None),
    ]),
    "hifi_subject_replace": ("HiFi Tuner: replace the subject of a photo by a learned subject (Algorithm 3)", False, [
        (1, "CheckpointLoaderSimple", {"ckpt_name": DEMO_CKPT}, None),
        (2, "PersonalizeLoadSubjectImages", {"folder": SUBJECT, "size": 64}, None),
        (3, "PersonalizeHiFiSubjectTune", _hifi_tune(sampling_steps=6, subject_name="hifi_replace_demo_subject"), None),
        (4, "ImageFromBatch", {"image": (2, 0), "batch_index": 1, "length": 1}, "The photo"),
        (5, "MaskToImage", {"mask": (2, 1)}, None),
        (6, "ImageFromBatch", {"image": (5, 0), "batch_index": 1, "length": 1}, None),
        (7, "ImageToMask", {"image": (6, 0), "channel": "red"}, "Mask of the subject to replace"),
        (8, "BasicScheduler", {"model": (1, 0), "scheduler": "ddim_uniform", "steps": 6, "denoise": 1.0}, None),
        (9, "PersonalizeHiFiSubjectReplace", {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "image": (4, 0),
                                              "mask": (7, 0), "caption": "a photo of an object on the grass",
                                              "source_word": "object", "target_word": "object", "sigmas": (8, 0),
                                              "cfg": 7.5, "null_text_steps": 8, "learning_rate": 0.1,
                                              "cross_replace": 0.8, "subject": (3, 0), "use_stepwise": True}, None),
        (10, "ImageCompositeMasked", {"destination": (4, 0), "source": (9, 0), "x": 0, "y": 0,
                                      "resize_source": False, "mask": (7, 0)}, "Keep the photo outside the mask"),
        (11, "SaveImage", {"images": (9, 0), "filename_prefix": "personalize/hifi_subject_replace"}, None),
        (12, "SaveImage", {"images": (10, 0), "filename_prefix": "personalize/hifi_subject_replace_composite"}, None),
    ]),
}


# name -> [(group title, node ids, note or None)]; a workflow without an entry is one band without a group.
GROUPS = {
    "textual_inversion": [
        ("1. Learn a new word for the subject (Textual Inversion)", [1, 2, 3, 10, 11],
         "Put 3-5 photos of your subject in a folder under ComfyUI/input (masks: <name>_mask.png or the photos' "
         "alpha). The node learns the placeholder word (sks) and saves models/embeddings/<embedding_name>; "
         "any prompt can then use it as embedding:<embedding_name>."),
        ("2. Sample with the word", [4, 5, 6, 7, 8, 9], None),
    ],
    "dreambooth_lora": [
        ("1. Fine-tune a LoRA on the subject (DreamBooth)", [1, 2, 3, 10, 11, 12],
         "Put 3-5 photos of your subject in a folder under ComfyUI/input. The instance prompt names it (sks). "
         "The node outputs the tuned model and clip and saves models/loras/<lora_name>, which the stock Load LoRA "
         "node reads."),
        ("2. Sample with the tuned model", [4, 5, 6, 7, 8, 9], None),
    ],
    "hifi_subject_tune": [
        ("1. Learn the subject (HiFi Tuner)", [1, 2, 3, 16, 17],
         "HiFi Subject Tune learns prompt rows for your subject from the photos and masks in a folder under "
         "ComfyUI/input. Write prompts with the subject's class word (here: object)."),
        ("2. Sample with the subject", [4, 5, 6, 7, 8, 9, 10], None),
        ("3. Reload the saved subject file and sample again", [11, 12, 13, 14, 15],
         "The subject is saved in models/personalize/subjects. In a later session, pick the file in HiFi Load "
         "Subject and disconnect subject_file_name."),
    ],
    "invert_image": [
        ("1. Invert the photo", [1, 2, 3, 4, 5, 6, 7, 8],
         "Invert Image finds the noise that DDIM sampling turns back into the photo, and null-text embeddings so "
         "that it also comes back with cfg."),
        ("2. Reconstruct: same sigmas and cfg, no added noise", [9, 10, 11, 12], None),
    ],
    "mini_world_demo": [
        ("1. Learn a held-out subject (HiFi Tuner, mini model)", [1, 2, 3, 41],
         "Runs offline on the pack's mini model (64 px). HiFi Subject Tune learns the subject from its reference "
         "views; each scene prompt then names the subject's class (star)."),
        ("2. Place it in new scenes", [4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 30, 31, 40], None),
    ],
    "hifi_reference_guided": [
        ("1. Learn the subject (HiFi Tuner)", [1, 2, 3], None),
        ("2. First pass: sample without guidance", [4, 5, 6, 7, 8, 9, 10, 11, 12], None),
        ("3. Second pass: guided by a reference photo", [13, 14, 15, 16, 17, 18, 19, 20],
         "Same seed, sigmas and cfg as the first pass. generated_mask marks the subject in the first image: here a "
         "fixed square; use a segmentation of that image (e.g. SAM)."),
    ],
    "hifi_subject_replace": [
        ("1. Learn the subject (HiFi Tuner)", [1, 2, 3], None),
        ("2. The photo and the region to replace", [4, 5, 6, 7, 8], None),
        ("3. Replace the subject, keep the rest of the photo", [9, 10, 11, 12], None),
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
    sources = {nid: [v[0] for v in values.values() if isinstance(v, tuple)] for nid, _, values, _ in graph}
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
    sizes = {nid: node_size(table, ctype, title) for nid, ctype, _, title in graph}
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
    for order, (nid, ctype, values, ntitle) in enumerate(graph):
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
        node = {"id": nid, "type": ctype, "pos": pos[nid], "size": sizes[nid], "flags": {}, "order": order,
                "mode": 0, "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": ctype},
                "widgets_values": widgets}
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

    from harness.host import boot_scratch
    table = load_size_table()
    host = boot_scratch("build_workflows_")
    for name, (title, demo, graph) in GRAPHS.items():
        wf = build(name, title, demo, graph, host.nodes.NODE_CLASS_MAPPINGS, table)
        target = ROOT / "workflows" / f"{name}.json"
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(wf, indent=1) + "\n")
        os.replace(tmp, target)
        print(f"wrote workflows/{name}.json")  # noqa: T201 - script output


if __name__ == "__main__":
    main()

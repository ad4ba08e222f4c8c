"""Regenerate the UI-format workflows in workflows/ from compact graph descriptions.

The files are what ComfyUI's "Save" writes (nodes, links, widgets_values in INPUT_TYPES order, a seed control
value after seed widgets), so they load in the UI and in the test harness alike. Run after changing a node's
inputs:  .venv/bin/python scripts/build_workflows.py   (boots the default host to read INPUT_TYPES)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)

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
         "Generated-subject mask (replace by a segmentation of the 1st pass, e.g. SAM)"),
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


def _is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN")


def build(title: str, demo: bool, graph: list, mappings: dict) -> dict:
    nodes, links = [], []
    out_links: dict = {}
    link_id = 0
    by_id = {n[0]: n for n in graph}
    for order, (nid, ctype, values, ntitle) in enumerate(graph):
        cls = mappings[ctype]
        spec = cls.INPUT_TYPES()
        inputs, widgets = [], []
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                v = values.get(name)
                if isinstance(v, tuple):
                    link_id += 1
                    src, slot = v
                    src_type = mappings[by_id[src][1]].RETURN_TYPES[slot]
                    links.append([link_id, src, slot, nid, len(inputs), src_type])
                    out_links.setdefault((src, slot), []).append(link_id)
                    entry = {"name": name, "type": src_type, "link": link_id}
                    if _is_widget(s):
                        entry["widget"] = {"name": name}
                    inputs.append(entry)
                    if _is_widget(s):
                        widgets.append(None)
                elif _is_widget(s):
                    if v is None:
                        v = s[1].get("default") if len(s) > 1 else None
                        if v is None and isinstance(s[0], list):
                            v = s[0][0]
                    widgets.append(v)
                    if name in ("seed", "noise_seed"):
                        widgets.append("fixed")
                elif section == "required":
                    raise ValueError(f"{ctype}.{name} is not connected")
        node = {"id": nid, "type": ctype, "pos": [40 + 330 * (order % 4), 60 + 320 * (order // 4)],
                "size": [300, 120], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                "outputs": [], "properties": {"Node name for S&R": ctype}, "widgets_values": widgets}
        if ntitle:
            node["title"] = ntitle
        nodes.append(node)
    for node in nodes:
        cls = mappings[node["type"]]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node["outputs"] = [{"name": n, "type": t, "links": out_links.get((node["id"], i), []), "slot_index": i}
                           for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {},
            "extra": {"personalize": {"demo": demo, "title": title}, "ds": {"scale": 1, "offset": [0, 0]}},
            "version": 0.4}


def main() -> None:
    from harness.host import boot_scratch
    host = boot_scratch("build_workflows_")
    for name, (title, demo, graph) in GRAPHS.items():
        wf = build(title, demo, graph, host.nodes.NODE_CLASS_MAPPINGS)
        (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
        print(f"wrote workflows/{name}.json")  # noqa: T201 - script output


if __name__ == "__main__":
    main()

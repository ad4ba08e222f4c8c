"""HiFi Tuner nodes: learn a subject representation, load it, and turn it into CONDITIONING for stock samplers."""
from __future__ import annotations

import os

from ..core.host import PersonalizeError
from ..methods import hifi_tuner, reference_guidance, subject_replace
from . import sockets as S

SUBJECT = "HIFI_SUBJECT"

hifi_tuner.register_subject_folder()  # a folder_paths entry only (models/personalize/subjects); no file system work


class HiFiSubjectTune:
    DESCRIPTION = ("HiFi Tuner subject learning: learns n rows of the encoded prompt (its padding tail) for your "
                   "subject from a few photos and masks, with a masked loss, a pull toward the empty prompt's tail, "
                   "and then one row set per sampling step. Use the result with HiFi Subject Conditioning.")
    CATEGORY = S.CATEGORY + "/hifi_tuner"
    FUNCTION = "tune"
    RETURN_TYPES = (SUBJECT, S.LOSS_MAP, "STRING")
    RETURN_NAMES = ("subject", "loss", "subject_file")
    OUTPUT_TOOLTIPS = ("The learned subject (global + step-wise rows); connect to HiFi Subject Conditioning.",
                       "Loss per step, global phase then step-wise phase (plot it with Personalize Loss Graph).",
                       "Name of the saved file in models/personalize/subjects (HiFi Load Subject reads it).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP", {"tooltip": "Frozen: the caption and the empty prompt are encoded once."}),
                "vae": ("VAE",),
                "images": ("IMAGE", {"tooltip": "3-5 photos of the subject."}),
                "caption": ("STRING", {"default": "a photo of an object", "multiline": False,
                                       "tooltip": "Training caption 'a photo of a <class noun>' (e.g. 'a photo of a "
                                                  "dog'); the subject rows replace its padding tail. Not given by the "
                                                  "paper (UNCONFIRMED)."}),
                "n_tokens": ("INT", {"default": 5, "min": 1, "max": 70,
                                     "tooltip": "Tail rows of the encoded prompt that represent the subject (paper: 5)."}),
                "global_steps": S.steps(1000, "Steps of the global representation, t uniform over 0..999 (paper: 1000)."),
                "steps_per_step": ("INT", {"default": 10, "min": 1, "max": 1000,
                                           "tooltip": "Steps per sampling timestep for the step-wise rows (paper: 10)."}),
                "sampling_steps": ("INT", {"default": 50, "min": 1, "max": 999,
                                           "tooltip": "DDIM steps whose timesteps get their own rows (paper: 50). "
                                                      "Sample with ddim_uniform and this many steps to hit them exactly."}),
                "learning_rate": ("FLOAT", {"default": 5e-3, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                                            "tooltip": "Adam learning rate (paper: 5e-3). A fresh Adam per timestep."}),
                "reg_weight": ("FLOAT", {"default": hifi_tuner.REG_WEIGHT, "min": 0.0, "max": 100.0, "step": 1e-4,
                                         "round": False,
                                         "tooltip": "Weight w_s of the pull toward the empty prompt's tail (mean "
                                                    "squared distance). UNCONFIRMED: the paper gives no value; 5e-3 "
                                                    "is our default, the smallest weight that kept the prompt's "
                                                    "scene as well as plain text does in a sweep on the mini world "
                                                    "(README). Higher keeps the scene, lower the subject."}),
                "use_mask": ("BOOLEAN", {"default": True, "tooltip": "Count the loss only inside the subject masks."}),
                "use_regularisation": ("BOOLEAN", {"default": True,
                                                   "tooltip": "Pull the rows toward the empty prompt's tail."}),
                "use_stepwise": ("BOOLEAN", {"default": True,
                                             "tooltip": "Also learn one row set per sampling timestep (Algorithm 1)."}),
                "seed": S.seed(),
                "subject_name": ("STRING", {"default": "my_subject",
                                            "tooltip": "File name in models/personalize/subjects."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Subject masks, one per image (or one for all); needed when use_mask is on."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Images per step (the paper does not say; 1)."}),
                "gradient_checkpointing": S.training_options()["gradient_checkpointing"],
                "mixed_precision": S.training_options()["mixed_precision"],
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def tune(self, model, clip, vae, images, caption, n_tokens, global_steps, steps_per_step, sampling_steps,
             learning_rate, reg_weight, use_mask, use_regularisation, use_stepwise, seed, subject_name, overwrite,
             mask=None, batch_size=1, gradient_checkpointing=False, mixed_precision="auto", unique_id=None):
        subject = hifi_tuner.learn_subject(
            model, clip, vae, images, mask, caption, n_tokens=n_tokens, global_steps=global_steps,
            steps_per_step=steps_per_step, sampling_steps=sampling_steps, lr=learning_rate, reg_weight=reg_weight,
            use_mask=use_mask, use_reg=use_regularisation, use_stepwise=use_stepwise, seed=seed,
            batch_size=batch_size, gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
            save_as=subject_name, overwrite=overwrite, node_id=unique_id)
        return (subject, subject.tuning.loss_map(), subject.path.name)


class HiFiSubjectConditioning:
    DESCRIPTION = ("Puts a HiFi subject into a prompt's CONDITIONING for any stock sampler: the subject rows "
                   "replace the prompt's padding tail. With use_stepwise, each sampling step gets the rows learned "
                   "for the nearest training timestep (timestep ranges that tile the whole schedule).")
    CATEGORY = S.CATEGORY + "/hifi_tuner"
    FUNCTION = "apply"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The positive prompt, naming the subject's class "
                                                         "(e.g. 'a dog on the beach')."}),
            "subject": (SUBJECT,),
            "use_stepwise": ("BOOLEAN", {"default": True,
                                         "tooltip": "Use the per-timestep rows (off: the global rows at every step)."}),
        }}

    def apply(self, conditioning, subject, use_stepwise):
        return (hifi_tuner.subject_conditioning(conditioning, subject, use_stepwise),)


class HiFiLoadSubject:
    DESCRIPTION = "Loads a subject saved by HiFi Subject Tune from models/personalize/subjects."
    CATEGORY = S.CATEGORY + "/hifi_tuner"
    FUNCTION = "load"
    RETURN_TYPES = (SUBJECT,)
    RETURN_NAMES = ("subject",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {
            "required": {"subject_file": (folder_paths.get_filename_list(hifi_tuner.SUBJECT_FOLDER),
                                          {"tooltip": "A file in models/personalize/subjects."})},
            "optional": {"subject_file_name": ("STRING", {"forceInput": True,
                                                          "tooltip": "Overrides the list with a file name from another "
                                                                     "node, e.g. HiFi Subject Tune's subject_file (train, "
                                                                     "save and reload in one run)."})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, subject_file):
        # Replaces the executor's "value in list" check so that a file written earlier in the same run (see
        # subject_file_name) validates; existence is checked when the node runs, with an error that names the fix.
        try:
            hifi_tuner.subject_path(subject_file)
        except PersonalizeError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, subject_file, subject_file_name=None):
        try:
            return os.path.getmtime(hifi_tuner.subject_path(subject_file_name or subject_file))
        except (OSError, PersonalizeError):
            return ""

    def load(self, subject_file, subject_file_name=None):
        return (hifi_tuner.load_subject(subject_file_name or subject_file),)


class HiFiReferenceGuidedSampler:
    DESCRIPTION = ("HiFi Tuner reference-guided generation (Algorithm 2): a SAMPLER for SamplerCustom (or "
                   "SamplerCustomAdvanced) that pulls the subject region of the image toward a reference photo. "
                   "Workflow: sample once without it, segment the subject of that image (generated_mask), then "
                   "sample again with this sampler, the same seed, SIGMAS and cfg. The reference is aligned to the "
                   "generated mask (similarity transform), inverted, pasted into the region at t_start, and the "
                   "negative-prompt embedding of the region is optimised from t_start to t_end.")
    CATEGORY = S.CATEGORY + "/hifi_tuner"
    FUNCTION = "build"
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("Deterministic DDIM sampler with reference guidance; use with the SIGMAS given here.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model you sample with (the reference is inverted with it)."}),
                "vae": ("VAE",),
                "subject": (SUBJECT, {"tooltip": "The HiFi subject; its rows go into the reference caption's tail "
                                                 "for the inversion."}),
                "reference_conditioning": ("CONDITIONING", {
                    "tooltip": "A caption of the reference photos (paper: BLIP-2), e.g. 'a photo of a dog'."}),
                "sigmas": ("SIGMAS", {"tooltip": "The schedule you sample with (the same SIGMAS into SamplerCustom)."}),
                "reference_images": ("IMAGE", {"tooltip": "Photos of the subject (e.g. the training photos)."}),
                "reference_masks": ("MASK", {"tooltip": "The subject's mask in each reference photo."}),
                "generated_mask": ("MASK", {"tooltip": "The subject's mask in the first, unguided image (paper: "
                                                       "Grounding SAM), at the generated image's size."}),
                "t_start": ("INT", {"default": 40, "min": 1, "max": 999,
                                    "tooltip": "Step (counted down from the number of steps) at which the reference "
                                               "is pasted and guidance starts (paper: 40 of 50)."}),
                "t_end": ("INT", {"default": 10, "min": 1, "max": 999,
                                  "tooltip": "Last guided step, counted down (paper: 10 of 50)."}),
                "inner_steps": ("INT", {"default": 10, "min": 0, "max": 100,
                                        "tooltip": "Adam steps on the null-text embedding per guided step (paper "
                                                   "J = 10): more follows the reference closer, fewer varies more."}),
                "learning_rate": ("FLOAT", {"default": 1e-2, "min": 1e-6, "max": 1.0, "step": 1e-4, "round": False,
                                            "tooltip": "Adam learning rate of the null-text embedding (paper 1e-2)."}),
            },
            "optional": {
                "reference_index": ("INT", {"default": 0, "min": 0, "max": 63,
                                            "tooltip": "Which reference to use when no CLIP vision model chooses."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "Chooses the reference most similar to generated_image "
                                                           "(the paper uses DINO for this)."}),
                "generated_image": ("IMAGE", {"tooltip": "The first, unguided image (for the CLIP vision choice)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def build(self, model, vae, subject, reference_conditioning, sigmas, reference_images, reference_masks,
              generated_mask, t_start, t_end, inner_steps, learning_rate, reference_index=0, clip_vision=None,
              generated_image=None, unique_id=None):
        guidance = reference_guidance.prepare_guidance(
            model, vae, reference_conditioning, subject, sigmas, reference_images, reference_masks, generated_mask,
            t_start=t_start, t_end=t_end, inner_steps=inner_steps, lr=learning_rate,
            reference_index=reference_index, clip_vision=clip_vision, generated_image=generated_image,
            node_id=unique_id)
        return (reference_guidance.reference_guided_sampler(guidance),)


class HiFiSubjectReplace:
    DESCRIPTION = ("HiFi Tuner subject replacement (Algorithm 3): replaces the subject of a photo by your HiFi subject "
                   "and keeps the rest. The photo is inverted with null-text inversion under its caption; then it is "
                   "regenerated with the source word swapped for the subject's class word and the subject rows in the "
                   "prompt, reusing the photo's cross-attention maps for every other word (prompt-to-prompt), and "
                   "keeping the photo outside the mask.")
    CATEGORY = S.CATEGORY + "/hifi_tuner"
    FUNCTION = "replace"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "image": ("IMAGE", {"tooltip": "The photo (one image; sides a multiple of 8)."}),
                "mask": ("MASK", {"tooltip": "Mask of the subject to replace (the area allowed to change)."}),
                "caption": ("STRING", {"default": "a photo of a cat on a sofa", "multiline": False,
                                       "tooltip": "A caption of the photo (paper: BLIP-2) that names the subject."}),
                "source_word": ("STRING", {"default": "cat", "tooltip": "The caption's word for the subject to replace."}),
                "target_word": ("STRING", {"default": "dog", "tooltip": "Your subject's class word (same word: only "
                                                                       "the subject rows change)."}),
                "sigmas": ("SIGMAS", {"tooltip": "Schedule of inversion and regeneration (BasicScheduler; "
                                                 "ddim_uniform with the subject's sampling_steps hits its step-wise "
                                                 "rows exactly)."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "null_text_steps": ("INT", {"default": 10, "min": 1, "max": 1000,
                                            "tooltip": "Null-text optimisation steps per sampling step (K; "
                                                       "UNCONFIRMED in the paper, null-text inversion uses 10)."}),
                "learning_rate": ("FLOAT", {"default": 1e-2, "min": 1e-6, "max": 1.0, "step": 1e-4, "round": False}),
                "cross_replace": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.05,
                                            "tooltip": "Fraction of the steps (from the start) that reuse the photo's "
                                                       "cross-attention maps (prompt-to-prompt's default 0.8; the "
                                                       "paper does not say, UNCONFIRMED)."}),
            },
            "optional": {
                "subject": (SUBJECT, {"tooltip": "The HiFi subject; without it the class word alone is swapped in."}),
                "use_stepwise": ("BOOLEAN", {"default": True, "tooltip": "Use the subject's per-timestep rows."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def replace(self, model, clip, vae, image, mask, caption, source_word, target_word, sigmas, cfg, null_text_steps,
                learning_rate, cross_replace, subject=None, use_stepwise=True, unique_id=None):
        return subject_replace.replace_subject(
            model, clip, vae, image, mask, caption, source_word, target_word, subject, sigmas, cfg=cfg,
            null_text_steps=null_text_steps, learning_rate=learning_rate, cross_replace=cross_replace,
            use_stepwise=use_stepwise, node_id=unique_id)


NODE_CLASS_MAPPINGS = {
    "PersonalizeHiFiSubjectTune": HiFiSubjectTune,
    "PersonalizeHiFiSubjectConditioning": HiFiSubjectConditioning,
    "PersonalizeHiFiLoadSubject": HiFiLoadSubject,
    "PersonalizeHiFiReferenceGuidedSampler": HiFiReferenceGuidedSampler,
    "PersonalizeHiFiSubjectReplace": HiFiSubjectReplace,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PersonalizeHiFiSubjectTune": "HiFi Subject Tune",
    "PersonalizeHiFiSubjectConditioning": "HiFi Subject Conditioning",
    "PersonalizeHiFiLoadSubject": "HiFi Load Subject",
    "PersonalizeHiFiReferenceGuidedSampler": "HiFi Reference-Guided Sampler",
    "PersonalizeHiFiSubjectReplace": "HiFi Subject Replace",
}

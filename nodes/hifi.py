"""HiFi Tuner nodes: learn a subject representation, load it, and turn it into CONDITIONING for stock samplers."""
from __future__ import annotations


from comfy_api.v0_0_2 import io

from ..core.host import PersonalizeError
from ..core.inputs import check_file_name
from ..methods import hifi_tuner, reference_guidance, subject_replace
from . import sockets as S
from .artifacts import loader_node

HIFI = S.CATEGORY + "/hifi_tuner"


class HiFiSubjectTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeHiFiSubjectTune",
            display_name="HiFi Subject Tune",
            category=HIFI,
            description=("HiFi Tuner subject learning: learns n rows of the encoded prompt (its padding tail) for "
                         "your subject from a few photos and masks, with a masked loss, a pull toward the empty "
                         "prompt's tail, and then one row set per sampling step. Use the result with HiFi Subject "
                         "Conditioning."),
            search_aliases=["hifi tuner", "train subject", "personalize"],
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="Frozen: the caption and the empty prompt are encoded once."),
                io.Vae.Input("vae"),
                io.Image.Input("images", tooltip="3-5 photos of the subject."),
                io.String.Input("caption", default="a photo of an object", multiline=False,
                                tooltip="Training caption 'a photo of a <class noun>' (e.g. 'a photo of a dog'); "
                                        "the subject rows replace its padding tail. Not given by the paper "
                                        "(UNCONFIRMED)."),
                io.Int.Input("n_tokens", default=5, min=1, max=70,
                             tooltip="Tail rows of the encoded prompt that represent the subject (paper: 5)."),
                S.steps(1000, "Steps of the global representation, t uniform over 0..999 (paper: 1000).",
                        name="global_steps"),
                io.Int.Input("steps_per_step", default=10, min=1, max=1000,
                             tooltip="Steps per sampling timestep for the step-wise rows (paper: 10)."),
                io.Int.Input("sampling_steps", default=50, min=1, max=999,
                             tooltip="DDIM steps whose timesteps get their own rows (paper: 50). Sample with "
                                     "ddim_uniform and this many steps to hit them exactly."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-7, max=1.0, step=1e-5, round=False,
                               tooltip="Adam learning rate (paper: 5e-3). A fresh Adam per timestep."),
                io.Float.Input("reg_weight", default=hifi_tuner.REG_WEIGHT, min=0.0, max=100.0, step=1e-4,
                               round=False,
                               tooltip="Weight w_s of the pull toward the empty prompt's tail (mean squared "
                                       "distance). UNCONFIRMED: the paper gives no value; 5e-3 is our default, the "
                                       "smallest weight that kept the prompt's scene as well as plain text does in "
                                       "a sweep on the mini world (README). Higher keeps the scene, lower the "
                                       "subject."),
                io.Boolean.Input("use_mask", default=True, tooltip="Count the loss only inside the subject masks."),
                io.Boolean.Input("use_regularisation", default=True,
                                 tooltip="Pull the rows toward the empty prompt's tail."),
                io.Boolean.Input("use_stepwise", default=True,
                                 tooltip="Also learn one row set per sampling timestep (Algorithm 1)."),
                S.seed(),
                io.String.Input("subject_name", default="my_subject",
                                tooltip="File name in models/personalize/subjects."),
                S.overwrite(),
                io.Mask.Input("mask", optional=True,
                              tooltip="Subject masks, one per image (or one for all); needed when use_mask is on."),
                io.Int.Input("batch_size", default=1, min=1, max=64, optional=True,
                             tooltip="Images per step (the paper does not say; 1)."),
                S.gradient_checkpointing(),
                S.mixed_precision(),
            ],
            outputs=[
                S.HiFiSubject.Output(display_name="subject",
                                     tooltip="The learned subject (global + step-wise rows); connect to HiFi "
                                             "Subject Conditioning."),
                S.LossMap.Output(display_name="loss",
                                 tooltip="Loss per step, global phase then step-wise phase (plot it with "
                                         "Personalize Loss Graph)."),
                io.String.Output(display_name="subject_file",
                                 tooltip="Name of the saved file in models/personalize/subjects (HiFi Load Subject "
                                         "reads it)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, caption, n_tokens, global_steps, steps_per_step, sampling_steps,
                learning_rate, reg_weight, use_mask, use_regularisation, use_stepwise, seed, subject_name, overwrite,
                mask=None, batch_size=1, gradient_checkpointing=False, mixed_precision="auto") -> io.NodeOutput:
        check_file_name(hifi_tuner.NODE, "subject_name", subject_name)
        subject = hifi_tuner.learn_subject(
            model, clip, vae, images, mask, caption, n_tokens=n_tokens, global_steps=global_steps,
            steps_per_timestep=steps_per_step, sampling_steps=sampling_steps, lr=learning_rate, reg_weight=reg_weight,
            use_mask=use_mask, use_reg=use_regularisation, use_stepwise=use_stepwise, seed=seed,
            batch_size=batch_size, gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
            save_as=subject_name, overwrite=overwrite, node_id=S.node_id(cls))
        return io.NodeOutput(subject, subject.tuning.loss_map(), subject.path.name)


class HiFiSubjectConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeHiFiSubjectConditioning",
            display_name="HiFi Subject Conditioning",
            category=HIFI,
            description=("Puts a HiFi subject into a prompt's CONDITIONING for any stock sampler: the subject rows "
                         "replace the prompt's padding tail. With use_stepwise, each sampling step gets the rows "
                         "learned for the nearest training timestep (timestep ranges that tile the whole schedule)."),
            search_aliases=["hifi tuner", "apply subject", "subject prompt"],
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The positive prompt, naming the subject's class "
                                                              "(e.g. 'a dog on the beach')."),
                S.HiFiSubject.Input("subject"),
                io.Boolean.Input("use_stepwise", default=True,
                                 tooltip="Use the per-timestep rows (off: the global rows at every step)."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, subject, use_stepwise) -> io.NodeOutput:
        return io.NodeOutput(hifi_tuner.subject_conditioning(conditioning, subject, use_stepwise))


HiFiLoadSubject = loader_node(
    hifi_tuner.SUBJECT_FILE, node_id="PersonalizeHiFiLoadSubject", class_name="HiFiLoadSubject",
    display_name="HiFi Load Subject", category=HIFI,
    description="Loads a subject saved by HiFi Subject Tune from models/personalize/subjects.",
    search_aliases=["hifi tuner", "load subject"], input_name="subject_file", override_name="subject_file_name",
    output=S.HiFiSubject.Output(display_name="subject"), load=hifi_tuner.load_subject)


class HiFiReferenceGuidedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeHiFiReferenceGuidedSampler",
            display_name="HiFi Reference-Guided Sampler",
            category=HIFI,
            description=("HiFi Tuner reference-guided generation (Algorithm 2): a SAMPLER for SamplerCustom (or "
                         "SamplerCustomAdvanced) that pulls the subject region of the image toward a reference "
                         "photo. Workflow: sample once without it, segment the subject of that image "
                         "(generated_mask), then sample again with this sampler, the same seed, SIGMAS and cfg. The "
                         "reference is aligned to the generated mask (similarity transform), inverted, pasted into "
                         "the region at t_start, and the negative-prompt embedding of the region is optimised from "
                         "t_start to t_end."),
            search_aliases=["hifi tuner", "reference guidance", "sampler"],
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with (the reference is inverted with it)."),
                io.Vae.Input("vae"),
                S.HiFiSubject.Input("subject", tooltip="The HiFi subject; its rows go into the reference caption's "
                                                       "tail for the inversion."),
                io.Conditioning.Input("reference_conditioning",
                                      tooltip="A caption of the reference photos (paper: BLIP-2), e.g. 'a photo of a "
                                              "dog'."),
                io.Sigmas.Input("sigmas", tooltip="The schedule you sample with (the same SIGMAS into "
                                                  "SamplerCustom)."),
                io.Image.Input("reference_images", tooltip="Photos of the subject (e.g. the training photos)."),
                io.Mask.Input("reference_masks", tooltip="The subject's mask in each reference photo."),
                io.Mask.Input("generated_mask", tooltip="The subject's mask in the first, unguided image (paper: "
                                                        "Grounding SAM), at the generated image's size."),
                io.Int.Input("t_start", default=40, min=1, max=999,
                             tooltip="Step (counted down from the number of steps) at which the reference is pasted "
                                     "and guidance starts (paper: 40 of 50)."),
                io.Int.Input("t_end", default=10, min=1, max=999,
                             tooltip="Last guided step, counted down (paper: 10 of 50)."),
                io.Int.Input("inner_steps", default=10, min=0, max=100,
                             tooltip="Adam steps on the null-text embedding per guided step (paper J = 10): more "
                                     "follows the reference closer, fewer varies more."),
                io.Float.Input("learning_rate", default=1e-2, min=1e-6, max=1.0, step=1e-4, round=False,
                               tooltip="Adam learning rate of the null-text embedding (paper 1e-2)."),
                io.Int.Input("reference_index", default=0, min=0, max=63, optional=True,
                             tooltip="Which reference to use when no CLIP vision model chooses."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Chooses the reference most similar to generated_image (the paper uses "
                                            "DINO for this)."),
                io.Image.Input("generated_image", optional=True,
                               tooltip="The first, unguided image (for the CLIP vision choice)."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="Deterministic DDIM sampler with reference guidance; use with the "
                                               "SIGMAS given here.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, subject, reference_conditioning, sigmas, reference_images, reference_masks,
                generated_mask, t_start, t_end, inner_steps, learning_rate, reference_index=0, clip_vision=None,
                generated_image=None) -> io.NodeOutput:
        guidance = reference_guidance.prepare_guidance(
            model, vae, reference_conditioning, subject, sigmas, reference_images, reference_masks, generated_mask,
            t_start=t_start, t_end=t_end, inner_steps=inner_steps, lr=learning_rate,
            reference_index=reference_index, clip_vision=clip_vision, generated_image=generated_image,
            node_id=S.node_id(cls))
        return io.NodeOutput(reference_guidance.reference_guided_sampler(guidance))


class HiFiSubjectReplace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeHiFiSubjectReplace",
            display_name="HiFi Subject Replace",
            category=HIFI,
            description=("HiFi Tuner subject replacement (Algorithm 3): replaces the subject of a photo by your HiFi "
                         "subject and keeps the rest. The photo is inverted with null-text inversion under its "
                         "caption; then it is regenerated with the source word swapped for the subject's class word "
                         "and the subject rows in the prompt, reusing the photo's cross-attention maps for every "
                         "other word (prompt-to-prompt), and keeping the photo outside the mask."),
            search_aliases=["hifi tuner", "subject swap", "replace object", "prompt-to-prompt"],
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Image.Input("image", tooltip="The photo (one image; sides a multiple of 8)."),
                io.Mask.Input("mask", tooltip="Mask of the subject to replace (the area allowed to change)."),
                io.String.Input("caption", default="a photo of a cat on a sofa", multiline=False,
                                tooltip="A caption of the photo (paper: BLIP-2) that names the subject."),
                io.String.Input("source_word", default="cat", tooltip="The caption's word for the subject to replace."),
                io.String.Input("target_word", default="dog",
                                tooltip="Your subject's class word (same word: only the subject rows change)."),
                io.Sigmas.Input("sigmas", tooltip="Schedule of inversion and regeneration (BasicScheduler; "
                                                  "ddim_uniform with the subject's sampling_steps hits its step-wise "
                                                  "rows exactly)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Int.Input("null_text_steps", default=10, min=1, max=1000,
                             tooltip="Null-text optimisation steps per sampling step (K; UNCONFIRMED in the paper, "
                                     "null-text inversion uses 10)."),
                io.Float.Input("learning_rate", default=1e-2, min=1e-6, max=1.0, step=1e-4, round=False),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps (from the start) that reuse the photo's "
                                       "cross-attention maps (prompt-to-prompt's default 0.8; the paper does not "
                                       "say, UNCONFIRMED)."),
                S.HiFiSubject.Input("subject", optional=True,
                                    tooltip="The HiFi subject; without it the class word alone is swapped in."),
                io.Boolean.Input("use_stepwise", default=True, optional=True,
                                 tooltip="Use the subject's per-timestep rows."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Latent.Output(display_name="latent")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, mask, caption, source_word, target_word, sigmas, cfg, null_text_steps,
                learning_rate, cross_replace, subject=None, use_stepwise=True) -> io.NodeOutput:
        return io.NodeOutput(*subject_replace.replace_subject(
            model, clip, vae, image, mask, caption, source_word, target_word, subject, sigmas, cfg=cfg,
            null_text_steps=null_text_steps, learning_rate=learning_rate, cross_replace=cross_replace,
            use_stepwise=use_stepwise, node_id=S.node_id(cls)))


NODES = [HiFiSubjectTune, HiFiSubjectConditioning, HiFiLoadSubject, HiFiReferenceGuidedSampler, HiFiSubjectReplace]

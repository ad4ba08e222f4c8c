"""ProFusion nodes (Zhou et al. 2023, arXiv 2305.13579): load a PromptNet, encode a reference image for it, and the
Fusion Sampler (a SAMPLER for stock SamplerCustom / SamplerCustomAdvanced). The maths lives in methods/profusion.py and
networks/promptnet.py (../shared/docs/methods.md §5). ProFusion Tune (test-time tuning) is in nodes/profusion_tune.py.
"""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..methods import profusion
from ..networks import promptnet  # declares the PromptNet file kind, so register_folders registers models/promptnet
from . import sockets as S
from .artifacts import loader_node

PROFUSION = S.CATEGORY + "/profusion"


PromptNetLoader = loader_node(
    promptnet.PROMPTNET_FILE, node_id="PersonalizePromptNetLoader", class_name="PromptNetLoader",
    display_name="PromptNet Loader", category=PROFUSION,
    description=("Loads a ProFusion PromptNet: the encoder that turns a reference image, the current noisy latent and "
                 "the timestep into a word S* for the prompt. A PromptNet is made for one base model family and one "
                 "CLIP vision model: the mini world's (mini_world_promptnet.safetensors: Load Mini Model + Load Mini "
                 "CLIP Vision) or one converted from the official SD2 release (scripts/convert_profusion.py: an SD2 "
                 "checkpoint + OpenCLIP ViT-H/14)."),
    search_aliases=["profusion", "promptnet", "encoder"], input_name="promptnet_name",
    output=S.PromptNet.Output(display_name="promptnet"), load=promptnet.load_promptnet)


class PromptNetEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizePromptNetEncode",
            display_name="PromptNet Encode",
            category=PROFUSION,
            description=("Prepares one reference image for ProFusion: its VAE latent at PromptNet's size and its CLIP "
                         "vision tokens (last_hidden_state, as the official pipeline). The word S* itself is not "
                         "computed here: it depends on the noisy latent and the timestep, so the Fusion Sampler runs "
                         "PromptNet at every sampling step."),
            search_aliases=["profusion", "reference image", "promptnet"],
            inputs=[
                io.Image.Input("image", tooltip="One reference image of the subject (a batch of one; pick one with "
                                                "Image From Batch). It is centre-cropped to a square and resized to "
                                                "PromptNet's size (latent size x 8: 512 px for the official SD2 "
                                                "PromptNet, 64 px for the mini world's)."),
                S.PromptNet.Input("promptnet", tooltip="The PromptNet you sample with (PromptNet Loader)."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint the PromptNet was made for."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="The CLIP vision model the PromptNet reads: OpenCLIP ViT-H/14 (Load CLIP "
                                            "Vision) for the official SD2 PromptNet, Load Mini CLIP Vision for the "
                                            "mini world's. It applies its own crop and resize."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Keep-mask of the subject, the image's size (official keep-mask): the image is "
                                      "multiplied by it, so the background turns black."),
            ],
            outputs=[S.ProFusionReference.Output(
                display_name="reference",
                tooltip="The reference latent and CLIP vision tokens, for the Fusion Sampler (S* is computed there).")],
        )

    @classmethod
    def execute(cls, image, promptnet, vae, clip_vision, mask=None) -> io.NodeOutput:
        return io.NodeOutput(profusion.encode_reference(image, promptnet, vae, clip_vision, mask))


def _scale(name: str) -> io.Float.Input:
    return io.Float.Input(name, default=3.0, min=0.0, max=100.0, step=0.1, round=0.01, optional=True,
                          tooltip="Weight s_k of this extra reference (official extra_ref_image_scales; the notebook "
                                  "gives no value, 3.0 is ours - UNCONFIRMED): the refinement adds s_k x its guidance, "
                                  "the fusion stage averages the references with weights omega1 and s_k.")


class FusionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeFusionSampler",
            display_name="Fusion Sampler (ProFusion)",
            category=PROFUSION,
            description=(
                "ProFusion's Fusion Sampling as a SAMPLER for SamplerCustom or SamplerCustomAdvanced (any SIGMAS; "
                "BasicScheduler ddim_uniform matches the official DDIM). Per step, PromptNet computes S* from the "
                "reference, the current noisy latent and the timestep; a fusion stage (m times: a step guided by "
                "the prompt with S* scaled by gamma, then re-noising back) is followed by a refinement step guided "
                "by the prompt with S* (omega1) and the prompt with the class word in its place (omega2). The "
                "prompts come from this node: SamplerCustom's own positive, negative and cfg are not used (connect "
                "any CONDITIONING there). Costs 2m + 3 model evaluations per step (one reference)."),
            search_aliases=["profusion", "fusion sampling", "promptnet", "sampler"],
            inputs=[
                S.PromptNet.Input("promptnet", tooltip="The PromptNet (PromptNet Loader, or ProFusion Tune's). It "
                                                       "must fit the MODEL SamplerCustom samples with."),
                S.ProFusionReference.Input("reference", tooltip="The reference image, from PromptNet Encode."),
                io.Clip.Input("clip", tooltip="The text encoder of the checkpoint (S* goes into its prompt)."),
                io.String.Input("prompt", default="a photo of holder on the beach", multiline=True,
                                tooltip="The prompt, with the placeholder word where the subject goes (official: 'a "
                                        "holder in Ghibli style'). The placeholder's input vector becomes S* (no "
                                        "position embedding, as the official pipeline). One chunk of 77 tokens."),
                io.String.Input("class_word", default="person",
                                tooltip="The subject's class (official: 'person', the FFHQ PromptNet): the refinement "
                                        "also guides with the prompt where it replaces the placeholder "
                                        "(methods.md §5.10.2)."),
                io.String.Input("placeholder", default=profusion.PLACEHOLDER,
                                tooltip="The placeholder word in the prompt: one token of the tokenizer, written once. "
                                        "Its own embedding is replaced by S*, so only its position matters; 'holder' "
                                        "is the official one."),
                io.Float.Input("omega1", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="omega1: guidance of the prompt with S* in the refinement (official "
                                       "guidance_scale, notebook 7.0)."),
                io.Float.Input("omega2", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="omega2: guidance of the class-word prompt in the refinement (official "
                                       "guidance_scale_ref, notebook 5.0). 0 with m = 0 is plain cfg with S*."),
                io.Int.Input("m", default=1, min=0, max=10,
                             tooltip="Fusion iterations per step (official refine_step, notebook 1). 0 turns fusion "
                                     "off ('conditions independent', worse results per the authors); each adds 2 "
                                     "model evaluations per step."),
                io.Float.Input("gamma", default=0.6, min=0.0, max=2.0, step=0.05, round=0.01,
                               tooltip="gamma: scale of S*'s row of the encoded prompt (the text encoder's output, as "
                                       "the official code) in the fusion stage (official refine_emb_scale; notebook "
                                       "0.6, 0.4-0.9 works (official)). Lower keeps more of the prompt, higher more "
                                       "of the subject."),
                io.Float.Input("omega_f", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="omega_f: guidance of the fusion stage (official refine_guidance_scale, "
                                       "notebook 7.0)."),
                io.Float.Input("eta_fuse", default=1.0, min=0.0, max=1.0, step=0.05, round=0.01,
                               tooltip="eta of the fusion move's DDIM step (official refine_eta, notebook 1.0): how "
                                       "far each fusion iteration steps and re-noises."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt (CLIP Text Encode); without it the empty prompt "
                                              "(official negative '')."),
                S.ProFusionReference.Input("reference_2", optional=True,
                                           tooltip="A second reference image of the subject (official "
                                                   "extra_ref_image): its own S*, 1 + m more model evaluations per "
                                                   "step."),
                _scale("scale_2"),
                S.ProFusionReference.Input("reference_3", optional=True, tooltip="A third reference image."),
                _scale("scale_3"),
            ],
            outputs=[io.Sampler.Output(
                display_name="sampler",
                tooltip="For SamplerCustom / SamplerCustomAdvanced with the MODEL the PromptNet was made for. Latents "
                        "of another size than PromptNet's (512 px on SD2) are resized for PromptNet only (methods.md "
                        "§5.3: UNCONFIRMED, the official encoder gives one word only at its size); the image is "
                        "sampled at its own size.")],
        )

    @classmethod
    def execute(cls, promptnet, reference, clip, prompt, class_word, placeholder, omega1, omega2, m, gamma, omega_f,
                eta_fuse, negative=None, reference_2=None, scale_2=3.0, reference_3=None,
                scale_3=3.0) -> io.NodeOutput:
        refs, scales = [reference], []
        for ref, scale in ((reference_2, scale_2), (reference_3, scale_3)):
            if ref is not None:
                refs.append(ref)
                scales.append(scale)
        conditions = profusion.PromptNetConditions(promptnet, refs, clip, prompt, class_word, negative,
                                                   placeholder=placeholder, extra_scales=scales)
        settings = profusion.FusionSettings(omega1=omega1, omega2=omega2, m=m, gamma=gamma, omega_f=omega_f,
                                            eta_fuse=eta_fuse)
        return io.NodeOutput(profusion.fusion_sampler(conditions, settings))


NODES = [PromptNetLoader, PromptNetEncode, FusionSampler]

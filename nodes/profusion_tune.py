"""ProFusion Tune: test-time tuning of PromptNet and the UNet's q/k/v on one image (methods/profusion_tune.py)."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..core.tuning import decode_previews
from ..methods import profusion_tune
from . import sockets as S


class ProFusionTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeProFusionTune",
            display_name="ProFusion Tune",
            category=S.CATEGORY + "/profusion",
            description=("ProFusion's test-time tuning: fine-tunes PromptNet and the UNet's attention q/k/v on one "
                         "image of the subject plus augmented copies of it (about 100 steps). Outputs the tuned "
                         "PromptNet and the MODEL with the q/k/v deltas, for ProFusion's Fusion Sampling with a "
                         "reference encoded from the same image."),
            search_aliases=["profusion", "promptnet", "fine-tune", "personalize"],
            inputs=[
                S.PromptNet.Input("promptnet", tooltip="The pre-trained PromptNet of this checkpoint (left unchanged; "
                                                       "a tuned copy comes out)."),
                io.Model.Input("model", tooltip="The checkpoint PromptNet was made for (left unchanged)."),
                io.Clip.Input("clip", tooltip="Its CLIP: the prompt 'a photo of holder' is encoded with S* in it."),
                io.Vae.Input("vae", tooltip="Encodes the image and its copies once."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model PromptNet reads (ViT-H/14 for the "
                                                           "official SD2 PromptNet; Load Mini CLIP Vision on the "
                                                           "mini world)."),
                io.Image.Input("image", tooltip="One photo of the subject (centre-cropped to a square)."),
                S.steps(100, tooltip="Optimisation steps (official: 100; more can help)."),
                S.learning_rate(2e-5),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Samples per step (official: 4)."),
                io.Int.Input("augmented_copies", default=31, min=0, max=1024,
                             tooltip="Augmented copies of the image (flip, rotation, shift, zoom-out) trained on "
                                     "with it (official: 31)."),
                io.Boolean.Input("tune_unet_qkv", default=True,
                                 tooltip="Also tune the UNet's attention q/k/v projections (official). Off: only "
                                         "PromptNet is tuned and the MODEL comes out unchanged."),
                S.seed(),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional subject mask of the image: the image is multiplied by it (the "
                                      "official keep-mask), as PromptNet Encode does."),
                S.gradient_checkpointing(),
                S.mixed_precision(),
                S.preview_every(),
                io.String.Input("prompt", default=profusion_tune.PROMPT, optional=True,
                                tooltip="Tuning prompt with the placeholder 'holder' where S* goes (official: "
                                        "'a photo of holder')."),
                io.Combo.Input("padding", options=list(profusion_tune.PADDING), default="reflection",
                               optional=True,
                               tooltip="How the copies' zoom-out and shift fill the uncovered frame (the official "
                                       "notebook inpaints it). With a mask: black, the masked background."),
            ],
            outputs=[
                S.PromptNet.Output(display_name="promptnet", tooltip="The tuned PromptNet."),
                io.Model.Output(display_name="model", tooltip="The MODEL with the tuned q/k/v deltas (weight "
                                                              "patches on a clone)."),
                S.LossMap.Output(display_name="loss", tooltip="Loss per step (plot it with Personalize Loss Graph)."),
                io.Image.Output(display_name="previews", tooltip="The model's denoised guesses during tuning."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, promptnet, model, clip, vae, clip_vision, image, steps, learning_rate, batch_size,
                augmented_copies, tune_unet_qkv, seed, mask=None, gradient_checkpointing=False,
                mixed_precision="auto", preview_every=0, prompt=profusion_tune.PROMPT,
                padding="reflection") -> io.NodeOutput:
        config = profusion_tune.ProFusionTuneConfig(
            steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
            gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
            preview_every=preview_every, augmented_copies=augmented_copies, tune_unet_qkv=tune_unet_qkv,
            prompt=prompt, padding=padding)
        net, out_model, result = profusion_tune.tune(promptnet, model, clip, vae, clip_vision, image, mask, config,
                                                     node_id=S.node_id(cls))
        return io.NodeOutput(net, out_model, result.loss_map(), decode_previews(vae, result))


NODES = [ProFusionTune]

"""Foundation training nodes: Textual Inversion and DreamBooth-LoRA, trained inside the graph."""
from __future__ import annotations

from ..core.tuning import TuningConfig
from ..methods import dreambooth_lora, textual_inversion
from ..methods.common import decode_previews
from . import sockets as S


def _config(steps, learning_rate, batch_size, seed, gradient_checkpointing, mixed_precision, preview_every):
    return TuningConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
                        preview_every=preview_every)


class TrainSubjectEmbedding:
    DESCRIPTION = ("Textual Inversion: learns a new word for your subject from a few photos. The CLIP output "
                   "understands the placeholder word; the saved file works anywhere as embedding:<name>.")
    CATEGORY = S.CATEGORY + "/training"
    FUNCTION = "train"
    RETURN_TYPES = ("CLIP", "STRING", S.LOSS_MAP, "IMAGE")
    RETURN_NAMES = ("clip", "embedding", "loss", "previews")
    OUTPUT_TOOLTIPS = ("The CLIP with the placeholder word bound to the learned embedding.",
                       "The prompt text that loads the saved file with stock nodes: embedding:<name>.",
                       "Loss per step (plot it with Personalize Loss Graph).",
                       "The model's denoised guesses during training.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "images": ("IMAGE", {"tooltip": "3-5 photos of the subject."}),
                "placeholder": ("STRING", {"default": "sks", "tooltip": "A rare single-token word that will mean your subject."}),
                "init_word": ("STRING", {"default": "object", "tooltip": "The subject's class (e.g. 'dog'); the embedding starts from it."}),
                "steps": S.steps(500),
                "learning_rate": S.learning_rate(5e-3),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": (
                    "Noised samples per step. Larger batches give a steadier gradient: the paper used 8, and on the "
                    "mini world a batch of 2 left the embedding at its init word (README). Costs memory.")}),
                "seed": S.seed(),
                "embedding_name": ("STRING", {"default": "my_subject", "tooltip": "File name in models/embeddings."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
            },
            "optional": S.training_options(),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, images, placeholder, init_word, steps, learning_rate, batch_size, seed,
              embedding_name, overwrite, mask=None, gradient_checkpointing=False, mixed_precision="auto",
              preview_every=0, unique_id=None):
        cfg = _config(steps, learning_rate, batch_size, seed, gradient_checkpointing, mixed_precision, preview_every)
        r = textual_inversion.train_textual_inversion(
            model, clip, vae, images, placeholder=placeholder, init_word=init_word, cfg=cfg,
            embedding_name=embedding_name, masks=mask, overwrite=overwrite, node_id=unique_id)
        return (r.clip, f"embedding:{r.path.stem}", r.tuning.loss_map(), decode_previews(vae, r.tuning))


class TrainSubjectLoRA:
    DESCRIPTION = ("DreamBooth with LoRA: fine-tunes low-rank deltas of the UNet (and optionally the text "
                   "encoder) on a few subject photos. Outputs the patched MODEL/CLIP and a LoRA file in kohya "
                   "format that the stock Load LoRA node reads.")
    CATEGORY = S.CATEGORY + "/training"
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", S.LOSS_MAP, "IMAGE")
    RETURN_NAMES = ("model", "clip", "lora_name", "loss", "previews")

    @classmethod
    def INPUT_TYPES(cls):
        opt = S.training_options()
        opt.update({
            "class_prompt": ("STRING", {"default": "", "tooltip": "Prior preservation: prompt of the class (e.g. 'a photo of a dog')."}),
            "class_images": ("IMAGE", {"tooltip": "Prior preservation: images of the class made by the base model."}),
            "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}),
            "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                "tooltip": "LoRA alpha; the delta is scaled by alpha/rank. 0 = rank (scale 1)."}),
        })
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "images": ("IMAGE", {"tooltip": "3-5 photos of the subject."}),
                "instance_prompt": ("STRING", {"default": "a photo of sks dog", "multiline": True}),
                "rank": ("INT", {"default": 4, "min": 1, "max": 256}),
                "steps": S.steps(400),
                "learning_rate": S.learning_rate(1e-4),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "seed": S.seed(),
                "layers": (dreambooth_lora.LAYER_CHOICES, {"default": "attention",
                                                           "tooltip": "attention: q/k/v/out projections; all_linear: also feed-forward and projections."}),
                "train_text_encoder": ("BOOLEAN", {"default": False}),
                "lora_name": ("STRING", {"default": "my_subject_lora", "tooltip": "File name in models/loras."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
            },
            "optional": opt,
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, images, instance_prompt, rank, steps, learning_rate, batch_size, seed, layers,
              train_text_encoder, lora_name, overwrite, mask=None, gradient_checkpointing=False,
              mixed_precision="auto", preview_every=0, class_prompt="", class_images=None, prior_loss_weight=1.0,
              alpha=0.0, unique_id=None):
        cfg = _config(steps, learning_rate, batch_size, seed, gradient_checkpointing, mixed_precision, preview_every)
        r = dreambooth_lora.train_lora(
            model, clip, vae, images, instance_prompt=instance_prompt, rank=rank, layers=layers,
            train_text_encoder=train_text_encoder, cfg=cfg, lora_name=lora_name, masks=mask,
            class_prompt=class_prompt, class_images=class_images, prior_loss_weight=prior_loss_weight,
            alpha=alpha or None, overwrite=overwrite, node_id=unique_id)
        return (r.model, r.clip, r.path.name, r.tuning.loss_map(), decode_previews(vae, r.tuning))


NODE_CLASS_MAPPINGS = {
    "PersonalizeTrainSubjectEmbedding": TrainSubjectEmbedding,
    "PersonalizeTrainSubjectLoRA": TrainSubjectLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PersonalizeTrainSubjectEmbedding": "Train Subject Embedding (Textual Inversion)",
    "PersonalizeTrainSubjectLoRA": "Train Subject LoRA (DreamBooth)",
}

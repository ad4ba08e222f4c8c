"""Foundation training nodes: Textual Inversion and DreamBooth-LoRA, trained inside the graph."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..core import host, textual
from ..core.inputs import check_file_name
from ..core.tuning import TuningConfig, decode_previews
from ..methods import dreambooth_lora, textual_inversion
from . import sockets as S


def _config(steps, learning_rate, batch_size, seed, gradient_checkpointing, mixed_precision, preview_every):
    return TuningConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
                        preview_every=preview_every)


def _images_input():
    return io.Image.Input("images", tooltip="3-5 photos of the subject.")


class TrainSubjectEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeTrainSubjectEmbedding",
            display_name="Train Subject Embedding (Textual Inversion)",
            category=S.CATEGORY + "/training",
            description=("Textual Inversion: learns a new word for your subject from a few photos. The CLIP output "
                         "understands the placeholder word; the saved file works anywhere as embedding:<name>."),
            search_aliases=["textual inversion", "embedding", "train embedding", "personalize"],
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                _images_input(),
                io.String.Input("placeholder", default="sks",
                                tooltip="A rare single-token word that will mean your subject."),
                io.String.Input("init_word", default="object",
                                tooltip="The subject's class (e.g. 'dog'); the embedding starts from it."),
                S.steps(500),
                S.learning_rate(5e-3),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip=(
                    "Noised samples per step. Larger batches give a steadier gradient: the paper used 8, and on the "
                    "mini world a batch of 2 left the embedding at its init word (README). Costs memory.")),
                S.seed(),
                io.String.Input("embedding_name", default="my_subject",
                                tooltip="File name in models/embeddings (letters, digits, '_' and '-': the name "
                                        "that embedding:<name> loads)."),
                S.overwrite(),
                *S.training_options(),
            ],
            outputs=[
                io.Clip.Output(display_name="clip",
                               tooltip="The CLIP with the placeholder word bound to the learned embedding."),
                io.String.Output(display_name="embedding",
                                 tooltip="The prompt text that loads the saved file with stock nodes: "
                                         "embedding:<name>."),
                S.LossMap.Output(display_name="loss", tooltip="Loss per step (plot it with Personalize Loss Graph)."),
                io.Image.Output(display_name="previews", tooltip="The model's denoised guesses during training."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, placeholder, init_word, steps, learning_rate, batch_size, seed,
                embedding_name, overwrite, mask=None, gradient_checkpointing=False, mixed_precision="auto",
                preview_every=0) -> io.NodeOutput:
        node = textual_inversion.NODE
        host.require_family(node, model, clip)
        embedding_name = textual.check_embedding_name(node, embedding_name)
        check_file_name(node, "embedding_name", embedding_name)
        textual.check_placeholder(node, clip, placeholder, init_word)
        config = _config(steps, learning_rate, batch_size, seed, gradient_checkpointing, mixed_precision, preview_every)
        r = textual_inversion.train_textual_inversion(
            model, clip, vae, images, placeholder=placeholder, init_word=init_word, config=config,
            embedding_name=embedding_name, masks=mask, overwrite=overwrite, node_id=S.node_id(cls))
        return io.NodeOutput(r.clip, f"embedding:{r.path.stem}", r.tuning.loss_map(), decode_previews(vae, r.tuning))


class TrainSubjectLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeTrainSubjectLoRA",
            display_name="Train Subject LoRA (DreamBooth)",
            category=S.CATEGORY + "/training",
            description=("DreamBooth with LoRA: fine-tunes low-rank deltas of the UNet (and optionally the text "
                         "encoder) on a few subject photos. Outputs the patched MODEL/CLIP and a LoRA file in kohya "
                         "format that the stock Load LoRA node reads."),
            search_aliases=["dreambooth", "lora training", "train lora", "personalize"],
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                _images_input(),
                io.String.Input("instance_prompt", default="a photo of sks dog", multiline=True),
                io.Int.Input("rank", default=4, min=1, max=256),
                S.steps(400),
                S.learning_rate(1e-4),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                S.seed(),
                io.Combo.Input("layers", options=list(dreambooth_lora.LAYER_CHOICES), default="attention",
                               tooltip="attention: q/k/v/out projections; all_linear: also feed-forward and "
                                       "projections."),
                io.Boolean.Input("train_text_encoder", default=False),
                io.String.Input("lora_name", default="my_subject_lora", tooltip="File name in models/loras."),
                S.overwrite(),
                *S.training_options(),
                io.String.Input("class_prompt", default="", optional=True,
                                tooltip="Prior preservation: prompt of the class (e.g. 'a photo of a dog')."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Prior preservation: images of the class made by the base model."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=10.0, step=0.05, optional=True),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=0.5, optional=True,
                               tooltip="LoRA alpha; the delta is scaled by alpha/rank. 0 = rank (scale 1)."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Clip.Output(display_name="clip"),
                io.String.Output(display_name="lora_name"),
                S.LossMap.Output(display_name="loss"),
                io.Image.Output(display_name="previews"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, instance_prompt, rank, steps, learning_rate, batch_size, seed,
                layers, train_text_encoder, lora_name, overwrite, mask=None, gradient_checkpointing=False,
                mixed_precision="auto", preview_every=0, class_prompt="", class_images=None, prior_loss_weight=1.0,
                alpha=0.0) -> io.NodeOutput:
        check_file_name(dreambooth_lora.NODE, "lora_name", lora_name)
        config = _config(steps, learning_rate, batch_size, seed, gradient_checkpointing, mixed_precision, preview_every)
        r = dreambooth_lora.train_lora(
            model, clip, vae, images, instance_prompt=instance_prompt, rank=rank, layers=layers,
            train_text_encoder=train_text_encoder, config=config, lora_name=lora_name, masks=mask,
            class_prompt=class_prompt, class_images=class_images, prior_loss_weight=prior_loss_weight,
            alpha=alpha or None, overwrite=overwrite, node_id=S.node_id(cls))
        return io.NodeOutput(r.model, r.clip, r.path.name, r.tuning.loss_map(), decode_previews(vae, r.tuning))


NODES = [TrainSubjectEmbedding, TrainSubjectLoRA]

"""DreamBooth (Ruiz et al. 2023) with LoRA deltas (Hu et al. 2021), trained inside the graph.

Loss (DreamBooth Eq. 2, with prior preservation):
``E ‖M ⊙ (ε − ε_θ(x_t, c_inst))‖² + λ ‖ε' − ε_θ(x'_t, c_class)‖²`` where only the low-rank deltas
``ΔW = (α/r)·B A`` on the chosen UNet (and optionally text-encoder) layers are trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import artifacts, host
from ..core.deltas import LowRankDeltas, apply_lora, find_text_targets, find_unet_targets
from ..core.diffusion import DiffusionObjective
from ..core.host import PersonalizeError
from ..core.tuning import Phase, TrainingSession, TuningConfig, TuningResult, run_loop, seeded_generator
from .subject_photos import encode_subject

NODE = "Train Subject LoRA"
LAYER_CHOICES = ["attention", "all_linear"]
# A kohya-key LoRA (stock LoraLoader reads it) with the pack's typed metadata.
LORA_FILE = artifacts.kind(kind="lora", title="subject LoRA", folder="loras", made_by=NODE, stock=True,
                           legacy_method="dreambooth_lora")


@dataclass
class LoRAResult:
    model: object
    clip: object
    path: Path
    state_dict: dict
    tuning: TuningResult


def train_lora(model, clip, vae, images: torch.Tensor, *, instance_prompt: str, rank: int, layers: str,
               train_text_encoder: bool, config: TuningConfig | None = None, lora_name: str,
               masks: torch.Tensor | None = None, class_prompt: str = "", class_images: torch.Tensor | None = None,
               prior_loss_weight: float = 1.0, alpha: float | None = None, overwrite: bool = False,
               node_id=None) -> LoRAResult:
    """Train the LoRA; ``config`` holds steps, learning rate, batch size, seed, precision."""
    family = host.require_family(NODE, model, clip)
    config.validate(NODE)
    if layers not in LAYER_CHOICES:
        raise PersonalizeError(f"{NODE}: layers must be one of {LAYER_CHOICES}.")
    if not instance_prompt.strip():
        raise PersonalizeError(f"{NODE}: the instance prompt is empty; describe the subject, e.g. 'a photo of sks dog'.")
    use_prior = class_images is not None and prior_loss_weight > 0
    if use_prior and not class_prompt.strip():
        raise PersonalizeError(f"{NODE}: class images were given without a class prompt (e.g. 'a photo of a dog').")
    if class_prompt.strip() and class_images is None and prior_loss_weight > 0:
        raise PersonalizeError(
            f"{NODE}: prior preservation needs class images. Generate a few with the class prompt "
            "(KSampler on the same checkpoint) and connect them to class_images, or clear the class prompt.")
    path = artifacts.target_path("loras", lora_name)
    artifacts.check_writable(path, overwrite)
    data = encode_subject(NODE, vae, images, masks)
    class_data = encode_subject(NODE, vae, class_images) if use_prior else None
    gen = seeded_generator(config.seed)

    with TrainingSession(model, clip, train_text=train_text_encoder,
                         gradient_checkpointing=config.gradient_checkpointing) as s:
        unet_deltas = s.adopt(LowRankDeltas(find_unet_targets(s.model, layers), rank, alpha, generator=gen))
        unet_deltas.attach(s.model)
        text_deltas = None
        if train_text_encoder:
            text_deltas = LowRankDeltas(find_text_targets(s.clip, layers, family), rank, alpha, generator=gen)
            s.adopt(text_deltas, s.clip.patcher.load_device)
            text_deltas.attach(s.clip.patcher)
        s.load()

        def encode(prompt):
            cond, pooled = host.encode_text(s.clip, prompt)
            return cond.clone(), (pooled.clone() if pooled is not None else None)  # normal tensors, not inference

        cached = None if train_text_encoder else {p: encode(p) for p in {instance_prompt, class_prompt} if p}
        conds = (lambda p: cached[p]) if cached else encode
        objective = DiffusionObjective(s.model, data.latents, data.latent_masks, gen)
        prior = DiffusionObjective(s.model, class_data.latents, None, gen) if use_prior else None

        def step(_i):
            cond, pooled = conds(instance_prompt)
            idx, sigma, noise = objective.sample(config.batch_size)
            loss, denoised = objective.loss(cond, idx, sigma, noise, pooled)
            if prior is not None:
                ccond, cpooled = conds(class_prompt)
                cidx, csigma, cnoise = prior.sample(config.batch_size)
                loss = loss + prior_loss_weight * prior.loss(ccond, cidx, csigma, cnoise, cpooled)[0]
            return loss, denoised

        params = list(unet_deltas.parameters()) + (list(text_deltas.parameters()) if text_deltas else [])
        result = run_loop(NODE, [Phase(params, config.steps, step)], config, device=s.device, node_id=node_id,
                          preview_model=s.model)

    sd = unet_deltas.kohya_state_dict()
    if text_deltas is not None:
        sd.update(text_deltas.kohya_state_dict())
    LORA_FILE.save(
        sd, path, family=family, widths={"rank": rank},
        metadata={"method": "dreambooth_lora", "rank": rank, "alpha": unet_deltas.alpha, "layers": layers,
                  "train_text_encoder": train_text_encoder, "instance_prompt": instance_prompt,
                  "steps": config.steps, "learning_rate": config.learning_rate, "final_loss": result.losses[-1],
                  # kohya-style fields other tools read
                  "ss_network_dim": str(rank), "ss_network_alpha": str(unet_deltas.alpha),
                  "ss_network_module": "networks.lora"},
        overwrite=overwrite)
    out_model, out_clip = apply_lora(model, clip if train_text_encoder else None, sd)
    return LoRAResult(out_model, out_clip if train_text_encoder else clip, path, sd, result)

"""Textual Inversion (Gal et al., "An Image is Worth One Word", 2022), trained inside the graph.

One input-embedding vector per text encoder for a placeholder word is optimised with the (optionally masked)
diffusion loss, Eq. 2: ``v* = argmin_v E_{x,ε,t} ‖ε − ε_θ(x_t, t, c_θ("a photo of S*"))‖²``; the model is frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import artifacts, host
from ..core.diffusion import DiffusionObjective
from ..core.textual import PlaceholderEmbeddings
from ..core.tuning import Phase, TrainingSession, TuningConfig, TuningResult, run_loop, seeded_generator
from .subject_photos import SubjectPhotos, encode_subject

NODE = "Train Subject Embedding"
# A stock embedding file (ComfyUI's `embedding:name` reads it) with the pack's typed metadata.
EMBEDDING_FILE = artifacts.kind(kind="embedding", title="Textual Inversion embedding", folder="embeddings",
                                made_by=NODE, stock=True, legacy_method="textual_inversion")

# Prompt templates of the original implementation's object set (a subset).
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}", "a good photo of a {}",
)


@dataclass
class TextualInversionResult:
    clip: object
    embeddings: PlaceholderEmbeddings
    path: Path
    tuning: TuningResult


def train_textual_inversion(model, clip, vae, images: torch.Tensor, *, placeholder: str, init_word: str,
                            config: TuningConfig | None = None, embedding_name: str,
                            masks: torch.Tensor | None = None, overwrite: bool = False,
                            node_id=None) -> TextualInversionResult:
    """Train the placeholder's embedding; ``config`` holds steps, learning rate, batch size, seed, precision."""
    family = host.require_family(NODE, model, clip)
    config.validate(NODE)
    path = artifacts.target_path("embeddings", embedding_name)
    artifacts.check_writable(path, overwrite)
    emb = PlaceholderEmbeddings(clip, placeholder, init_word)
    data: SubjectPhotos = encode_subject(NODE, vae, images, masks)

    with TrainingSession(model, clip, train_text=True, gradient_checkpointing=config.gradient_checkpointing) as s:
        s.adopt(emb, s.clip.patcher.load_device)
        emb.attach(s.clip)
        s.load()
        gen = seeded_generator(config.seed)
        objective = DiffusionObjective(s.model, data.latents, data.latent_masks, gen)
        tokens = [s.clip.tokenize(t.format(emb.word)) for t in TEMPLATES]

        def step(_i):
            tok = tokens[int(torch.randint(0, len(tokens), (1,), generator=gen))]
            cond, pooled = s.clip.encode_from_tokens(tok, return_pooled=True)
            idx, sigma, noise = objective.sample(config.batch_size)
            return objective.loss(cond, idx, sigma, noise, pooled)

        result = run_loop(NODE, [Phase(list(emb.parameters()), config.steps, step)], config, device=s.device,
                          node_id=node_id, preview_model=s.model)

    trained = emb.frozen_copy()
    tensors = trained.embedding_file_tensors(family)
    EMBEDDING_FILE.save(
        tensors, path, family=family, widths={k: int(v.shape[-1]) for k, v in tensors.items()},
        metadata={"method": "textual_inversion", "placeholder": trained.word, "init_word": init_word,
                  "steps": config.steps, "learning_rate": config.learning_rate, "final_loss": result.losses[-1]},
        overwrite=overwrite)
    out_clip = clip.clone()
    trained.attach(out_clip)
    return TextualInversionResult(out_clip, trained, path, result)

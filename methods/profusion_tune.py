"""ProFusion test-time tuning (Zhou et al. 2023, arXiv 2305.13579, §3.3 "fine-tuning"; the official example
notebook). Specification: ../shared/docs/methods.md §5.6 (the objective is §5.5's).

On one reference image, PromptNet and the UNet's attention projections are briefly fine-tuned with the
pre-training loss, no regulariser (:func:`methods.profusion.promptnet_loss`):

    L = E ‖ε_θ(x_t, t, Enc("a photo of " ⊕ S*)) − ε‖²,   S* = PromptNet(x_ref, t, CLIP(x_ref), x_t)

* **mini-dataset**: the image (centre-cropped and resized to PromptNet's pixel size, as PromptNet Encode does) plus
  N augmented copies (:func:`augment`: random horizontal flip, ``RandomAffine(±10°, translate 0.2, scale
  0.6-1.0)``; official N = 31). The official notebook fills what the affine move uncovers with SD-2 inpainting
  (50 steps, a generic portrait prompt); this module does not - it pads by reflecting the image
  (``padding='reflection'``, default) or with ``'border'``/``'zeros'``. With a subject mask the image is multiplied
  by it first (the official keep-mask; PromptNet Encode does the same) and the padding is black, the background's
  colour. Seeded: the same seed gives the same copies. The reference latents and CLIP vision tokens are computed
  once per copy (frozen VAE and CLIP_VISION, no gradient);
* **per step**: the denoising targets and PromptNet's references are drawn from two independent random
  permutations of the mini-dataset (official), t ~ U{0..999}, ε ~ N(0, I);
* **trained**: every PromptNet parameter (of a copy; the input PromptNet is never changed) and a full-rank delta on
  every UNet ``to_q``/``to_k``/``to_v`` (self- and cross-attention; :class:`core.deltas.FullRankDeltas`, trained by
  bypass, returned as weight patches on a MODEL clone);
* **optimiser**: AdamW lr 2e-5, β (0.9, 0.999), weight decay 1e-2, ε 1e-8, batch 4, 100 steps (official).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..core.deltas import FullRankDeltas, find_unet_targets
from ..core.graph_patches import checkpointed_blocks
from ..core.host import PersonalizeError
from ..core.sampling import ModelPrediction
from ..core.tuning import Phase, TrainingSession, TuningConfig, TuningResult, run_loop, seeded_generator
from .profusion import PLACEHOLDER, PlaceholderPrompt, encode_reference, promptnet_loss

log = logging.getLogger("comfyui_personalize")

NODE = "ProFusion Tune"
PROMPT = "a photo of " + PLACEHOLDER  # the official tuning prompt (§5.6)
PADDING = ("reflection", "border", "zeros")
VISION_CHUNK = 8  # images per CLIP-vision call when the copies are encoded


@dataclass
class ProFusionTuneConfig(TuningConfig):
    """:class:`TuningConfig` with ProFusion's official defaults (§5.6) and its own options."""
    steps: int = 100
    learning_rate: float = 2e-5
    batch_size: int = 4
    weight_decay: float = 1e-2
    augmented_copies: int = 31
    tune_unet_qkv: bool = True
    prompt: str = PROMPT
    placeholder: str = PLACEHOLDER
    padding: str = "reflection"

    def validate(self, node: str) -> None:
        super().validate(node)
        if self.augmented_copies < 0:
            raise PersonalizeError(f"{node}: augmented_copies must be 0 or more (official: 31).")
        if self.padding not in PADDING:
            raise PersonalizeError(f"{node}: padding must be one of {list(PADDING)}.")


@dataclass
class MiniDataset:
    """The tuning set: ``pixels`` [N, S, S, 3] (index 0 = the image itself), user-space VAE ``latents``
    [N, C, h, w] and CLIP vision ``tokens`` [N, T, w] (``last_hidden_state``, as PromptNet Encode)."""
    pixels: torch.Tensor
    latents: torch.Tensor
    tokens: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]


def augment(pixels: torch.Tensor, copies: int, seed: int, padding: str = "reflection") -> torch.Tensor:
    """``copies`` augmented versions of ``pixels`` (IMAGE [1, S, S, 3]) → [copies, S, S, 3] (§5.6, official
    notebook): random horizontal flip (p = 0.5), then ``RandomAffine(degrees ±10, translate 0.2, scale 0.6-1.0)``
    with ``padding`` ('reflection', 'border' or 'zeros') where the move uncovers the frame (the official notebook
    inpaints there instead; see the module docstring). kornia draws from torch's CPU generator, seeded here inside a
    forked RNG state: the same seed gives the same copies, and the caller's global RNG is untouched."""
    if copies == 0:
        return pixels[:0]
    import kornia.augmentation as K
    x = pixels[..., :3].movedim(-1, 1).float().cpu().repeat(copies, 1, 1, 1)
    aug = K.AugmentationSequential(
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(degrees=10.0, translate=(0.2, 0.2), scale=(0.6, 1.0), padding_mode=padding, p=1.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        with torch.no_grad():
            out = aug(x)
    return out.clamp(0, 1).movedim(1, -1).contiguous()


def check_inputs(promptnet, model, clip, image: torch.Tensor, mask: torch.Tensor | None,
                 config: ProFusionTuneConfig, node: str = NODE) -> PlaceholderPrompt:
    """Everything that can be refused before any work: the config, one image, the mask (size, not empty), the
    PromptNet against the MODEL (family, widths) and the CLIP (text width), the prompt (one placeholder).
    Returns the prompt template."""
    config.validate(node)
    if promptnet is None:
        raise PersonalizeError(f"{node}: connect a PROMPTNET (Load PromptNet, or a PromptNet pre-trained for this "
                               "checkpoint).")
    if image.dim() != 4 or image.shape[-1] < 3:
        raise PersonalizeError(f"{node}: the image must be an IMAGE [1, H, W, 3]; got {tuple(image.shape)}.")
    if image.shape[0] != 1:
        raise PersonalizeError(f"{node}: ProFusion tunes on one image (it makes its own augmented copies); got a "
                               f"batch of {image.shape[0]}. Pick one with Image From Batch.")
    if mask is not None:
        m = mask.unsqueeze(0) if mask.dim() == 2 else mask
        if m.dim() != 3 or m.shape[0] != 1 or tuple(m.shape[-2:]) != tuple(image.shape[1:3]):
            raise PersonalizeError(f"{node}: the mask is {tuple(m.shape)} but the image {tuple(image.shape[1:3])}; "
                                   "give one mask of the image's size, or disconnect it.")
        if float(m.max()) <= 0:
            raise PersonalizeError(f"{node}: the mask is empty; paint the subject, or disconnect the mask.")
    promptnet.check_model(model, node)
    prompt = PlaceholderPrompt(clip, config.prompt, config.placeholder, node=node)
    promptnet.check_text(prompt.width, node)
    return prompt


def build_dataset(promptnet, vae, clip_vision, image: torch.Tensor, mask: torch.Tensor | None,
                  config: ProFusionTuneConfig, node: str = NODE) -> MiniDataset:
    """The image (PromptNet Encode's crop, mask and checks: CLIP vision width, VAE latent size) and its
    ``config.augmented_copies`` copies, VAE-encoded and CLIP-vision-encoded once, without gradient."""
    with torch.no_grad():
        ref = encode_reference(image, promptnet, vae, clip_vision, mask, node=node)
        padding = "zeros" if mask is not None else config.padding
        copies = augment(ref.image, config.augmented_copies, config.seed, padding)
        pixels = torch.cat([ref.image.float().cpu(), copies])
        latents, tokens = [ref.latent], [ref.vision_tokens]
        if copies.shape[0]:
            latents.append(vae.encode(copies).float().cpu())
            for i in range(0, copies.shape[0], VISION_CHUNK):
                tokens.append(clip_vision.encode_image(copies[i:i + VISION_CHUNK])["last_hidden_state"].float().cpu())
    return MiniDataset(pixels, torch.cat(latents), torch.cat(tokens))


class PermutationStream:
    """Indices 0..n−1 in random order, a fresh permutation whenever one is used up (epochs over the mini-dataset,
    as the official data loader's shuffling); all draws from ``generator``."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.gen, self.left = n, generator, []

    def take(self, k: int) -> torch.Tensor:
        out = []
        while len(out) < k:
            if not self.left:
                self.left = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self.left.pop(0))
        return torch.tensor(out)


class TuneRun:
    """Everything :func:`tune` trains with, as a context manager (the benchmark times :attr:`step_fn` with
    ``core.tuning.train_step``): the :class:`TrainingSession` (MODEL and CLIP clones; the CLIP made
    differentiable, S* is trained through it), the PromptNet copy, the q/k/v deltas (or None), the step closure
    ``step_fn(i) -> (loss, denoised)`` and ``params``."""

    def __init__(self, promptnet, model, clip, data: MiniDataset, config: ProFusionTuneConfig):
        self.src_promptnet, self.data, self.config = promptnet, data, config
        self.session = TrainingSession(model, clip, train_text=True,
                                       gradient_checkpointing=config.gradient_checkpointing)
        self.net = self.deltas = None

    def __enter__(self):
        config, data = self.config, self.data
        s = self.session.__enter__()
        try:
            if config.tune_unet_qkv:
                self.deltas = s.adopt(FullRankDeltas(find_unet_targets(s.model, "qkv")))
                self.deltas.attach(s.model)
            s.load()
            self.net = s.adopt(self.src_promptnet.copy())  # normal trainable tensors on the device, never the input
            self.net.requires_grad_(True).train()
            self._checkpoints = checkpointed_blocks(self.net, config.gradient_checkpointing)
            self._checkpoints.__enter__()
            base, device = s.model.model, s.device
            prompt = PlaceholderPrompt(s.clip, config.prompt, config.placeholder, node=NODE)
            x0 = base.process_latent_in(data.latents.clone().to(device))
            tokens = data.tokens.clone().to(device)
            sigmas = base.model_sampling.sigmas.float().cpu()
            prediction = ModelPrediction(s.model, through_wrapper=False)
            gen = seeded_generator(config.seed)
            targets, references = PermutationStream(len(data), gen), PermutationStream(len(data), gen)
            net, batch = self.net, config.batch_size

            def step(_i):
                ti, ri = targets.take(batch), references.take(batch)
                sigma = sigmas[torch.randint(0, len(sigmas), (batch,), generator=gen)].to(device)
                noise = torch.randn((batch, *x0.shape[1:]), generator=gen).to(device)
                return promptnet_loss(net, prompt, prediction, base.model_sampling, x0[ti.to(device)],
                                      x0[ri.to(device)], tokens[ri.to(device)], sigma, noise)

            self.step_fn = step
            self.params = list(self.net.parameters()) + (list(self.deltas.parameters()) if self.deltas else [])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def phase(self) -> Phase:
        return Phase(self.params, self.config.steps, self.step_fn)

    def __exit__(self, *exc):
        checkpoints, self._checkpoints = getattr(self, "_checkpoints", None), None
        try:
            if checkpoints is not None:
                checkpoints.__exit__(None, None, None)
        finally:
            self.session.__exit__(*exc)
        return False


def tune(promptnet, model, clip, vae, clip_vision, image: torch.Tensor, mask: torch.Tensor | None = None,
         config: ProFusionTuneConfig | None = None, node_id=None):
    """ProFusion's test-time tuning (§5.6) on one IMAGE [1, H, W, 3] (optional MASK [1, H, W]).

    Returns ``(promptnet, model, result)``: a tuned copy of ``promptnet`` (frozen, on the input's device), a
    ``model.clone()`` carrying the tuned q/k/v deltas as weight patches (``model`` itself when
    ``config.tune_unet_qkv`` is off) and the :class:`TuningResult` (losses, previews). The inputs are not changed.
    Raises :class:`PersonalizeError` before any work on bad input, and on a non-finite loss."""
    config = config or ProFusionTuneConfig()
    check_inputs(promptnet, model, clip, image, mask, config)
    data = build_dataset(promptnet, vae, clip_vision, image, mask, config)
    out_device = next(promptnet.parameters()).device
    with TuneRun(promptnet, model, clip, data, config) as run:
        result: TuningResult = run_loop(NODE, [run.phase()], config, device=run.session.device, node_id=node_id,
                                        preview_model=run.session.model)
        net, deltas = run.net, run.deltas
    net.requires_grad_(False).eval()
    net = net.to(out_device)
    net.path = None  # tuned: no longer the file it was loaded from
    out_model = deltas.patched(model) if deltas is not None else model
    return net, out_model, result

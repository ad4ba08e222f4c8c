"""Training the mini model family (core/mini_family.py) from scratch on the mini world, single process or under
``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU).

Stages, each a plain function on ComfyUI objects (imported through the pack, so the host must be booted):

1. :func:`train_vae` - ComfyUI's ``AutoencoderKL`` (the VAE object's ``first_stage_model``) as a KL-regularised
   autoencoder (Rombach et al. 2022, §3 / App. G, without the adversarial and perceptual terms): L1 + L2
   reconstruction in the VAE's [-1, 1] input space plus ``kl_weight``·KL(q(z|x) ‖ N(0, I)).
2. :func:`latent_scale` - the latent format's scale factor, 1/std of the posterior means (as SD's 0.18215 was
   chosen), so that the diffusion model sees unit-variance latents.
3. :func:`train_diffusion` - UNet and CLIP text encoder jointly, from scratch, with the DDPM ε-loss (Ho et al. 2020,
   Eq. 14) through the pack's own objective and tuning session (core/diffusion.py, core/tuning.py: the same code that
   personalises SD), weighted toward the subject's latent cells (:func:`subject_loss_weights`, the mask-weighted
   loss of HiFi Tuner Eq. 5 with a floor of 1 outside the subject), captions dropped to "" with probability
   ``uncond_prob`` for classifier-free guidance, and attribute words dropped at random so that class-word prompts
   ("a photo of a star on the beach") are in the training distribution.

The VAE is rounded to fp16 (what the file stores) before the pool is encoded, and each stage has its own
generator, so ``--vae-from`` with a stage-1 file continues exactly as the single run would.

Pairs (base subject name, scene) with :func:`is_heldout_prompt` are never shown in training: they are the
"held-out prompts of seen subjects" the base model's prompt following is measured on.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from . import world
from ..core import distributed

log = logging.getLogger("comfyui_personalize")


@dataclass
class FamilyTrainConfig:
    seed: int = 0
    vae_steps: int = 5400
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_subject_weight: float = 9.0  # reconstruction loss weight 1 + this x subject coverage (the mask is free)
    vae_crop: int = 32            # the first vae_crop_fraction of the VAE steps train on random crops of this size
    vae_crop_fraction: float = 0.9
    vae_ch: int = 32              # the VAE's base width (core/mini_family.vae_config); the file records it
    vae_res_blocks: int = 1       # residual blocks per VAE level
    vae_ch_mult: tuple = (1, 1, 2, 2)  # each level's width in units of vae_ch (64, 32, 16, 8 px; --set vae_ch_mult=1,2,4,4)
    vae_pool: int = 0             # > 0: render this many images once and draw the VAE batches from them (a GPU
                                  # trains faster than the CPU renders); 0: render every batch afresh
    kl_weight: float = 1e-6
    pool_size: int = 16000        # training images rendered and encoded once for the diffusion stage (all ranks)
    diffusion_steps: int = 3200
    diffusion_batch: int = 64
    diffusion_lr: float = 5e-4
    diffusion_subject_weight: float = 4.0  # ε-loss weight 1 + this x subject coverage of each latent cell
    diffusion_snr_gamma: float = 0.0  # > 0: Min-SNR-γ timestep weighting of the ε-loss (core/diffusion.py)
    uncond_prob: float = 0.1
    drop_attribute_prob: float = 0.25
    log_every: int = 100
    checkpoint_every: int = 0     # > 0: hand the family to on_checkpoint every this many diffusion steps (the script
                                  # writes it, so a run stopped by a time limit keeps its last checkpoint)
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Distributed: the helpers live in core/distributed.py (shared with scripts/train_evaluators.py).

def dist_info() -> tuple[int, int]:
    return distributed.rank_and_world()


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (core/distributed.py): nccl when ComfyUI runs on CUDA
    and every local rank has a GPU, else gloo."""
    if not distributed.launched_by_torchrun():
        return False
    import comfy.model_management as mm
    return distributed.init(cuda=mm.get_torch_device().type == "cuda")


# ---------------------------------------------------------------------------------------------------------
# Data.

def is_heldout_prompt(subject: world.Subject, scene: str) -> bool:
    """One (caption name, scene) pair in ten, by a stable hash, is reserved for evaluating prompt following."""
    digest = hashlib.sha256(f"{subject.name}|{scene}".encode()).digest()
    return digest[0] % 10 == 0


def training_samples(n: int, generator: torch.Generator):
    """``n`` base-training samples (name-balanced, :func:`world.training_batch`) excluding held-out prompts:
    ``(images [n, 64, 64, 3], subject masks [n, 64, 64], subjects, scenes)``."""
    batches, kept = [], 0
    while kept < n:
        b = world.training_batch(min(1024, max(64, n - kept)), generator)  # chunks: 4x supersampled renders are big
        keep = [i for i in range(len(b.captions)) if not is_heldout_prompt(b.subjects[i], b.scenes[i])][: n - kept]
        batches.append((b, keep))
        kept += len(keep)
    images = torch.cat([b.images[k] for b, k in batches])
    masks = torch.cat([b.masks[k] for b, k in batches])
    subjects = [b.subjects[i] for b, k in batches for i in k]
    scenes = [b.scenes[i] for b, k in batches for i in k]
    return images, masks, subjects, scenes


def training_caption(subject: world.Subject, scene: str, generator: torch.Generator, drop_prob: float,
                     uncond_prob: float) -> str:
    """The caption, with the pattern and/or colour word dropped (each with ``drop_prob``) or, with
    ``uncond_prob``, the empty prompt."""
    r = torch.rand(3, generator=generator).tolist()
    if r[0] < uncond_prob:
        return ""
    words = []
    if subject.pattern != "plain" and r[1] >= drop_prob:
        words.append(subject.pattern)
    if r[2] >= drop_prob:
        words.append(subject.colour)
    words.append(subject.shape)
    name = " ".join(words)
    return f"a photo of {world.article(name)} {name} {world.SCENE_PHRASES[scene]}"


def _schedule(step: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over the first 5 % of the steps (at most 300), then cosine decay."""
    warmup = max(1, min(300, total // 20))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


# ---------------------------------------------------------------------------------------------------------
# Stage 1: the VAE.

class _VAETrainer(torch.nn.Module):
    """Posterior sample, reconstruction and KL of ComfyUI's AutoencoderKL (its encoder/quant_conv/post_quant_conv/
    decoder submodules, the same the VAE object runs)."""

    def __init__(self, autoencoder):
        super().__init__()
        self.ae = autoencoder

    def encode_moments(self, x):
        return self.ae.quant_conv(self.ae.encoder(x)).chunk(2, dim=1)

    def forward(self, x, noise):
        mean, logvar = self.encode_moments(x)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * noise
        rec = self.ae.decoder(self.ae.post_quant_conv(z))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        return rec, kl


def fp32_autoencoder(vae):
    """The VAE's autoencoder in float32: itself on the CPU, a float32 copy where the host keeps it in half
    precision (bf16 on recent GPUs), so latents and reconstructions do not depend on the device."""
    ae = vae.first_stage_model
    if next(ae.parameters()).dtype == torch.float32:
        return ae
    import copy
    return copy.deepcopy(ae).float()


def _vae_device(vae) -> torch.device:
    """Where ComfyUI runs this VAE (``VAE.device``: the GPU unless the host was booted with ``--cpu``)."""
    return torch.device(getattr(vae, "device", None) or "cpu")


def train_vae(vae, cfg: FamilyTrainConfig, generator: torch.Generator, progress=None) -> list[float]:
    rank, world_size = dist_info()
    ae = vae.first_stage_model
    device = _vae_device(vae)
    ae.to(device).train().float().requires_grad_(True)
    trainer = distributed.wrap(_VAETrainer(ae))
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    losses, t0 = [], time.perf_counter()
    pool = None
    if cfg.vae_pool > 0:
        chunks = [world.training_batch(min(1024, cfg.vae_pool - i), generator) for i in range(0, cfg.vae_pool, 1024)]
        pool = (torch.cat([c.images for c in chunks]), torch.cat([c.masks for c in chunks]))
        log.info("VAE pool: %d images rendered in %.1f s", pool[0].shape[0], time.perf_counter() - t0)
    for step in range(cfg.vae_steps):
        lr = cfg.vae_lr * _schedule(step, cfg.vae_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        cropped = 0 < cfg.vae_crop < world.IMAGE_SIZE and step < cfg.vae_crop_fraction * cfg.vae_steps
        if pool is None:
            images, masks = (batch := world.training_batch(cfg.vae_batch, generator)).images, batch.masks
        else:
            pick = torch.randint(0, pool[0].shape[0], (cfg.vae_batch,), generator=generator)
            images, masks = pool[0][pick], pool[1][pick]
        x = images.movedim(-1, 1) * 2.0 - 1.0
        weight = 1.0 + cfg.vae_subject_weight * masks[:, None]
        if cropped:
            # the autoencoder is convolutional: one random latent-grid-aligned crop per image costs a quarter of
            # the whole image at 32 px, so the cropped phase takes ~4x the optimiser steps in the same time; the
            # last phase trains on whole images (the mid-block attention then sees the full 8x8 latent)
            offsets = torch.randint(0, (world.IMAGE_SIZE - cfg.vae_crop) // 8 + 1, (x.shape[0], 2),
                                    generator=generator) * 8
            c = cfg.vae_crop
            x = torch.stack([img[:, a:a + c, b:b + c] for img, (a, b) in zip(x, offsets.tolist())])
            weight = torch.stack([w[:, a:a + c, b:b + c] for w, (a, b) in zip(weight, offsets.tolist())])
        noise = torch.randn((x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8), generator=generator)
        x, weight, noise = x.to(device), weight.to(device), noise.to(device)  # the world renders on the CPU
        rec, kl = trainer(x, noise)
        # the subject is a small share of the pixels, the scene textures' fine noise is incompressible: weighting
        # the subject's pixels keeps the latent's capacity on shape and colour
        err = rec - x
        loss = (weight * (err.abs() + err.pow(2))).mean() / weight.mean() + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            progress("vae", step + 1, cfg.vae_steps, losses)
        if rank == 0 and (step + 1) % cfg.log_every == 0:
            log.info("vae step %d/%d loss %.4f (%.1f s)", step + 1, cfg.vae_steps,
                     sum(losses[-cfg.log_every:]) / cfg.log_every, time.perf_counter() - t0)
    ae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_means(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of IMAGE tensors ``[N, 64, 64, 3]`` (user-space latents before any scale factor)."""
    ae = fp32_autoencoder(vae)
    trainer = _VAETrainer(ae)
    device = next(ae.parameters()).device
    out = [trainer.encode_moments(images[i:i + batch].to(device).movedim(-1, 1).float() * 2.0 - 1.0)[0].cpu()
           for i in range(0, images.shape[0], batch)]
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [0, 1]) of decode(posterior mean) against ``images [N, 64, 64, 3]``."""
    ae = fp32_autoencoder(vae)
    device = next(ae.parameters()).device
    means = encode_means(vae, images).to(device)
    rec = ((ae.decoder(ae.post_quant_conv(means)) + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()
    mse = (rec - images.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


def latent_scale(means: torch.Tensor) -> float:
    """The latent format's scale factor: 1/std of the posterior means (across ranks)."""
    mean = distributed.mean_across_ranks
    var = mean(float(means.float().pow(2).mean())) - mean(float(means.float().mean())) ** 2
    return 1.0 / math.sqrt(max(var, 1e-12))


# ---------------------------------------------------------------------------------------------------------
# Stage 3: UNet + text encoder.

class _DiffusionTrainer(torch.nn.Module):
    """ε-loss of the MODEL with captions encoded by the (trainable) CLIP text encoder, through the pack's
    DiffusionObjective (the host's apply_model and model_sampling)."""

    def __init__(self, objective, base_model, text_encoder, snr_gamma: float = 0.0):
        super().__init__()
        self.objective = objective
        self.snr_gamma = snr_gamma
        self.base = base_model
        self.text = text_encoder

    def forward(self, tokens, idx, sigma, noise):
        cond = self.text(tokens)[0]
        # weighted by the objective's masks, if any, and by Min-SNR-γ when snr_gamma > 0
        loss, _ = self.objective.loss(cond, idx, sigma, noise, snr_gamma=self.snr_gamma)
        return loss


def subject_loss_weights(masks: torch.Tensor, latent_size: tuple[int, int], weight: float) -> torch.Tensor | None:
    """Per-latent-cell ε-loss weights ``1 + weight x subject coverage`` (``[N, 1, h, w]``), or None for weight 0.

    The scenes' fine texture noise is unpredictable and dominates the plain ε-MSE at low noise; the subject is a
    small share of the cells. Weighting the subject's cells (the masks come free with the world) spends the
    denoiser's capacity on what prompts ask for - shape and colour - as the VAE stage's weighted reconstruction
    does. The loss is the weighted mean (:func:`kernels.losses.masked_mse`), so its scale does not change."""
    if weight <= 0:
        return None
    from ..kernels.losses import resize_mask_to
    return 1.0 + weight * resize_mask_to(masks, latent_size)


def train_diffusion(model, clip, latents: torch.Tensor, subjects, scenes, cfg: FamilyTrainConfig,
                    generator: torch.Generator, progress=None, masks: torch.Tensor | None = None) -> list[float]:
    """Train MODEL's UNet and CLIP's text encoder (in place) on ``latents`` (user-space, scaled) and captions;
    ``masks`` ``[N, 64, 64]`` (the subjects' masks) weight the loss by :func:`subject_loss_weights`."""
    from ..core.diffusion import DiffusionObjective
    from ..core.tuning import TrainingSession
    rank, world_size = dist_info()
    losses, t0 = [], time.perf_counter()
    with TrainingSession(model, clip, train_text=True) as s:
        s.load()
        unet = s.model.model
        text = s.clip.cond_stage_model.clip_l
        # full-weight training needs float32 master weights: on a GPU the host keeps the text encoder in fp16
        # (and may keep the UNet in half precision), where AdamW's updates underflow or overflow
        unet.diffusion_model.float()
        unet.diffusion_model.dtype = torch.float32  # the dtype ComfyUI's UNetModel casts its input to
        text.float()
        unet.diffusion_model.requires_grad_(True)
        text.requires_grad_(True)
        for p in list(text.parameters()):
            if p.ndim == 0:  # logit_scale and the like: unused by the loss
                p.requires_grad_(False)
        proj = getattr(text.transformer, "text_projection", None)
        if proj is not None:
            proj.requires_grad_(False)  # only the pooled output uses it; SD1 conditions on the hidden states
        weights = None if masks is None else subject_loss_weights(masks, tuple(latents.shape[-2:]),
                                                                  cfg.diffusion_subject_weight)
        objective = DiffusionObjective(s.model, latents, weights, generator)
        trainer = distributed.wrap(_DiffusionTrainer(objective, unet, text, cfg.diffusion_snr_gamma))
        params = [p for p in list(unet.diffusion_model.parameters()) + list(text.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.diffusion_lr, weight_decay=0.01, foreach=True)
        tokenizer, token_cache = clip.tokenizer, {}

        def tokens_of(caption: str) -> list[int]:  # the world has a few thousand captions: BPE each once
            if caption not in token_cache:
                token_cache[caption] = [t for t, _w in tokenizer.tokenize_with_weights(caption)["l"][0]]
            return token_cache[caption]

        for step in range(cfg.diffusion_steps):
            lr = cfg.diffusion_lr * _schedule(step, cfg.diffusion_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            idx, sigma, noise = objective.sample(cfg.diffusion_batch)
            captions = [training_caption(subjects[i], scenes[i], generator, cfg.drop_attribute_prob,
                                         cfg.uncond_prob) for i in idx.tolist()]
            tokens = [tokens_of(c) for c in captions]
            loss = trainer(tokens, idx, sigma, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"diffusion loss became {value} at step {step + 1}; lower diffusion_lr")
            losses.append(value)
            if progress:
                progress("diffusion", step + 1, cfg.diffusion_steps, losses)
            if rank == 0 and (step + 1) % cfg.log_every == 0:
                log.info("diffusion step %d/%d loss %.4f (%.1f s)", step + 1, cfg.diffusion_steps,
                         sum(losses[-cfg.log_every:]) / cfg.log_every, time.perf_counter() - t0)
        unet.diffusion_model.requires_grad_(False)
        text.requires_grad_(False)
    return losses


def token_ids_of_world(clip) -> torch.Tensor:
    """Every token id the world's captions and prompts use (the rows the file stores), plus a few rare words
    users pick as placeholders."""
    words = set(world.SHAPES) | set(world.COLOURS) | set(world.PATTERNS)
    texts = [" ".join(sorted(words)), "a photo of an", *world.SCENE_PHRASES.values(), "sks ohwx zwx object thing"]
    ids = set()
    for t in texts:
        for tok, _w in clip.tokenize(t)["l"][0]:
            ids.add(int(tok))
    return torch.tensor(sorted(ids), dtype=torch.int64)


def train_family(cfg: FamilyTrainConfig, progress=None, vae_state: dict | None = None, on_vae_trained=None,
                 init_state: tuple[dict, dict] | None = None, on_checkpoint=None):
    """All stages from a fresh initialisation (or, with ``vae_state``, a trained VAE's ``first_stage_model``
    weights, skipping stage 1; with ``init_state`` = (UNet ``diffusion_model``, text encoder ``clip_l``) state
    dicts, the diffusion stage continues from those weights instead of a fresh initialisation).
    ``on_vae_trained(model, clip, vae)`` runs after stage 1 (the script saves the family there, so a long run's
    autoencoder survives an interrupted diffusion stage); ``on_checkpoint(model, clip, vae, scale, step)`` every
    ``cfg.checkpoint_every`` diffusion steps (not after the last). Returns ``(model, clip, vae, scale_factor,
    report)``; every rank ends with identical weights (DDP), rank 0 writes the file (scripts/train_mini_world.py)."""
    from ..core import mini_family
    rank, world_size = dist_info()
    torch.manual_seed(cfg.seed)
    model, clip, vae = mini_family.build(seed=cfg.seed,
                                         vae_cfg=mini_family.vae_config(cfg.vae_ch, cfg.vae_res_blocks,
                                                                              cfg.vae_ch_mult))
    if init_state is not None:
        model.model.diffusion_model.load_state_dict(init_state[0])
        clip.cond_stage_model.clip_l.load_state_dict(init_state[1])
    # one generator per stage: the diffusion stage draws the same data whether the VAE was trained in this run or
    # reused with --vae-from, so a two-part run gives the same weights as one
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    t0 = time.perf_counter()
    # the family trains and is written from float32 weights: on a GPU the host would keep the VAE in bf16 (its
    # VAE.vae_dtype), which would round a reused VAE and the latents the diffusion stage learns; the VAE object then
    # encodes and decodes in float32 too (its vae_dtype), so it stays usable in-process
    vae.first_stage_model.float()
    vae.vae_dtype = torch.float32
    if vae_state is None:
        vae_losses = train_vae(vae, cfg, generator, progress)
        if on_vae_trained is not None:
            on_vae_trained(model, clip, vae)
    else:
        vae.first_stage_model.load_state_dict(vae_state)
        vae.first_stage_model.eval().requires_grad_(False)
        vae_losses = []
    with torch.no_grad():  # the file stores fp16: the diffusion stage trains on latents of the VAE that ships
        for p in vae.first_stage_model.parameters():
            p.copy_(p.half().float())
    t_vae = time.perf_counter() - t0
    psnr = reconstruction_psnr(vae, world.training_batch(128, torch.Generator().manual_seed(4242)).images)
    log.info("VAE reconstruction PSNR %.2f dB", psnr)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + rank)
    images, masks, subjects, scenes = training_samples(cfg.pool_size // world_size, generator)
    means = encode_means(vae, images)
    scale = latent_scale(means)
    model.model.latent_format.scale_factor = scale

    def progress_and_checkpoint(stage, step, total, losses):
        if progress:
            progress(stage, step, total, losses)
        if (on_checkpoint and stage == "diffusion" and cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
                and step < total):
            on_checkpoint(model, clip, vae, scale, step)

    diff_losses = train_diffusion(model, clip, means, subjects, scenes, cfg, generator, progress_and_checkpoint,
                                  masks=masks)
    distributed.check_replicas_identical(model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model)
    report = {"config": asdict(cfg), "world_size": world_size, "vae_seconds": round(t_vae, 1),
              "vae_psnr_db": round(psnr, 2), "vae_reused": vae_state is not None,
              "diffusion_continued": init_state is not None,
              "total_seconds": round(time.perf_counter() - t0, 1), "scale_factor": scale,
              "vae_final_loss": sum(vae_losses[-50:]) / len(vae_losses[-50:]) if vae_losses else None,
              "diffusion_final_loss": sum(diff_losses[-50:]) / max(1, len(diff_losses[-50:]))}
    return model, clip, vae, scale, report

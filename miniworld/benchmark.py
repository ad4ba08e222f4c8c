"""The mini-world personalisation benchmark (`make eval`): every method of the pack on held-out subjects, scored the
way the papers score (DreamBooth, Ruiz et al. 2023, §4.1 / Table 1): subject fidelity (DINO), image similarity
(CLIP-I), prompt fidelity (CLIP-T), plus tuning time and parameter bytes per subject, with two bounds:

* **real images** - the world's own renders of the subject in each prompt's scene (new poses), against the same
  references: the ceiling the evaluators allow;
* **base model, class word only** - the prompt names the class ("a photo of a star on the beach"): the floor a
  personalisation method must beat.

A third baseline, **base model, full description**, names every attribute ("a photo of a striped blue star on the
beach"): held-out subjects are novel combinations of seen attributes, so this row is what words alone achieve.

Each method runs through the pack's nodes and ComfyUI's stock nodes, called the way the executor calls them
(``NODE_CLASS_MAPPINGS[...]().FUNCTION(**inputs)``): Train Subject Embedding (Textual Inversion), Train Subject
LoRA (DreamBooth-LoRA), HiFi Subject Tune + HiFi Subject Conditioning (with its ablation switches), then
CLIPTextEncode -> KSampler -> VAEDecode. Every row samples with the same sampler, steps, cfg and seeds.

The evaluators (miniworld/evaluators.py) play DINO (identity embedding), CLIP-I (holistic image embedding) and
CLIP-T (here: the predicted probability of the prompt's scene, since the personalised prompts name the subject by a
token the classifier cannot read). "attributes" is the share of images whose shape, colour and pattern are the
subject's (the most literal subject-fidelity measure this world allows).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..methods.hifi_tuner import REG_WEIGHT
from . import world
from .evaluators import Evaluator

log = logging.getLogger("comfyui_personalize")

TOKEN = "sks"
HIFI_ABLATIONS = {
    "hifi": {},
    "hifi-no-mask": {"use_mask": False},
    "hifi-no-reg": {"use_regularisation": False},
    "hifi-no-stepwise": {"use_stepwise": False},
}
METHODS = ("ti", "lora", *HIFI_ABLATIONS)
#: the methods as a user runs them (default settings): what the "beats the base model" gate covers; the ablation
#: rows are diagnostics, and one of them (no mask) is expected to fall to the floor
GATED_METHODS = ("ti", "lora", "hifi")
METHOD_TITLES = {
    "real": "real images (world renders)",
    "base-class": "base model, class word only",
    "base-full": "base model, full description",
    "ti": "Textual Inversion",
    "lora": "DreamBooth-LoRA (rank 4)",
    "hifi": "HiFi Tuner",
    "hifi-no-mask": "HiFi Tuner, no mask",
    "hifi-no-reg": "HiFi Tuner, no regularisation",
    "hifi-no-stepwise": "HiFi Tuner, no step-wise",
}


@dataclass
class BenchConfig:
    subjects: int = 6            # held-out subjects (spread over the held-out list)
    seeds: int = 2               # images per (subject, prompt)
    sampler_steps: int = 20      # ddim / ddim_uniform: hits HiFi's step-wise timesteps exactly
    cfg: float = 5.0
    ti_steps: int = 300
    # Textual Inversion at the node's default learning rate and the paper's batch of 8 (Gal et al. 2022, §4:
    # batch 4 on 2 GPUs). Measured on the shipped family (README, "Textual Inversion's settings"): at batch 2 with
    # lr 2e-2 .. 1.5e-1 the vector stayed in the class word's basin (its nearest token the class word, its norm
    # 12-70x the vocabulary's mean) and TI scored below the class-word floor, as it did at batch 8 with lr 4e-2.
    ti_lr: float = 5e-3
    ti_batch_size: int = 8
    lora_steps: int = 200
    lora_lr: float = 6e-3
    lora_rank: int = 4
    hifi_global_steps: int = 300
    hifi_steps_per_step: int = 3
    hifi_lr: float = 2e-2
    hifi_reg_weight: float = REG_WEIGHT  # w_s of Eq. 6 (the node's reg_weight default)
    batch_size: int = 2
    methods: tuple[str, ...] = METHODS
    seed: int = 0


@dataclass
class Row:
    method: str
    subject_fidelity: float
    image_similarity: float
    prompt_fidelity: float
    attributes: float
    tune_seconds: float | None
    bytes_per_subject: int | None
    images: int
    per_subject: list[float] = field(default_factory=list)  # subject fidelity per subject

    @property
    def title(self) -> str:
        return METHOD_TITLES.get(self.method, self.method)


@dataclass
class Personalised:
    """What a method hands to generation: the MODEL/CLIP to sample with, a prompt per scene, an optional
    conditioning transform (HiFi), and its cost."""
    model: object
    clip: object
    prompts: list[str]
    seconds: float = 0.0
    nbytes: int = 0
    transform: object = None


def call(node_map: dict, class_type: str, **inputs):
    """Run a node the way ComfyUI's executor does: a fresh instance, its FUNCTION, under inference mode (the
    training nodes switch it off for themselves)."""
    cls = node_map[class_type]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def pick_subjects(n: int) -> list[world.HeldoutSubject]:
    """``n`` held-out subjects, every 7th of the held-out list, cyclically (7 is coprime to its 24 entries; the first
    six mix all 4 patterns and 4 shapes). Deterministic."""
    kits = world.heldout_set(seed=0)
    n = max(1, min(n, len(kits)))
    return [kits[(7 * i) % len(kits)] for i in range(n)]


class Benchmark:
    """Runs the rows. ``node_map`` is ComfyUI's ``nodes.NODE_CLASS_MAPPINGS`` with the pack loaded."""

    def __init__(self, node_map: dict, model, clip, vae, evaluator: Evaluator, cfg: BenchConfig,
                 run_name: str = "bench") -> None:
        self.nodes, self.model, self.clip, self.vae = node_map, model, clip, vae
        self.evaluator, self.cfg, self.run_name = evaluator, cfg, run_name

    # ---------------------------------------------------------------------------------------------- generation

    def generate(self, p: Personalised, kit: world.HeldoutSubject) -> torch.Tensor:
        """One image per (scene prompt, seed): IMAGE [len(prompts) * seeds, 64, 64, 3]."""
        return sample_captions(self.nodes, p.model, p.clip, self.vae, p.prompts, steps=self.cfg.sampler_steps,
                               cfg=self.cfg.cfg, seed=self.cfg.seed * 1000, per_caption=self.cfg.seeds,
                               transform=p.transform)

    def real_images(self, kit: world.HeldoutSubject) -> torch.Tensor:
        scenes = [sc for sc in kit.scenes for _ in range(self.cfg.seeds)]
        seeds = [10_000 + 97 * i + self.cfg.seed for i in range(len(scenes))]
        return world.render_batch([kit.subject] * len(scenes), scenes, seeds).images

    # ---------------------------------------------------------------------------------------------- methods

    def _references(self, kit: world.HeldoutSubject) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([r.image for r in kit.references]), torch.stack([r.mask for r in kit.references]))

    def personalise(self, method: str, kit: world.HeldoutSubject, index: int) -> Personalised:
        c = self.cfg
        if method == "base-class":
            return Personalised(self.model, self.clip, list(kit.prompts))
        if method == "base-full":
            return Personalised(self.model, self.clip, [world.caption(kit.subject, sc) for sc in kit.scenes])
        images, masks = self._references(kit)
        name = f"{self.run_name}_{method}_{index}"
        t0 = time.perf_counter()
        if method == "ti":
            clip, _emb, _loss, _prev = call(
                self.nodes, "PersonalizeTrainSubjectEmbedding", model=self.model, clip=self.clip, vae=self.vae,
                images=images, placeholder=TOKEN, init_word=kit.class_word, steps=c.ti_steps,
                learning_rate=c.ti_lr, batch_size=c.ti_batch_size, seed=c.seed + index, embedding_name=name,
                overwrite=True, mask=masks)
            path = _artifact("embeddings", name)
            prompts = [world.class_prompt(TOKEN, sc) for sc in kit.scenes]
            return Personalised(self.model, clip, prompts, time.perf_counter() - t0, path.stat().st_size)
        if method == "lora":
            model, clip, lora_name, _loss, _prev = call(
                self.nodes, "PersonalizeTrainSubjectLoRA", model=self.model, clip=self.clip, vae=self.vae,
                images=images, instance_prompt=f"a photo of a {TOKEN} {kit.class_word}",
                rank=c.lora_rank, steps=c.lora_steps, learning_rate=c.lora_lr, batch_size=c.batch_size,
                seed=c.seed + index, layers="attention", train_text_encoder=False, lora_name=name, overwrite=True,
                mask=masks)
            path = _artifact("loras", lora_name)
            return Personalised(model, clip, list(kit.prompts_with(TOKEN)), time.perf_counter() - t0,
                                path.stat().st_size)
        if method in HIFI_ABLATIONS:
            switches = {"use_mask": True, "use_regularisation": True, "use_stepwise": True, **HIFI_ABLATIONS[method]}
            subject, _loss, file_name = call(
                self.nodes, "PersonalizeHiFiSubjectTune", model=self.model, clip=self.clip, vae=self.vae,
                images=images, caption=f"a photo of {world.article(kit.class_word)} {kit.class_word}",
                n_tokens=5, global_steps=c.hifi_global_steps, steps_per_step=c.hifi_steps_per_step,
                sampling_steps=c.sampler_steps, learning_rate=c.hifi_lr, reg_weight=c.hifi_reg_weight, seed=c.seed + index,
                subject_name=name, overwrite=True, mask=masks, batch_size=c.batch_size, **switches)
            seconds = time.perf_counter() - t0
            path = _artifact("personalize_subjects", file_name)

            def transform(conditioning, _subject=subject, _stepwise=switches["use_stepwise"]):
                return call(self.nodes, "PersonalizeHiFiSubjectConditioning", conditioning=conditioning,
                            subject=_subject, use_stepwise=_stepwise)[0]

            return Personalised(self.model, self.clip, list(kit.prompts), seconds, path.stat().st_size, transform)
        raise ValueError(f"unknown method {method!r}; known: real, base-class, base-full, {', '.join(METHODS)}")

    # ---------------------------------------------------------------------------------------------- scoring

    def score(self, method: str, images: list[torch.Tensor], kits: list[world.HeldoutSubject],
              seconds: list[float], nbytes: list[int]) -> Row:
        fid, sim, pf, attr, per = [], [], [], [], []
        for imgs, kit in zip(images, kits):
            refs, _ = self._references(kit)
            f = self.evaluator.subject_fidelity(imgs, refs)
            fid.append(f)
            per.append(float(f.mean()))
            sim.append(self.evaluator.image_similarity(imgs, refs))
            scene_prompts = [p for p in kit.prompts for _ in range(self.cfg.seeds)]
            pf.append(self.evaluator.prompt_fidelity(imgs, scene_prompts, attributes=("scene",)))
            out = self.evaluator.classify(imgs)
            s = kit.subject
            attr.append(torch.tensor([out["shape"].labels[i] == s.shape and out["colour"].labels[i] == s.colour
                                      and out["pattern"].labels[i] == s.pattern for i in range(len(imgs))],
                                     dtype=torch.float32))
        mean = lambda xs: float(torch.cat(xs).mean())  # noqa: E731
        return Row(method, mean(fid), mean(sim), mean(pf), mean(attr),
                   sum(seconds) / len(seconds) if seconds else None,
                   int(sum(nbytes) / len(nbytes)) if nbytes else None, sum(len(i) for i in images), per)

    def run(self, methods: tuple[str, ...] | None = None, kits: list[world.HeldoutSubject] | None = None) -> list[Row]:
        kits = kits or pick_subjects(self.cfg.subjects)
        methods = methods or ("real", "base-class", "base-full", *self.cfg.methods)
        rows = []
        for method in methods:
            t0 = time.perf_counter()
            images, seconds, nbytes = [], [], []
            for i, kit in enumerate(kits):
                if method == "real":
                    images.append(self.real_images(kit))
                    continue
                p = self.personalise(method, kit, i)
                images.append(self.generate(p, kit))
                if method not in ("base-class", "base-full"):
                    seconds.append(p.seconds)
                    nbytes.append(p.nbytes)
            row = self.score(method, images, kits, seconds, nbytes)
            if method in ("real", "base-class", "base-full"):
                row.tune_seconds, row.bytes_per_subject = None, 0
            rows.append(row)
            log.info("%s: subject fidelity %.3f (%.0f s)", row.title, row.subject_fidelity, time.perf_counter() - t0)
        return rows


# ------------------------------------------------------------------------------------------------- prompt following

SCENE_TARGET, SHAPE_COLOUR_TARGET = 0.90, 0.80
"""The base model's prompt-following targets (issue 4) on held-out prompts of seen subjects."""


def heldout_prompts(n: int, seed: int = 0) -> list[tuple[world.Subject, str]]:
    """``n`` (base subject, scene) pairs never shown in base training (train_family.is_heldout_prompt)."""
    from .train_family import is_heldout_prompt
    g = torch.Generator().manual_seed(seed)
    pairs = [(s, sc) for s in world.base_subjects() for sc in world.SCENES if is_heldout_prompt(s, sc)]
    return [pairs[i] for i in torch.randperm(len(pairs), generator=g)[:n].tolist()]


def prompt_following(evaluator: Evaluator, images: torch.Tensor, pairs) -> dict[str, float]:
    """Share of images whose scene / shape / shape and main colour are the prompt's."""
    out = evaluator.classify(images)
    scene = [out["scene"].labels[i] == sc for i, (_s, sc) in enumerate(pairs)]
    shape = [out["shape"].labels[i] == s.shape for i, (s, _sc) in enumerate(pairs)]
    both = [shape[i] and out["colour"].labels[i] == s.colour for i, (s, _sc) in enumerate(pairs)]
    return {"scene": sum(scene) / len(pairs), "shape": sum(shape) / len(pairs), "shape+colour": sum(both) / len(pairs)}


def _per_caption(node_map: dict, clip, vae, captions: list[str], sample, transform=None) -> torch.Tensor:
    """The loop both samplers below share: encode the empty prompt once and each caption (then
    ``transform(conditioning)`` when given), ``sample(k, positive, negative) -> LATENT``, VAEDecode; IMAGE."""
    with torch.inference_mode():
        negative = call(node_map, "CLIPTextEncode", clip=clip, text="")[0]
        images = []
        for k, text in enumerate(captions):
            positive = call(node_map, "CLIPTextEncode", clip=clip, text=text)[0]
            if transform is not None:
                positive = transform(positive)
            images.append(call(node_map, "VAEDecode", samples=sample(k, positive, negative), vae=vae)[0])
    return torch.cat(images).float()


def sample_captions(node_map: dict, model, clip, vae, captions: list[str], *, steps: int = 20, cfg: float = 5.0,
                    seed: int = 0, per_caption: int = 1, transform=None, sampler: str = "ddim",
                    scheduler: str = "ddim_uniform") -> torch.Tensor:
    """``per_caption`` images per caption (one latent batch, KSampler seed ``seed + k`` for caption ``k``) through
    stock nodes: CLIPTextEncode (then ``transform(conditioning)`` when given: a method's conditioning edit),
    KSampler (``sampler`` / ``scheduler``, ddim / ddim_uniform by default) against the empty prompt, VAEDecode.
    IMAGE ``[len(captions) * per_caption, ...]``."""
    def sample(k, positive, negative):
        latent = call(node_map, "EmptyLatentImage", width=world.IMAGE_SIZE, height=world.IMAGE_SIZE,
                      batch_size=per_caption)[0]
        return call(node_map, "KSampler", model=model, seed=seed + k, steps=steps, cfg=cfg, sampler_name=sampler,
                    scheduler=scheduler, positive=positive, negative=negative, latent_image=latent, denoise=1.0)[0]
    return _per_caption(node_map, clip, vae, captions, sample, transform)


def restart_captions(node_map: dict, model, clip, latents: torch.Tensor, vae, captions: list[str], start_step: int,
                     *, steps: int = 20, cfg: float = 5.0, seed: int = 0, sampler: str = "ddim",
                     scheduler: str = "ddim_uniform") -> torch.Tensor:
    """Where does the denoiser lose the prompt? Each user-space latent ``latents[k]`` (an encoded world render of
    ``captions[k]``) is noised to the sigma of step ``start_step`` of ``steps`` and the rest is sampled with stock
    KSamplerAdvanced (``start_at_step``; seed ``seed + k``), then VAEDecode: at ``start_step`` 0 it is plain
    sampling, near ``steps`` it approaches the VAE's own reconstruction. IMAGE ``[len(captions), ...]``."""
    def sample(k, positive, negative):
        return call(node_map, "KSamplerAdvanced", model=model, add_noise="enable", noise_seed=seed + k, steps=steps,
                    cfg=cfg, sampler_name=sampler, scheduler=scheduler, positive=positive, negative=negative,
                    latent_image={"samples": latents[k:k + 1].clone()}, start_at_step=start_step, end_at_step=10000,
                    return_with_leftover_noise="disable")[0]
    return _per_caption(node_map, clip, vae, captions, sample)


def _artifact(folder: str, name: str) -> Path:
    """The file a node just wrote into ComfyUI's model folder ``folder`` (``name`` with or without its extension)."""
    import folder_paths
    for candidate in (name, f"{name}.safetensors"):
        path = folder_paths.get_full_path(folder, candidate)
        if path:
            return Path(path)
    raise FileNotFoundError(f"{name} not found in the {folder!r} model folders")


def format_table(rows: list[Row], cfg: BenchConfig, kits: int) -> str:
    head = ("| method | subject fidelity (DINO analog) | image similarity (CLIP-I analog) | prompt fidelity "
            "(CLIP-T analog, scene) | attributes right | tuning s / subject | bytes / subject |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        t = "-" if r.tune_seconds is None else f"{r.tune_seconds:.1f}"
        b = "0" if not r.bytes_per_subject else f"{r.bytes_per_subject:,}"
        lines.append(f"| {r.title} | {r.subject_fidelity:.3f} | {r.image_similarity:.3f} | {r.prompt_fidelity:.3f} "
                     f"| {100 * r.attributes:.1f} % | {t} | {b} |")
    lines.append(f"\n{kits} held-out subjects x {len(world.SCENES)} scene prompts x {cfg.seeds} seeds per row; "
                 f"ddim / ddim_uniform, {cfg.sampler_steps} steps, cfg {cfg.cfg}.")
    return "\n".join(lines)


def quick_config(cfg: BenchConfig | None = None) -> BenchConfig:
    """The short version CI runs: 2 subjects, 1 seed, Textual Inversion, DreamBooth-LoRA and HiFi Tuner."""
    return replace(cfg or BenchConfig(), subjects=2, seeds=1, methods=GATED_METHODS)

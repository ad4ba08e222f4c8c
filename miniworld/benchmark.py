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

The rows come from the method registry (miniworld/registry.py; one file per method in miniworld/rows/). `make eval`
runs them on the reporting half of the held-out subjects (world.REPORTING_HALF; sweeps belong on world.TUNING_HALF)
over several reference-view draws (``heldout_set(seed=draw)``), and reports each row's mean with a bootstrap interval
over subjects and paired differences against the baseline rows (miniworld/stats.py, miniworld/report.py).

**Two protocols.** Multi-image (``seen_views=None``): a method personalises from all ``views`` reference views of a
draw. One-image (``seen_views=1``, :func:`one_image`; ProFusion, HyperDreamBooth, the tuning encoder and
Subject-Diffusion personalise from one image): a method sees view 0 of the same draw only. In both, every row is
scored against **all** ``views`` reference views (:meth:`Benchmark.scoring_references`), so the two tables share
their references, subjects, prompts and seeds, the bounds' rows are the same in both, and a method's one-image row
pairs with its multi-image row subject by subject (report.format_protocol_gap).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..methods.hifi_tuner import REG_WEIGHT
from . import registry, world
from .evaluators import Evaluator
from .report import METRICS

log = logging.getLogger("comfyui_personalize")

TOKEN = "sks"


@dataclass
class BenchConfig:
    half: str = "reporting"      # which half of the held-out subjects (world.HALVES)
    subjects: int = 12           # the first n subjects of the half (all 12 by default)
    draws: int = 2               # reference-view draws per subject (heldout_set(seed=0..draws-1)): tuned anew each
    views: int = world.REFERENCE_VIEWS  # reference views per draw: what every row is scored against
    seen_views: int | None = None  # the first n views of each draw a method personalises from; None: all ``views``.
    #                                1: the one-image protocol (one_image()), still scored against all ``views``
    seeds: int = 2               # images per (subject, draw, prompt)
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
    methods: tuple[str, ...] | None = None  # personalisation rows; None: the registry's default tuned rows
    seed: int = 0

    def method_keys(self) -> tuple[str, ...]:
        """The personalisation rows of this protocol: ``methods`` (else the registry's default rows) less those
        registered for the other protocol only (a one-image method such as ProFusion is in the one-image table
        only)."""
        keys = tuple(self.methods) if self.methods is not None else registry.keys(personalises=True, default=True)
        return tuple(k for k in keys if registry.runs_under(k, self.protocol))

    def __post_init__(self) -> None:
        if self.seen_views is not None and not 1 <= self.seen_views <= self.views:
            raise ValueError(f"seen_views must be in [1, views={self.views}] (or None: all views), "
                             f"not {self.seen_views}")

    @property
    def seen(self) -> int:
        """How many reference views of each draw a method personalises from (the first ``seen``)."""
        return self.views if self.seen_views is None else self.seen_views

    @property
    def protocol(self) -> str:
        """The protocol's name: ``one`` (a method sees one reference view), ``multi`` (all of a draw's views) or
        ``k of n``."""
        seen = self.seen
        return "one" if seen == 1 else "multi" if seen == self.views else f"{seen} of {self.views}"


def one_image(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` under the one-image protocol: each method sees view 0 of each draw and is scored against all
    ``cfg.views``. Every other setting (steps, learning rates, batch sizes: the nodes' and the multi-image
    protocol's) stays: with one image a training node's batch repeats view 0 under independent noise and timesteps
    (core/diffusion.py, ``DiffusionObjective.sample``)."""
    return replace(cfg, seen_views=1)


@dataclass
class Row:
    method: str
    title: str
    subject_fidelity: float
    image_similarity: float
    prompt_fidelity: float
    attributes: float
    tune_seconds: float | None   # seconds to personalise a subject (encode + any tuning); None: not a method
    bytes_per_subject: int | None
    images: int
    #: metric -> one score per subject (mean over draws, prompts and seeds), in the subjects' order
    per_subject: dict[str, list[float]] = field(default_factory=dict)
    tuned: bool | None = None    # tuned at test time (registry flag); None: not a method (a bound or baseline)


def call(node_map: dict, class_type: str, **inputs):
    """Run a node the way ComfyUI's executor does: a fresh instance, its FUNCTION, under inference mode (the
    training nodes switch it off for themselves)."""
    cls = node_map[class_type]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def pick_subjects(n: int, half: str = "reporting", draw: int = 0,
                  views: int = world.REFERENCE_VIEWS) -> list[world.HeldoutSubject]:
    """The first ``n`` subjects of a half (world.TUNING_HALF / world.REPORTING_HALF) with reference-view draw
    ``draw`` of ``views`` references each. Deterministic."""
    heldouts = world.heldout_half(half, seed=draw, views=views)
    return list(heldouts[:max(1, min(n, len(heldouts)))])


def pick_draws(cfg: BenchConfig) -> list[list[world.HeldoutSubject]]:
    """The held-out subjects of every reference-view draw: the same subjects, draw ``d``'s references from heldout_set(seed=d)."""
    return [pick_subjects(cfg.subjects, cfg.half, d, cfg.views) for d in range(max(1, cfg.draws))]


class Benchmark:
    """Runs the rows. ``node_map`` is ComfyUI's ``nodes.NODE_CLASS_MAPPINGS`` with the pack loaded. The rows'
    ``personalise(bench, heldout, index)`` functions (miniworld/rows/) use :meth:`call`, :meth:`references` (the
    views the protocol lets a method see; scores are always against :meth:`scoring_references`),
    :meth:`artifact_name` / :meth:`artifact`, :meth:`real_images`, ``cfg``, ``model`` / ``clip`` / ``vae`` and
    ``token``."""

    token = TOKEN

    def __init__(self, node_map: dict, model, clip, vae, evaluator: Evaluator, cfg: BenchConfig,
                 run_name: str = "bench") -> None:
        self.nodes, self.model, self.clip, self.vae = node_map, model, clip, vae
        self.evaluator, self.cfg, self.run_name = evaluator, cfg, run_name
        self.draw = 0  # the reference-view draw being run (seeds of generation and of the real renders)

    def call(self, class_type: str, **inputs):
        return call(self.nodes, class_type, **inputs)

    def references(self, heldout: world.HeldoutSubject) -> tuple[torch.Tensor, torch.Tensor]:
        """(IMAGE, MASK) of the reference views a method personalises from: the first ``cfg.seen`` of the draw
        (view 0 alone under the one-image protocol)."""
        return _stack(heldout.references[:self.cfg.seen])

    @staticmethod
    def scoring_references(heldout: world.HeldoutSubject) -> tuple[torch.Tensor, torch.Tensor]:
        """(IMAGE, MASK) of every reference view of the draw: what every row is scored against, whatever it saw."""
        return _stack(heldout.references)

    def artifact_name(self, key: str, index: int) -> str:
        return f"{self.run_name}_{key}_{index}"

    @staticmethod
    def artifact(folder: str, name: str) -> Path:
        return _artifact(folder, name)

    # ---------------------------------------------------------------------------------------------- generation

    def generate(self, p: registry.Personalised) -> torch.Tensor:
        """One image per (scene prompt, seed): IMAGE [len(prompts) * seeds, 64, 64, 3]."""
        if p.images is not None:
            return p.images
        return sample_captions(self.nodes, p.model, p.clip, self.vae, p.prompts, steps=self.cfg.sampler_steps,
                               cfg=self.cfg.cfg, seed=self.cfg.seed * 1000 + 100 * self.draw,
                               per_caption=self.cfg.seeds, transform=p.transform, custom_sampler=p.sampler)

    def real_images(self, heldout: world.HeldoutSubject) -> torch.Tensor:
        scenes = [sc for sc in heldout.scenes for _ in range(self.cfg.seeds)]
        seeds = [10_000 + 97 * i + self.cfg.seed + 1_000_003 * self.draw for i in range(len(scenes))]
        return world.render_batch([heldout.subject] * len(scenes), scenes, seeds).images

    def personalise(self, method: str, heldout: world.HeldoutSubject, index: int) -> registry.Personalised:
        """Row ``method``'s personalisation of ``heldout``; ``index`` offsets its training seed (subject position
        + 100 x draw)."""
        return registry.get(method).personalise(self, heldout, index)

    # ---------------------------------------------------------------------------------------------- scoring

    def score_cell(self, images: torch.Tensor, heldout: world.HeldoutSubject) -> dict[str, torch.Tensor]:
        """Per-image scores of one (subject, draw): metric -> [n] tensor."""
        refs, _ = self.scoring_references(heldout)
        scene_prompts = [p for p in heldout.prompts for _ in range(self.cfg.seeds)]
        out = self.evaluator.classify(images)
        s = heldout.subject
        right = [out["shape"].labels[i] == s.shape and out["colour"].labels[i] == s.colour
                 and out["pattern"].labels[i] == s.pattern for i in range(len(images))]
        return {"subject_fidelity": self.evaluator.subject_fidelity(images, refs).float(),
                "image_similarity": self.evaluator.image_similarity(images, refs).float(),
                "prompt_fidelity": self.evaluator.prompt_fidelity(images, scene_prompts, attributes=("scene",)).float(),
                "attributes": torch.tensor(right, dtype=torch.float32)}

    def score(self, method: str, images: list[list[torch.Tensor]], draws: list[list[world.HeldoutSubject]],
              seconds: list[float], nbytes: list[int]) -> Row:
        """``images[d][i]``: the images of subject ``i`` in draw ``d``. A subject's score is the mean over its
        draws' images; the row's, the mean over subjects (every cell has as many images)."""
        n = len(draws[0])
        cells = [[self.score_cell(images[d][i], draws[d][i]) for i in range(n)] for d in range(len(draws))]
        per_subject = {m: [float(torch.cat([cells[d][i][m] for d in range(len(draws))]).mean()) for i in range(n)]
                       for m in METRICS}
        means = {m: sum(v) / n for m, v in per_subject.items()}
        entry = registry.get(method)
        personal = entry.personalises and bool(seconds)
        return Row(method, entry.title, **means,
                   tune_seconds=sum(seconds) / len(seconds) if personal else None,
                   bytes_per_subject=int(sum(nbytes) / len(nbytes)) if personal else 0,
                   images=sum(len(x) for row in images for x in row), per_subject=per_subject,
                   tuned=entry.tuned if entry.personalises else None)

    def run(self, methods: tuple[str, ...] | None = None,
            draws: list[list[world.HeldoutSubject]] | None = None) -> list[Row]:
        """Every row of ``methods`` (default: the registry's bounds, then the config's methods) on every subject of
        every draw."""
        draws = draws or pick_draws(self.cfg)
        if methods is None:
            methods = (*registry.keys(personalises=False, default=True), *self.cfg.method_keys())
        rows = []
        for method in methods:
            entry = registry.get(method)
            t0 = time.perf_counter()
            images, seconds, nbytes = [], [], []
            for d, heldouts in enumerate(draws):
                self.draw = d
                images.append([])
                for i, heldout in enumerate(heldouts):
                    p = self.personalise(method, heldout, i + 100 * d)
                    images[-1].append(self.generate(p))
                    if entry.personalises:
                        seconds.append(p.seconds)
                        nbytes.append(p.nbytes)
            self.draw = 0
            row = self.score(method, images, draws, seconds, nbytes)
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
                    scheduler: str = "ddim_uniform", custom_sampler=None) -> torch.Tensor:
    """``per_caption`` images per caption (one latent batch, KSampler seed ``seed + k`` for caption ``k``) through
    stock nodes: CLIPTextEncode (then ``transform(conditioning)`` when given: a method's conditioning edit),
    KSampler (``sampler`` / ``scheduler``, ddim / ddim_uniform by default) against the empty prompt, VAEDecode.
    IMAGE ``[len(captions) * per_caption, ...]``.

    With ``custom_sampler(caption) -> SAMPLER`` (a row's :attr:`registry.Personalised.sampler`), caption ``k`` is
    sampled by stock SamplerCustom with that SAMPLER instead, on BasicScheduler's SIGMAS (``scheduler``, ``steps``,
    denoise 1), noise seed ``seed + k``, the same cfg, positive, negative and empty latent: what KSampler runs, with
    the sampler swapped (the ``sampler`` name is then unused)."""
    def sample(k, positive, negative):
        latent = call(node_map, "EmptyLatentImage", width=world.IMAGE_SIZE, height=world.IMAGE_SIZE,
                      batch_size=per_caption)[0]
        if custom_sampler is not None:
            sigmas = call(node_map, "BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=1.0)[0]
            return call(node_map, "SamplerCustom", model=model, add_noise=True, noise_seed=seed + k, cfg=cfg,
                        positive=positive, negative=negative, sampler=custom_sampler(captions[k]), sigmas=sigmas,
                        latent_image=latent)[0]
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


def _stack(samples) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([r.image for r in samples]), torch.stack([r.mask for r in samples])


def _artifact(folder: str, name: str) -> Path:
    """The file a node just wrote into ComfyUI's model folder ``folder`` (``name`` with or without its extension)."""
    import folder_paths
    for candidate in (name, f"{name}.safetensors"):
        path = folder_paths.get_full_path(folder, candidate)
        if path:
            return Path(path)
    raise FileNotFoundError(f"{name} not found in the {folder!r} model folders")


def quick_config(cfg: BenchConfig | None = None) -> BenchConfig:
    """The short version CI runs: the first 2 subjects of the tuning half, one draw, 1 seed, the gated rows
    (Textual Inversion, DreamBooth-LoRA, HiFi Tuner)."""
    return replace(cfg or BenchConfig(), half="tuning", subjects=2, draws=1, seeds=1, methods=registry.keys(gated=True))


def quick_one_image_config(cfg: BenchConfig | None = None) -> BenchConfig:
    """CI's one-image run (tests/test_mini_benchmark.py): the one-image protocol on the tuning half's first subject,
    one draw, one seed, the gated rows at 40 tuning steps each (HiFi: 40 global steps, then 1 per timestep). It checks
    what the methods see, what every row is scored against and the table's columns; its scores are no result
    (`scripts/eval_methods.py --quick` runs both protocols at the methods' settings)."""
    return one_image(replace(quick_config(cfg), subjects=1, ti_steps=40, lora_steps=40, hifi_global_steps=40,
                             hifi_steps_per_step=1))

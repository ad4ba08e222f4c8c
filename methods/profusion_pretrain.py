"""PromptNet's pre-training task for the pack's pre-training engine (core/pretrain.py). Specification:
../shared/docs/methods.md §5.3 (PromptNet), §5.5 (objective).

ProFusion pre-trains PromptNet on many subjects with the plain diffusion loss of the frozen base model
(:func:`methods.profusion.promptnet_loss`, the official ``train.py``): for a target image ``x0`` and a reference
image of the same subject, ``S* = PromptNet(x_ref, t, c_img, x_t)`` is put in the prompt (no position embedding,
:class:`methods.profusion.PlaceholderPrompt`) and ``‖ε_θ(x_t, t, Enc(P_S*)) − ε‖²`` is minimised over PromptNet's
weights only. Everything else is frozen: the MODEL (its prediction through ``apply_model``, as core/diffusion.py),
the text encoder (a clone made differentiable: the host's in-place residual adds otherwise break backward), the VAE
and the CLIP vision tower (the reference's ``last_hidden_state``, the official ``ref_image_embed``).

Prompts (``prompt`` setting):

* ``"official"``: ``"a photo of holder"`` for every image (the official ``--add_prompt`` default ``"A photo of "``
  followed by the placeholder);
* ``"caption"``: each target's own caption with its subject phrase replaced by the placeholder (``"a photo of a
  striped blue star on the beach"`` → ``"a photo of holder on the beach"``), so that S* carries the subject and the
  rest of the prompt the scene. The subject phrase comes from the source (the mini world's ``Subject``) or is the
  placeholder already written in a folder's caption; a row without either falls back to the official prompt.

The trainable module is the :class:`networks.promptnet.PromptNet` itself, built from the MODEL's encoder half
(``PromptNet.from_model``).
"""
from __future__ import annotations

import logging

import torch

from ..core.host import PersonalizeError
from .profusion import PLACEHOLDER, PlaceholderPrompt, encode_prompts, promptnet_loss, square

log = logging.getLogger("comfyui_personalize")

PROMPT_MODES = ("caption", "official")
OFFICIAL_PROMPT = "a photo of {}"  # the official --add_prompt "A photo of " followed by the placeholder


def subject_phrase(name: str) -> str:
    """``"a striped blue star"``: the mini world's caption phrase of a subject name (article included)."""
    from ..miniworld.world import article
    return f"{article(name)} {name}"


def caption_prompt(caption: str, phrase: str | None, placeholder: str = PLACEHOLDER) -> str | None:
    """The caption with the subject ``phrase`` replaced by the placeholder; the caption itself when it already holds
    the placeholder; None when neither (the caller falls back to the official prompt)."""
    import re
    if re.search(rf"(?<![\w]){re.escape(placeholder)}(?![\w])", caption):
        return caption
    if phrase and re.search(rf"(?<![\w]){re.escape(phrase)}(?![\w])", caption):
        return re.sub(rf"(?<![\w]){re.escape(phrase)}(?![\w])", placeholder, caption, count=1)
    return None


class PromptBatch:
    """Per-row :class:`PlaceholderPrompt` objects with ``encode(words)`` (what ``promptnet_loss`` calls)."""

    def __init__(self, prompts: list):
        self.prompts = prompts

    def encode(self, words: torch.Tensor) -> torch.Tensor:
        return encode_prompts(self.prompts, words)


class _Unwrapped:
    """A DDP-wrapped PromptNet as ``promptnet_loss`` reads it: calls go through the wrapper (gradient sync), the
    attributes come from the network."""

    def __init__(self, wrapped, net):
        self._wrapped, self._net = wrapped, net

    def __call__(self, *args):
        return self._wrapped(*args)

    def __getattr__(self, name):
        return getattr(self._net, name)


class PromptNetTask:
    """The engine's task (core/pretrain.PretrainTask) that pre-trains a PromptNet for a base model.

    ``checkpoint`` / ``clip_vision``: files for :func:`core.pretrain.host_networks` (None: the shipped mini family and
    mini CLIP vision tower); ``networks``: already-loaded :class:`~core.pretrain.HostNetworks` instead (tests).
    ``prompt``: ``"caption"`` or ``"official"`` (module docstring). ``word_init_scale`` multiplies the initial weights
    of PromptNet's last layer (``prompt_out``; its bias starts at 0): the default initialisation gives words far
    larger than the text encoder's own (the mini family: S* of norm ~4 against token embeddings of ~0.23), which the
    frozen encoder has never seen; 0.05 starts S* at their size. ``validation``: an optional
    ``validate(task, module) -> dict``."""
    name = "promptnet"

    def __init__(self, checkpoint=None, clip_vision=None, *, prompt: str = "caption", placeholder: str = PLACEHOLDER,
                 word_init_scale: float = 1.0, seed: int = 0, networks=None, validation=None):
        if prompt not in PROMPT_MODES:
            raise PersonalizeError(f"PromptNet pre-training: prompt must be one of {', '.join(PROMPT_MODES)}, not "
                                   f"{prompt!r}.")
        self.checkpoint, self.clip_vision_path = checkpoint, clip_vision
        self.prompt, self.placeholder, self.seed = prompt, placeholder, int(seed)
        self.word_init_scale = float(word_init_scale)
        self.validation = validation
        self._nets = networks
        self._ready = False
        self._prompts: dict[str, PlaceholderPrompt] = {}
        self._fallbacks = 0

    # -- the frozen networks ------------------------------------------------------------------------------------
    @property
    def nets(self):
        if self._nets is None:
            from ..core.pretrain import host_networks
            self._nets = host_networks(self.checkpoint, self.clip_vision_path, need_clip_vision=True)
        if self._nets.clip_vision is None:
            raise PersonalizeError("PromptNet pre-training needs a CLIP vision model (the reference's tokens); give "
                                   "one (--clip-vision).")
        return self._nets

    def _prepare(self) -> None:
        """Clones of the MODEL and the CLIP for training (fused CPU attention; the text encoder differentiable),
        loaded for compute with autograd-safe weights, frozen."""
        if self._ready:
            return
        from ..core import graph_patches, host
        from ..core.sampling import ModelPrediction
        nets = self.nets
        self.model = nets.model.clone()
        graph_patches.use_fused_attention(self.model)
        self.clip = nets.clip.clone()
        graph_patches.make_text_encoder_differentiable(self.clip.patcher)
        graph_patches.use_fused_text_attention(self.clip.patcher)
        host.load_for_compute(self.model, self.clip.patcher)
        with torch.inference_mode(False):
            host.uninference(self.model.model)
            host.uninference(self.clip.cond_stage_model)
        self.model.model.requires_grad_(False)
        self.clip.cond_stage_model.requires_grad_(False)
        self.base = self.model.model
        self.model_sampling = host.model_sampling(self.model)
        self.sigmas = self.model_sampling.sigmas.float().cpu()
        self.prediction = ModelPrediction(self.model, through_wrapper=False)
        self._ready = True

    def vision_width(self) -> int:
        cv = self.nets.clip_vision
        out = cv.encode_image(torch.zeros(1, 64, 64, 3))
        return int(out["last_hidden_state"].shape[-1])

    # -- the engine's protocol ------------------------------------------------------------------------------------
    def config(self) -> dict:
        """The run's identity: the frozen files by name (the shipped mini ones, given or by default, by that), the
        prompt settings and the seed."""
        from pathlib import Path

        from ..core import mini_family
        from ..networks import mini_clip

        def name(path, shipped: Path, label: str) -> str:
            if path is None or Path(path).resolve() == shipped.resolve():
                return label
            return Path(path).name
        return {"checkpoint": name(self.checkpoint, mini_family.shipped_checkpoint(), "shipped mini family"),
                "clip_vision": name(self.clip_vision_path, mini_clip.PACK_MODELS / "clip_vision" /
                                    mini_clip.SHIPPED_NAME, "shipped mini CLIP vision"),
                "prompt": self.prompt, "placeholder": self.placeholder, "seed": self.seed,
                "word_init_scale": self.word_init_scale}

    def build(self, device) -> torch.nn.Module:
        from ..core.host import model_family
        from ..networks.promptnet import PromptNet
        self._prepare()
        net = PromptNet.from_model(self.model, family=model_family(self.model), vision_width=self.vision_width(),
                                   seed=self.seed)
        net.check_text(int(self._prompt_for(OFFICIAL_PROMPT.format(self.placeholder)).width), "PromptNet pre-training")
        if self.word_init_scale != 1.0:
            with torch.no_grad():
                net.prompt_out.weight.mul_(self.word_init_scale)
                net.prompt_out.bias.zero_()
        return net.to(device)

    def _prompt_for(self, text: str) -> PlaceholderPrompt:
        if text not in self._prompts:
            self._prompts[text] = PlaceholderPrompt(self.clip, text, self.placeholder, node="PromptNet pre-training")
        return self._prompts[text]

    def prompts(self, batch) -> list[str]:
        """The prompt text of every row (module docstring)."""
        official = OFFICIAL_PROMPT.format(self.placeholder)
        if self.prompt == "official":
            return [official] * len(batch)
        subjects = batch.extras.get("subjects") if batch.extras else None
        out = []
        for i, caption in enumerate(batch.captions):
            phrase = subject_phrase(subjects[i].name) if subjects is not None else None
            text = caption_prompt(caption, phrase, self.placeholder)
            if text is None:
                self._fallbacks += 1
                if self._fallbacks == 1:
                    log.warning("PromptNet pre-training: caption %r names no subject phrase and holds no '%s'; "
                                "the official prompt is used for such rows (write the placeholder where the "
                                "subject goes in the manifest's captions).", caption, self.placeholder)
                text = official
            out.append(text)
        return out

    def encode_inputs(self, net, batch) -> dict:
        """The frozen encodings of a batch (no grad): target latents ``x0`` and reference latents (model space, at
        PromptNet's size), the reference's CLIP vision tokens."""
        self._prepare()
        nets = self.nets
        device = next(net.parameters()).device
        refs = batch.references if batch.references is not None else batch.images
        scale = getattr(nets.vae, "downscale_ratio", 8)
        scale = scale if isinstance(scale, int) else 8
        with torch.no_grad():
            x0 = self.base.process_latent_in(nets.vae.encode(batch.images[..., :3]).float())
            ref = nets.vae.encode(square(refs, net.latent_size * scale)[..., :3]).float()
            ref = self.base.process_latent_in(ref)
            tokens = nets.clip_vision.encode_image(refs)["last_hidden_state"].float()
        return {"x0": x0.to(device), "ref": ref.to(device), "tokens": tokens.to(device)}

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """σ of a uniform timestep of the model's own schedule, and ε, for each row of ``x0`` (from ``generator``)."""
        ts = torch.randint(0, len(self.sigmas), (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        return self.sigmas[ts].to(x0.device), noise.to(x0.device)

    def text_loss(self, batch, texts: list[str], generator: torch.Generator) -> float:
        """The frozen model's ε-loss on a batch with plain prompts ``texts`` (no S*), with the σ and ε that
        :meth:`loss` draws from the same ``generator`` state: the baselines of the validation."""
        from ..core import host
        from ..core.sampling import eps_from_denoised
        from ..kernels.losses import masked_mse
        self._prepare()
        with torch.no_grad():
            x0 = self.base.process_latent_in(self.nets.vae.encode(batch.images[..., :3]).float())
            x0 = x0.to(self.model.load_device)
            sigma, noise = self.draw(x0, generator)
            context = torch.cat([host.encode_text(self.clip, t)[0] for t in texts]).to(x0.device)
            s = sigma.view(-1, 1, 1, 1)
            x = x0 + s * noise
            return float(masked_mse(eps_from_denoised(x, self.prediction(x, sigma, context), s), noise, None))

    def loss(self, module, batch, generator: torch.Generator):
        """The official objective on a batch (module docstring); ``module`` is the PromptNet or its DDP wrapper."""
        net = module.module if hasattr(module, "module") else module
        inputs = self.encode_inputs(net, batch)
        sigma, noise = self.draw(inputs["x0"], generator)
        prompts = PromptBatch([self._prompt_for(t) for t in self.prompts(batch)])
        loss, _ = promptnet_loss(_Unwrapped(module, net) if module is not net else net, prompts,
                                 self.prediction, self.model_sampling, inputs["x0"], inputs["ref"],
                                 inputs["tokens"], sigma, noise)
        return loss, {}

    def validate(self, module) -> dict:
        return self.validation(self, module) if self.validation is not None else {}


class WorldValidation:
    """A fixed validation set of the mini world (base subjects, ``WorldSource("views")`` with its own seed, fixed
    σ and ε per row): the pre-training loss with S* (the task's prompts), against the frozen model's loss on the
    same rows with the class-word prompt (``"a photo of a star on the beach"``: what S* must improve on) and with
    the full caption (``"a photo of a striped blue star on the beach"``: the words the model was trained on). The
    baselines do not depend on PromptNet and are computed once."""

    def __init__(self, batches: int = 8, batch_size: int = 32, seed: int = 90_001):
        self.batches, self.batch_size, self.seed = int(batches), int(batch_size), int(seed)
        self._data = None
        self._baselines = None

    def data(self) -> list:
        if self._data is None:
            from ..miniworld.sources import WorldSource
            source = WorldSource("views", seed=self.seed)
            self._data = [source.batch(i, 0, 1, self.batch_size) for i in range(self.batches)]
        return self._data

    def _generator(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7_919 + i)

    def baselines(self, task) -> dict:
        if self._baselines is None:
            from ..miniworld import world
            cls, cap = [], []
            for i, batch in enumerate(self.data()):
                subjects, scenes = batch.extras["subjects"], batch.extras["scenes"]
                texts = [world.class_prompt(s.class_word, sc) for s, sc in zip(subjects, scenes)]
                cls.append(task.text_loss(batch, texts, self._generator(i)))
                cap.append(task.text_loss(batch, list(batch.captions), self._generator(i)))
            self._baselines = {"val_loss_class_word": sum(cls) / len(cls), "val_loss_caption": sum(cap) / len(cap)}
        return self._baselines

    def __call__(self, task, module) -> dict:
        losses = [float(task.loss(module, batch, self._generator(i))[0]) for i, batch in enumerate(self.data())]
        return {"val_loss_promptnet": sum(losses) / len(losses), **self.baselines(task)}

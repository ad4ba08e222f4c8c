"""Helpers shared by the pack's tests: synthetic subject photos, node calls as the executor makes them,
and a straightforward reference implementation of the ε-loss used to check training independently."""
from __future__ import annotations

import importlib

from harness.subjects import save_png, subject_images  # noqa: F401  (re-exported for tests)


import torch


def call_node(class_type: str, **inputs):
    """Run a node's FUNCTION the way ComfyUI's executor does (inside inference mode)."""
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    obj = cls()
    with torch.inference_mode():
        return getattr(obj, cls.FUNCTION)(**inputs)


def pack_module(host, name: str):
    """A submodule of the pack as ComfyUI loaded it (e.g. 'core.deltas')."""
    return importlib.import_module(f"{host.pack_module.__name__}.{name}")


def load_checkpoint(name: str):
    model, clip, vae = call_node("CheckpointLoaderSimple", ckpt_name=name)[:3]
    return model, clip, vae


def encode(clip, text: str) -> torch.Tensor:
    return call_node("CLIPTextEncode", clip=clip, text=text)[0][0][0]


def eps_loss_reference(model, latents, cond, *, timesteps, seed=1234, pooled=None) -> float:
    """Mean ε-MSE of ``model`` on ``latents`` at fixed timesteps and noise, written out directly from
    ComfyUI's k-diffusion conventions (x = x0 + σ ε; ε̂ = (x − D(x, σ)) / σ), independent of the pack."""
    import comfy.model_management as mm
    with torch.inference_mode():
        mm.load_models_gpu([model])
        base = model.model
        ms = base.model_sampling
        g = torch.Generator().manual_seed(seed)
        dev = model.load_device  # noise drawn on the CPU, so the figure does not depend on the device
        x0 = base.process_latent_in(latents.float()).to(dev)
        cond = cond.to(dev)
        pooled = pooled.to(dev) if pooled is not None else None
        total = 0.0
        for t in timesteps:
            sigma = ms.sigmas[t].float().reshape(1).to(dev)
            noise = torch.randn(x0.shape, generator=g).to(dev)
            x = x0 + sigma.view(-1, 1, 1, 1) * noise
            kw = {}
            if getattr(base, "adm_channels", 0):
                w, h = latents.shape[-1] * 8, latents.shape[-2] * 8
                kw["y"] = base.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                          target_width=w, target_height=h, device=x.device).expand(x.shape[0], -1)
            d = base.apply_model(x, sigma.expand(x.shape[0]), c_crossattn=cond.expand(x.shape[0], -1, -1), **kw)
            total += float(((x - d) / sigma.view(-1, 1, 1, 1) - noise).pow(2).mean())
        return total / len(timesteps)


def unet_output(model, latents, cond, sigma: float = 2.0, seed: int = 7) -> torch.Tensor:
    """D(x, σ) of a MODEL at one fixed noisy input (for comparing patched models)."""
    import comfy.model_management as mm
    with torch.inference_mode():
        mm.load_models_gpu([model])
        g = torch.Generator().manual_seed(seed)
        dev = model.load_device
        x = model.model.process_latent_in(latents.float())
        x = (x + sigma * torch.randn(x.shape, generator=g)).to(dev)
        s = torch.full((x.shape[0],), sigma, device=dev)
        opts = dict(model.model_options.get("transformer_options", {}))  # attention patches, as a sampler passes
        return model.model.apply_model(x, s, c_crossattn=cond.to(dev).expand(x.shape[0], -1, -1),
                                       transformer_options=opts).float().cpu()


def module_forward_is_clean(root: torch.nn.Module) -> bool:
    """True if no submodule has a forward/_forward replaced by a patch (restored bound originals are fine)."""
    for m in root.modules():
        for attr in ("forward", "_forward"):
            f = vars(m).get(attr)
            if f is not None and getattr(f, "__func__", None) is not getattr(type(m), attr, None):
                return False
    return True





def train_embedding(models, images, name, **overrides):
    """Run Train Subject Embedding with small test defaults (``overrides`` replace any input)."""
    model, clip, vae = models
    args = dict(model=model, clip=clip, vae=vae, images=images, placeholder="sks", init_word="dog", steps=2,
                learning_rate=5e-3, batch_size=1, seed=0, embedding_name=name, overwrite=False)
    return call_node("PersonalizeTrainSubjectEmbedding", **{**args, **overrides})


def train_lora(models, images, name, **overrides):
    """Run Train Subject LoRA with small test defaults (``overrides`` replace any input)."""
    model, clip, vae = models
    args = dict(model=model, clip=clip, vae=vae, images=images, instance_prompt="a photo of sks dog", rank=4,
                steps=2, learning_rate=1e-2, batch_size=1, seed=0, layers="attention", train_text_encoder=False,
                lora_name=name, overwrite=False)
    return call_node("PersonalizeTrainSubjectLoRA", **{**args, **overrides})


def assert_saved_images(result) -> None:
    """A workflow run (harness.executor result) succeeded and every image it saved is a non-empty file."""
    assert result.success
    images = result.files()
    assert images, "the workflow saved no image"
    for p in images:
        assert p.exists() and p.stat().st_size > 0


def free_port() -> int:
    """A free local TCP port for a gloo process group's rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Train Subject LoRA (DreamBooth-LoRA) on the generated SD1.5 fixture."""
import torch

from helpers import call_node, encode, eps_loss_reference, train_lora, unet_output

def _train(model, clip, vae, images, name, **kw):
    return train_lora((model, clip, vae), images, name, **{"steps": 3, **kw})


def _bypass_reference(model, lora_sd, latents, cond):
    """UNet output with the LoRA applied by forward hooks ``y += (alpha/r)·up(down(x))``, written directly from
    the file's tensors and the host's kohya key map — independent of the pack's code."""
    import comfy.lora
    import comfy.model_management as mm
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    hooks = []
    with torch.inference_mode():
        mm.load_models_gpu([model])
        for name, weight_key in key_map.items():
            if f"{name}.lora_down.weight" not in lora_sd:
                continue
            down = lora_sd[f"{name}.lora_down.weight"].float()
            up = lora_sd[f"{name}.lora_up.weight"].float()
            scale = float(lora_sd[f"{name}.alpha"]) / down.shape[0]
            mod = model.model
            for part in weight_key[: -len(".weight")].split("."):
                mod = getattr(mod, part)
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, d=down, u=up, s=scale:
                out + s * (inp[0].float() @ d.to(out.device).T @ u.to(out.device).T).to(out.dtype)))
    try:
        return unet_output(model, latents, cond)
    finally:
        for h in hooks:
            h.remove()


def test_lora_file_loads_in_stock_loader_and_matches(host, sd15, subject, unique_name):
    from safetensors.torch import load_file
    model, clip, vae = sd15
    images, masks = subject
    name = unique_name("lora")
    out_model, out_clip, file_name, loss, previews = _train(model, clip, vae, images, name, mask=masks, steps=4)
    path = host.folder_paths.get_full_path("loras", file_name)
    sd = load_file(path)
    assert all(k.startswith("lora_unet_") for k in sd), "kohya key names expected"
    n_modules = len({k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")})
    assert n_modules > 0 and len(sd) == 3 * n_modules

    stock_model, stock_clip = call_node("LoraLoader", model=model, clip=clip, lora_name=file_name,
                                        strength_model=1.0, strength_clip=1.0)
    # every module of the file was applied by the stock loader
    assert len(stock_model.patches) == n_modules

    latents = call_node("VAEEncode", pixels=images, vae=vae)[0]["samples"]
    cond = encode(clip, "a photo of sks dog")
    base = unet_output(model, latents, cond)
    loader = unet_output(stock_model, latents, cond)
    in_graph = unet_output(out_model, latents, cond)
    bypass = _bypass_reference(model, sd, latents, cond)
    effect = (loader - base).abs().max()
    assert effect > 1e-4, "the LoRA changed nothing; the comparison would be vacuous"
    torch.testing.assert_close(in_graph, loader, rtol=0, atol=1e-6)
    # float32 UNet (CPU): 1e-3. A half-precision UNet (GPU) rounds the loader's merged weights and the bypass
    # separately: 16 ulp of the dtype (measured on an H100, fp16: 5.9e-3 at an effect of 0.58)
    dtype = model.model.get_dtype()
    tol = 1e-3 if dtype == torch.float32 else 16 * torch.finfo(dtype).eps
    assert (bypass - loader).abs().max() < tol * max(1.0, float(effect)) + 1e-5
    assert len(loss["loss"]) == 4 and previews.shape[0] == 1


def test_text_encoder_lora_and_all_linear(host, sd15, subject, unique_name):
    from safetensors.torch import load_file
    model, clip, vae = sd15
    images, _ = subject
    out_model, out_clip, file_name, _, _ = _train(model, clip, vae, images, unique_name("lora"),
                                                  train_text_encoder=True, layers="all_linear", steps=2)
    sd = load_file(host.folder_paths.get_full_path("loras", file_name))
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in sd)
    assert any("_ff_net_" in k for k in sd) and any("_mlp_fc1" in k for k in sd)
    _, stock_clip = call_node("LoraLoader", model=model, clip=clip, lora_name=file_name,
                              strength_model=1.0, strength_clip=1.0)
    a, b = encode(out_clip, "a photo of sks dog"), encode(stock_clip, "a photo of sks dog")
    torch.testing.assert_close(a, b)
    assert (a - encode(clip, "a photo of sks dog")).abs().max() > 0


def test_loss_goes_down_with_prior_preservation(host, sd15, subject, unique_name):
    model, clip, vae = sd15
    images, _ = subject
    latents = call_node("VAEEncode", pixels=images, vae=vae)[0]["samples"]
    cond = encode(clip, "a photo of sks dog")
    ts = [100, 300, 500, 700, 900]
    before = eps_loss_reference(model, latents, cond, timesteps=ts)
    class_images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    out_model = _train(model, clip, vae, images, unique_name("lora"), steps=20, learning_rate=1e-2,
                       class_prompt="a photo of a dog", class_images=class_images, prior_loss_weight=0.5)[0]
    after = eps_loss_reference(out_model, latents, cond, timesteps=ts)
    assert after < before * 0.99, (before, after)


def test_training_graph_patches_match_host_forward(host, sd15, subject):
    """The training clone's patches (out-of-place blocks, fused CPU attention) compute the same UNet output as
    the host's own forward, and every attention layer got the fused patch."""
    import comfy.model_management as mm
    from helpers import pack_module
    model, clip, vae = sd15
    tuning = pack_module(host, "core.tuning")
    images, _ = subject
    latents = call_node("VAEEncode", pixels=images, vae=vae)[0]["samples"]
    cond = encode(clip, "a photo of sks dog")
    plain = unet_output(model, latents, cond)
    with tuning.TrainingSession(model) as s:
        replace = s.model.model_options["transformer_options"].get("patches_replace", {})
        n_attn = sum(1 for m in model.model.diffusion_model.modules() if type(m).__name__ == "BasicTransformerBlock")
        # the fused-attention patches exist only on the CPU (on a GPU the host's own attention is already fused)
        expected = n_attn if torch.device(model.load_device).type == "cpu" else 0
        assert len(replace.get("attn1", {})) == len(replace.get("attn2", {})) == expected and n_attn > 0
        s.load()
        with torch.no_grad():
            patched = unet_output(s.model, latents, cond)
    torch.testing.assert_close(patched, plain, rtol=1e-4, atol=1e-4)
    mm.load_models_gpu([model])

"""Autograd through the host's networks, on whichever host the session runs (CI runs every supported one).

* The UNet needs no patch: backward through the host's own (unpatched) UNet of the tiny SD1.5 fixture gives finite
  gradients equal to central finite differences (float64).
* The text encoder does: the host's ``CLIPLayer.forward`` adds in place (``x += ...``) after LayerNorm saved ``x``,
  so backward fails; the out-of-place rewrite of core/graph_patches.py gives gradients equal to finite differences.
"""
import copy

import pytest
import torch

from helpers import pack_module


def _directional_check(f, inputs, seed=0, h=1e-6):
    """``∇f·v`` by autograd vs ``(f(p + h v) − f(p − h v)) / 2h`` for a random direction ``v``."""
    g = torch.Generator().manual_seed(seed)
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = f(*inputs)
    grads = torch.autograd.grad(out, inputs)
    assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)
    dirs = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in inputs]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, dirs))
    with torch.no_grad():
        plus = float(f(*[t + h * d for t, d in zip(inputs, dirs)]))
        minus = float(f(*[t - h * d for t, d in zip(inputs, dirs)]))
    numeric = (plus - minus) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), (analytic, numeric)


def _normal_copy(host, module):
    """A float64 copy of a host module whose weights are ordinary (non-inference) tensors."""
    core_host = pack_module(host, "core.host")
    copied = copy.deepcopy(module)
    core_host.uninference(copied)
    return copied.double().requires_grad_(False)


def test_unet_backward_without_any_patch_matches_finite_differences(host, sd15):
    model = sd15[0]
    unet = _normal_copy(host, model.model.diffusion_model)
    assert not any(type(m).__name__ == "BasicTransformerBlock" and "_forward" in vars(m) for m in unet.modules())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    context = torch.randn(1, 77, 768, generator=g, dtype=torch.float64)
    weight = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([500.0], dtype=torch.float64)

    def f(xx, cc):
        return (unet(xx, timesteps=t, context=cc, transformer_options={}) * weight).sum()
    _directional_check(f, [x, context])


def test_clip_layer_needs_the_out_of_place_rewrite_and_it_is_exact(host, sd15):
    gp = pack_module(host, "core.graph_patches")
    K = pack_module(host, "kernels")
    clip = sd15[1]
    layer = _normal_copy(host, clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0])
    g = torch.Generator().manual_seed(2)
    width = layer.layer_norm1.weight.shape[0]
    x = torch.randn(1, 7, width, generator=g, dtype=torch.float64)
    weight = torch.randn(1, 7, width, generator=g, dtype=torch.float64)
    heads = layer.self_attn.heads

    def attention(q, k, v, _heads, mask=None, *args, **kwargs):
        return K.attention(q, k, v, heads, mask=mask)

    xx = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        (layer(xx * 1.0, None, attention) * weight).sum().backward()
    rewritten = gp.out_of_place_version(type(layer).forward)
    assert rewritten is not None

    def f(inp):
        return (rewritten(layer, inp, None, attention) * weight).sum()
    _directional_check(f, [x])


def test_release_unloads_only_our_clone_and_its_patches(host, sd15):
    """core.host.release goes through the host's own unloading: our patched clone leaves the loaded-model list with
    its object patch removed from the shared module; the original MODEL stays loaded."""
    import comfy.model_management as mm
    from helpers import module_forward_is_clean
    core_host = pack_module(host, "core.host")
    model = sd15[0]
    with torch.inference_mode():
        mm.load_models_gpu([model])
        clone = model.clone()
        block = next(n for n, m in model.model.diffusion_model.named_modules() if type(m).__name__ == "ResBlock")
        clone.add_object_patch(f"diffusion_model.{block}.forward", lambda *a, **k: None)
        core_host.load_for_compute(clone)
        assert any(m is clone for m in mm.loaded_models())
        assert not module_forward_is_clean(model.model)
        core_host.release(clone)
    assert not any(m is clone for m in mm.loaded_models())
    assert module_forward_is_clean(model.model)
    mm.load_models_gpu([model])
    assert any(m is model for m in mm.loaded_models())

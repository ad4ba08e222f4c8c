"""Invert Image (DDIM inversion, paper Eq. 3; null-text optimisation, Eq. 4) and its replay sampler.

Exactness is checked on a closed-form denoiser: data ~ N(μ(c), s²I), whose ideal denoiser is
``D(x, σ) = μ + s²/(s²+σ²)·(x − μ)`` and whose probability-flow ODE from a clean x0 has the solution
``x(σ) = μ + (x0 − μ)·√(s²+σ²)/s`` (dx/dσ = (x − D)/σ). The mean depends linearly on the text context,
``μ(c) = mean_tokens(c)·W``, so guidance and null-text optimisation have something to act on.
"""
import math

import pytest
import torch

from helpers import call_node, module_forward_is_clean, pack_module

NODE = "PersonalizeInvertImage"


class GaussianToy:
    """``D(x, σ; c)`` of data ~ N(μ(c), s²I), μ(c) = mean over tokens of c times W; the denoiser protocol of
    methods/inversion.py (``model(x, sigma[B], context, uncond=False)``)."""

    def __init__(self, shape, width, s=0.5, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.shape, self.s2 = tuple(shape), s * s
        self.W = (torch.randn(width, math.prod(shape), generator=g, dtype=torch.float64) / math.sqrt(width)).to(dtype)

    def mean(self, context):
        return (context.mean(1) @ self.W.to(context)).view(-1, *self.shape)

    def __call__(self, x, sigma, context, uncond=False):
        mu = self.mean(context).expand_as(x).to(x)
        k = self.s2 / (self.s2 + sigma.to(x).view(-1, 1, 1, 1) ** 2)
        return mu + k * (x - mu)

    def flow(self, x0, context, sigma):
        """Closed-form probability-flow ODE solution from σ = 0 to ``sigma``."""
        mu = self.mean(context)
        return mu + (x0 - mu) * math.sqrt(self.s2 + sigma * sigma) / math.sqrt(self.s2)

    def as_model_wrapper(self):
        """The toy as a ComfyUI ``model_function_wrapper``: replaces the UNet by D(x, σ; c_crossattn)."""
        def wrapper(apply_model, args):
            return self(args["input"], args["timestep"], args["c"]["c_crossattn"])
        return wrapper


# SD1.5's "normal" schedule for 10 steps (comfy.samplers.normal_scheduler on ModelSamplingDiscrete), rounded.
SIGMAS_10 = [14.6146, 7.8399, 4.6092, 2.9183, 1.9502, 1.3449, 0.9324, 0.6250, 0.3687, 0.0292, 0.0]


@pytest.fixture(scope="module")
def inv(host):
    return pack_module(host, "methods.inversion")


@pytest.fixture
def err(host):
    return pack_module(host, "core.host").PersonalizeError


def _toy_problem(shape=(1, 4, 4, 4), tokens=3, width=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    toy = GaussianToy(shape[1:], width)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    cond = torch.randn(1, tokens, width, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, tokens, width, generator=g, dtype=torch.float64)
    return toy, x0, cond, uncond


# ------------------------------------------------------------------------------------------------------------
# (a) Exactness on the closed-form denoiser (float64, the pack's functions directly).

def test_toy_round_trip_is_exact_with_fixed_point_inversion(inv):
    """Inversion refined to the fixed point is the exact inverse of DDIM sampling: round trip to 1e-10 in float64
    (the plain Eq. 3 approximation is not: its round trip misses by far more, so the check has teeth)."""
    toy, x0, cond, _ = _toy_problem()
    sigmas = torch.tensor(SIGMAS_10, dtype=torch.float64)
    exact = inv.ddim_invert(toy, x0, cond, sigmas, fixed_point_iterations=60)
    assert exact.shape == (11, *x0.shape)
    assert torch.equal(exact[0], x0)
    back = inv.ddim_sample(toy, exact[-1], cond, None, sigmas, 1.0)
    round_trip = float((back - x0).abs().max())
    assert round_trip < 1e-10, round_trip
    plain = inv.ddim_invert(toy, x0, cond, sigmas)
    plain_round_trip = float((inv.ddim_sample(toy, plain[-1], cond, None, sigmas, 1.0) - x0).abs().max())
    assert plain_round_trip > 1e-3, plain_round_trip


def test_toy_inversion_follows_the_probability_flow_ode(inv):
    """Plain DDIM inversion (Eq. 3) is a first-order solver of the PF-ODE: the inverted noise converges to the
    closed-form flow map, and the error halves when the number of steps doubles."""
    toy, x0, cond, _ = _toy_problem()
    sigma_max = 14.6146
    exact = toy.flow(x0, cond, sigma_max)
    errors, mid_errors = [], []
    for n in (20, 40, 80):
        sigmas = torch.linspace(sigma_max ** 0.5, 0.0, n + 1, dtype=torch.float64) ** 2  # denser at low noise
        traj = inv.ddim_invert(toy, x0, cond, sigmas)
        errors.append(float((traj[-1] - exact).abs().max() / exact.abs().max()))
        mid = n // 2  # every state of the trajectory, not only the last, follows the ODE
        ref = toy.flow(x0, cond, float(sigmas.flip(0)[mid]))
        mid_errors.append(float((traj[mid] - ref).abs().max() / ref.abs().max()))
    # measured: x*_T 10.8 %, 5.6 %, 2.9 %; x*_(T/2) 10.2 %, 5.3 %, 2.7 %
    assert errors[-1] < 0.04 and mid_errors[-1] < 0.04, (errors, mid_errors)
    for e in (errors, mid_errors):
        for coarse, fine in zip(e, e[1:]):
            assert 1.6 < coarse / fine < 2.5, e


def test_toy_null_text_reconstructs_with_guidance(inv):
    """At cfg 7.5 DDIM from the inverted noise misses the image; null-text optimisation (Eq. 4) brings the
    reconstruction back, and replaying the stored per-step embeddings reproduces the optimised path exactly."""
    toy, x0, cond, uncond = _toy_problem()
    sigmas = torch.tensor(SIGMAS_10, dtype=torch.float64)
    traj = inv.ddim_invert(toy, x0, cond, sigmas)
    plain = float((inv.ddim_sample(toy, traj[-1], cond, uncond, sigmas, 7.5) - x0).pow(2).mean())
    r = inv.null_text_optimise(toy, traj, cond, uncond, sigmas, 7.5, inner_steps=200, lr=0.05, early_stop=0.0)
    nulltext = float((r.final - x0).pow(2).mean())
    assert len(r.embeddings) == 10 and r.embeddings[0].shape == uncond.shape
    assert nulltext < plain * 1e-4, (plain, nulltext)
    replay = inv.ddim_sample(toy, traj[-1], cond, r.embeddings, sigmas, 7.5)
    assert float((replay - r.final).abs().max()) < 1e-12


def test_cond_branch_is_evaluated_once_per_step(inv):
    """The conditional prediction does not depend on ϕ: one evaluation per step, whatever the inner steps."""
    toy, x0, cond, uncond = _toy_problem()
    sigmas = torch.tensor(SIGMAS_10[-5:], dtype=torch.float64)
    calls = {"cond": 0, "uncond": 0}

    def counting(x, sigma, context, uncond=False):
        calls["uncond" if uncond else "cond"] += 1
        return toy(x, sigma, context)

    traj = inv.ddim_invert(toy, x0, cond, sigmas)
    inv.null_text_optimise(counting, traj, cond, uncond, sigmas, 7.5, inner_steps=7, early_stop=0.0)
    assert calls == {"cond": 4, "uncond": 4 * (7 + 1)}


# ------------------------------------------------------------------------------------------------------------
# The node and its SAMPLER inside ComfyUI's own sampling (SamplerCustom), toy denoiser as the MODEL.

def _encode_inputs(sd, subject, n_steps=10, text="a photo of a dog", negative=""):
    model, clip, vae = sd
    latent = call_node("VAEEncode", pixels=subject[0][:1], vae=vae)[0]
    pos = call_node("CLIPTextEncode", clip=clip, text=text)[0]
    neg = call_node("CLIPTextEncode", clip=clip, text=negative)[0]
    sigmas = call_node("BasicScheduler", model=model, scheduler="normal", steps=n_steps, denoise=1.0)[0]
    return latent, pos, neg, sigmas


def _invert(model, pos, neg, latent, sigmas, cfg=7.5, null_text_steps=0, learning_rate=1e-2, **kw):
    return call_node(NODE, model=model, positive=pos, negative=neg, latent=latent, sigmas=sigmas, cfg=cfg,
                     null_text_steps=null_text_steps, learning_rate=learning_rate, **kw)


def _sample(model, pos, neg, sampler, sigmas, latent, cfg):
    return call_node("SamplerCustom", model=model, add_noise=False, noise_seed=0, cfg=cfg, positive=pos,
                     negative=neg, sampler=sampler, sigmas=sigmas, latent_image=latent)[0]["samples"]


def _toy_model(model, toy):
    m = model.clone()
    m.set_model_unet_function_wrapper(toy.as_model_wrapper())
    return m


def test_node_round_trip_through_sampler_custom_is_exact_on_toy(host, sd15, subject):
    """Toy MODEL, cfg 1: the node's noise latent + SamplerCustom(add_noise off) with the node's sampler — or with
    stock euler — gives the image back to float32 precision (max abs error < 1e-4 in VAE latent units, latent
    values ~1) when the inversion is refined to its fixed point."""
    latent, pos, neg, sigmas = _encode_inputs(sd15, subject)
    toy = GaussianToy((4, 8, 8), 768, dtype=torch.float32)
    model = _toy_model(sd15[0], toy)
    noise, inversion, sampler = _invert(model, pos, neg, latent, sigmas, cfg=1.0, fixed_point_iterations=40)
    assert noise["samples"].shape == latent["samples"].shape
    assert inversion.null_embeddings is None and inversion.trajectory.shape[0] == 11
    mine = _sample(model, pos, neg, sampler, sigmas, noise, 1.0)
    euler = _sample(model, pos, neg, call_node("KSamplerSelect", sampler_name="euler")[0], sigmas, noise, 1.0)
    assert float((mine - latent["samples"]).abs().max()) < 1e-4
    assert float((euler - latent["samples"]).abs().max()) < 1e-4
    # the noise latent is x*_T of the trajectory, in user (VAE) space
    torch.testing.assert_close(noise["samples"], model.model.process_latent_out(inversion.trajectory[-1]))


def test_sampler_replays_null_text_embeddings_step_by_step(host, sd15, subject, inv):
    """Toy MODEL, cfg 7.5: SamplerCustom with the node's sampler equals DDIM with ϕ_t as the negative of step t
    (computed here directly on the toy), so the per-step substitution reaches the negative branch at the right
    step in the host's batched CFG — and the null text really changes the result."""
    latent, pos, neg, sigmas = _encode_inputs(sd15, subject, n_steps=6)
    toy = GaussianToy((4, 8, 8), 768, dtype=torch.float32)
    model = _toy_model(sd15[0], toy)
    noise, inversion, sampler = _invert(model, pos, neg, latent, sigmas, cfg=7.5, null_text_steps=20,
                                        learning_rate=0.05)
    assert len(inversion.null_embeddings) == 6
    got = _sample(model, pos, neg, sampler, sigmas, noise, 7.5)
    x_t = model.model.process_latent_in(noise["samples"])
    want = model.model.process_latent_out(
        inv.ddim_sample(toy, x_t, pos[0][0], inversion.null_embeddings, sigmas, 7.5))
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    plain = _sample(model, pos, neg, call_node("KSamplerSelect", sampler_name="euler")[0], sigmas, noise, 7.5)
    e_plain = float((plain - latent["samples"]).pow(2).mean())
    e_null = float((got - latent["samples"]).pow(2).mean())
    assert e_null < e_plain / 100, (e_plain, e_null)
    if "SamplerCustomAdvanced" in host.nodes.NODE_CLASS_MAPPINGS:  # guiders exist in newer hosts only
        guider = call_node("CFGGuider", model=model, positive=pos, negative=neg, cfg=7.5)[0]
        advanced = call_node("SamplerCustomAdvanced", noise=call_node("DisableNoise")[0], guider=guider,
                             sampler=sampler, sigmas=sigmas, latent_image=noise)[0]["samples"]
        torch.testing.assert_close(advanced, got)


# ------------------------------------------------------------------------------------------------------------
# (b) The real (tiny, random) SD1.5 UNet.

def test_null_text_beats_plain_inversion_at_cfg_7_5_on_sd15(host, sd15, subject):
    """Reconstruction of a 64x64 photo at cfg 7.5 over 6 steps: plain DDIM inversion (replayed with stock euler,
    which is DDIM) vs. null-text (8 inner steps), both through SamplerCustom. The fixture's random text encoder
    moves the UNet little per unit of embedding, so the embeddings need lr 0.1 here (the paper's 1e-2 gains only
    ~4x on this model in 10 x 10 steps; lr 5e-2 gains ~2e4x)."""
    latent, pos, neg, sigmas = _encode_inputs(sd15, subject, n_steps=6)
    model = sd15[0]
    noise, inversion, sampler = _invert(model, pos, neg, latent, sigmas, cfg=7.5, null_text_steps=8,
                                        learning_rate=0.1)
    nulltext = _sample(model, pos, neg, sampler, sigmas, noise, 7.5)
    plain = _sample(model, pos, neg, call_node("KSamplerSelect", sampler_name="euler")[0], sigmas, noise, 7.5)
    e_plain = float((plain - latent["samples"]).pow(2).mean())
    e_null = float((nulltext - latent["samples"]).pow(2).mean())
    assert e_null * 10 < e_plain, (e_plain, e_null)
    assert len(inversion.residuals) == 6 and all(math.isfinite(r) for r in inversion.residuals)
    assert module_forward_is_clean(model.model)


# ------------------------------------------------------------------------------------------------------------
# (c) In a real workflow: stock scheduler -> Invert Image -> SamplerCustom -> VAEDecode.

def test_node_in_a_workflow_reconstructs(host, run_workflow, ckpt_sd15, demo_subject_folder, unique_name):
    from safetensors.torch import load_file
    prefix = unique_name("inv")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_sd15}},
        "2": {"class_type": "PersonalizeLoadSubjectImages", "inputs": {"folder": demo_subject_folder.name, "size": 64}},
        "3": {"class_type": "ImageFromBatch", "inputs": {"image": ["2", 0], "batch_index": 0, "length": 1}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of an object"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 6,
                                                          "denoise": 1.0}},
        "8": {"class_type": NODE, "inputs": {"model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0],
                                             "latent": ["4", 0], "sigmas": ["7", 0], "cfg": 7.5,
                                             "null_text_steps": 8, "learning_rate": 0.1}},
        "9": {"class_type": "SamplerCustom", "inputs": {"model": ["1", 0], "add_noise": False, "noise_seed": 0,
                                                        "cfg": 7.5, "positive": ["5", 0], "negative": ["6", 0],
                                                        "sampler": ["8", 2], "sigmas": ["7", 0],
                                                        "latent_image": ["8", 0]}},
        "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "11": {"class_type": "SamplerCustom", "inputs": {"model": ["1", 0], "add_noise": False, "noise_seed": 0,
                                                         "cfg": 7.5, "positive": ["5", 0], "negative": ["6", 0],
                                                         "sampler": ["10", 0], "sigmas": ["7", 0],
                                                         "latent_image": ["8", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": prefix}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix + "_orig"}},
        "15": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": prefix + "_null"}},
        "16": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix + "_plain"}},
    }
    result = run_workflow(prompt)
    assert result.files("13"), "no reconstruction image saved"
    lat = {k: load_file(str(result.files(n, kind="latents")[0]))["latent_tensor"]
           for k, n in (("orig", "14"), ("null", "15"), ("plain", "16"))}
    e_null = float((lat["null"] - lat["orig"]).pow(2).mean())
    e_plain = float((lat["plain"] - lat["orig"]).pow(2).mean())
    assert e_null * 10 < e_plain, (e_plain, e_null)


# ------------------------------------------------------------------------------------------------------------
# (d) SD2.x: v-prediction goes through the host's model_sampling.

@pytest.mark.slow
def test_sd2_v_prediction(host, sd2, subject):
    latent, pos, neg, sigmas = _encode_inputs(sd2, subject, n_steps=3)
    model = sd2[0]
    noise, inversion, sampler = _invert(model, pos, neg, latent, sigmas, cfg=7.5, null_text_steps=4,
                                        learning_rate=0.1)
    assert torch.isfinite(noise["samples"]).all() and len(inversion.null_embeddings) == 3
    assert inversion.null_embeddings[0].shape[-1] == 1024
    nulltext = _sample(model, pos, neg, sampler, sigmas, noise, 7.5)
    plain = _sample(model, pos, neg, call_node("KSamplerSelect", sampler_name="euler")[0], sigmas, noise, 7.5)
    e_plain = float((plain - latent["samples"]).pow(2).mean())
    e_null = float((nulltext - latent["samples"]).pow(2).mean())
    assert e_null < e_plain, (e_plain, e_null)
    assert module_forward_is_clean(model.model)


# ------------------------------------------------------------------------------------------------------------
# (e) Bad input: clear errors before any work; nothing left patched.

@pytest.mark.parametrize("case", ["ascending_sigmas", "one_sigma", "empty_latent", "zero_latent", "cfg_one",
                                  "combined_conditioning"])
def test_bad_input(host, sd15, subject, err, case):
    latent, pos, neg, sigmas = _encode_inputs(sd15, subject, n_steps=3)
    model, clip, _ = sd15
    args = dict(pos=pos, neg=neg, latent=latent, sigmas=sigmas, cfg=7.5, null_text_steps=2)
    if case == "ascending_sigmas":
        args["sigmas"], match = call_node("FlipSigmas", sigmas=sigmas)[0], "strictly descending"
    elif case == "one_sigma":
        args["sigmas"], match = sigmas[:1], "at least 2 values"
    elif case == "empty_latent":
        args["latent"], match = {"samples": latent["samples"][:0]}, "LATENT is empty"
    elif case == "zero_latent":
        args["latent"] = call_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
        match = "all zeros"
    elif case == "cfg_one":
        args["cfg"], match = 1.0, "needs cfg ≠ 1"
    else:
        other = call_node("CLIPTextEncode", clip=clip, text="a cat")[0]
        args["pos"] = call_node("ConditioningCombine", conditioning_1=pos, conditioning_2=other)[0]
        match = "holds 2 entries"
    with pytest.raises(err, match=match):
        _invert(model, **args)
    assert module_forward_is_clean(model.model)


def test_sampler_refuses_other_sigmas(host, sd15, subject, err):
    latent, pos, neg, sigmas = _encode_inputs(sd15, subject, n_steps=3)
    model = sd15[0]
    noise, _, sampler = _invert(model, pos, neg, latent, sigmas, null_text_steps=1)
    for other in (call_node("BasicScheduler", model=model, scheduler="karras", steps=3, denoise=1.0)[0],
                  sigmas[1:]):
        with pytest.raises(err, match="Connect the same SIGMAS"):
            _sample(model, pos, neg, sampler, other, noise, 7.5)


def test_interrupt_leaves_no_patch(host, sd15, subject):
    import comfy.model_management as mm
    latent, pos, neg, sigmas = _encode_inputs(sd15, subject, n_steps=2)
    model = sd15[0]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _invert(model, pos, neg, latent, sigmas, null_text_steps=1)
    finally:
        mm.interrupt_current_processing(False)
    assert module_forward_is_clean(model.model)

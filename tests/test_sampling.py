"""core/sampling.py against independent references: the DDIM and DDPM formulas of the papers in VP units, the
host's own ``model_sampling`` conversions, multi-branch guidance computed branch by branch, and a sampler made by
the KSAMPLER factory run through stock SamplerCustom next to ComfyUI's own sampler."""
import math

import pytest
import torch

from helpers import call_node, encode, pack_module
from test_inversion import SIGMAS_10, GaussianToy


@pytest.fixture(scope="module")
def sp(host):
    return pack_module(host, "core.sampling")


@pytest.fixture
def err(host):
    return pack_module(host, "core.host").PersonalizeError


def _state(seed=0, shape=(2, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


def _vp(sigma):
    """(√ᾱ, √(1−ᾱ)) of σ: ᾱ = 1/(1+σ²)."""
    return 1 / math.sqrt(1 + sigma * sigma), sigma / math.sqrt(1 + sigma * sigma)


# ---------------------------------------------------------------------------------------------------------
# Steps vs the papers' formulas (VP units: x_VP = x/√(1+σ²)).

@pytest.mark.parametrize("sigma,sigma_next", [(14.6, 7.84), (1.95, 1.34), (0.369, 0.0292), (0.5, 0.0)])
def test_ddim_step_is_song_et_al_eq_12_with_eta_0(sp, sigma, sigma_next):
    x, x0, _ = _state()
    x = x0 + sigma * x  # a state at σ
    a, s = _vp(sigma)
    a_next, s_next = _vp(sigma_next)
    x_vp = a * x
    eps = (x_vp - a * x0) / s                              # ε̂ from x̂0 = D
    want_vp = a_next * x0 + s_next * eps                   # Eq. 12, η = 0
    got = sp.ddim_step(x, x0, sigma, sigma_next)
    torch.testing.assert_close(got * a_next, want_vp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_posterior_step_is_ddim_eta_and_at_eta_1_the_ddpm_posterior(sp, eta):
    sigma, sigma_next = 2.9183, 1.9502
    x, x0, z = _state(1)
    x = x0 + sigma * x
    ab, ab_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    x_vp = x * math.sqrt(ab)
    eps = (x_vp - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    s_t = eta * math.sqrt((1 - ab_next) / (1 - ab)) * math.sqrt(1 - ab / ab_next)   # Song et al. Eq. 16
    want_vp = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next - s_t ** 2) * eps + s_t * z
    got = sp.posterior_step(x, x0, sigma, sigma_next, z, eta=eta)
    torch.testing.assert_close(got * math.sqrt(ab_next), want_vp, rtol=1e-10, atol=1e-10)
    if eta == 1.0:  # Ho et al. Eq. 7: the posterior q(x_{t-1} | x_t, x0), α_t = ᾱ_t/ᾱ_{t-1}, β_t = 1 − α_t
        alpha = ab / ab_next
        beta = 1 - alpha
        mean = (math.sqrt(ab_next) * beta / (1 - ab)) * x0 + (math.sqrt(alpha) * (1 - ab_next) / (1 - ab)) * x_vp
        var = (1 - ab_next) / (1 - ab) * beta
        torch.testing.assert_close(got * math.sqrt(ab_next), mean + math.sqrt(var) * z, rtol=1e-10, atol=1e-10)
    if eta == 0.0:
        torch.testing.assert_close(got, sp.ddim_step(x, x0, sigma, sigma_next), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sp.posterior_step(x, x0, sigma, 0.0, z, eta=eta), x0)


# ---------------------------------------------------------------------------------------------------------
# Conversions vs the host's model_sampling.

def test_conversions_round_trip_and_agree_with_the_hosts_model_sampling(sp):
    import comfy.model_sampling as ms
    x, d, _ = _state(2)
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    x = d + s * x
    eps = sp.eps_from_denoised(x, d, sigma)
    torch.testing.assert_close(sp.denoised_from_eps(x, eps, sigma), d)
    v = sp.v_from_denoised(x, d, sigma)
    torch.testing.assert_close(sp.denoised_from_v(x, v, sigma), d)
    # v = √ᾱ·ε − √(1−ᾱ)·x0 written out
    torch.testing.assert_close(v, (eps - s * d) / torch.sqrt(1 + s * s))

    class EpsModel(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    class VModel(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass
    torch.testing.assert_close(sp.denoised_from_output(EpsModel(), sigma, eps, x), d)
    torch.testing.assert_close(sp.denoised_from_output(VModel(), sigma, v, x), d)


# ---------------------------------------------------------------------------------------------------------
# Guidance.

def test_multi_branch_guidance_on_a_toy_equals_the_formula_and_cfg(sp):
    toy = GaussianToy((4, 4, 4), 16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    u, c1, c2 = (torch.randn(1, 3, 16, generator=g, dtype=torch.float64) for _ in range(3))
    s = sp.sigma_batch(2.0, x)
    want = toy(x, s, u) + 3.0 * (toy(x, s, c1) - toy(x, s, u)) - 1.5 * (toy(x, s, c2) - toy(x, s, u))
    torch.testing.assert_close(sp.multi_branch_denoised(toy, x, 2.0, u, [(c1, 3.0), (c2, -1.5)]), want)
    torch.testing.assert_close(sp.multi_branch_denoised(toy, x, 2.0, u, [(c1, 7.5)]),
                               sp.guided_denoised(toy, x, 2.0, c1, u, 7.5))


class _CountingWrapper:
    """A model_function_wrapper that counts UNet calls and their batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, apply_model, args):
        self.batches.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])


def test_multi_branch_guidance_batches_branches_and_equals_the_sequential_computation(host, sp, sd15):
    """Tiny SD1.5: three branches + uncond in one UNet call (or in calls of ``max_batch`` samples) give the sum
    computed branch by branch with one UNet call each."""
    import comfy.model_management as mm
    model, clip, _ = sd15
    counter = _CountingWrapper()
    m = model.clone()
    m.set_model_unet_function_wrapper(counter)
    contexts = [encode(clip, t) for t in ("", "a photo of a dog", "a red cube", "a cat on grass")]
    with torch.inference_mode():
        mm.load_models_gpu([m])
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g).to(m.load_device) * 3.0
        pred = sp.ModelPrediction(m)
        u = contexts[0].to(m.load_device)
        branches = [(c.to(m.load_device), w) for c, w in zip(contexts[1:], (4.0, -1.0, 2.5))]
        s = sp.sigma_batch(3.0, x)
        d_u = pred(x, s, u, uncond=True)
        want = d_u + sum(w * (pred(x, s, c) - d_u) for c, w in branches)
        assert counter.batches == [1, 1, 1, 1]
        counter.batches.clear()
        one_call = sp.multi_branch_denoised(pred, x, 3.0, u, branches)
        assert counter.batches == [4]
        counter.batches.clear()
        two_calls = sp.multi_branch_denoised(pred, x, 3.0, u, branches, max_batch=2)
        assert counter.batches == [2, 2]
    torch.testing.assert_close(one_call, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(two_calls, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Schedules.

def test_schedule_checks_name_the_fix(sp, err):
    good = torch.tensor(SIGMAS_10)
    assert sp.check_sigmas("N", good).dtype == torch.float64
    with pytest.raises(err, match="at least 2 values"):
        sp.check_sigmas("N", good[:1])
    with pytest.raises(err, match="strictly descending.*Flip"):
        sp.check_sigmas("N", good.flip(0), "Do not connect Flip Sigmas.")
    with pytest.raises(err, match="finite and non-negative"):
        sp.check_sigmas("N", torch.tensor([2.0, 1.0, -0.5]))
    sp.check_same_schedule("N", good, good.clone() * (1 + 1e-6), "made on")
    with pytest.raises(err, match="made on 10 steps.*got 9 steps.*Connect the same SIGMAS"):
        sp.check_same_schedule("N", good, good[1:], "made on")
    assert sp.format_sigmas(good) == "[14.61, 7.84, 4.609, …, 0.0292, 0]"
    assert sp.sigma_list(good[:2]) == pytest.approx([14.6146, 7.8399])


# ---------------------------------------------------------------------------------------------------------
# The KSAMPLER factory through stock SamplerCustom.

def test_sampler_from_function_through_sampler_custom_equals_stock_euler_and_gets_its_options(host, sp, sd15):
    """A DDIM sample function written on the core (denoise + ddim_step), made a SAMPLER by the factory and run by
    stock SamplerCustom at cfg 5, gives stock euler's result (DDIM = Euler in σ) and receives its options."""
    model, clip, _ = sd15
    pos = call_node("CLIPTextEncode", clip=clip, text="a photo of a dog")[0]
    neg = call_node("CLIPTextEncode", clip=clip, text="")[0]
    sigmas = call_node("BasicScheduler", model=model, scheduler="normal", steps=4, denoise=1.0)[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    seen = {}

    def ddim(model_k, x, sigmas, extra_args=None, callback=None, disable=None, tag=None):
        seen["tag"] = tag
        for i in range(len(sigmas) - 1):
            sink = {}
            d = sp.denoise(model_k, x, sigmas[i], sp.with_cond_scale_capture(extra_args or {}, sink))
            seen.setdefault("scales", []).append(sink.get("cond_scale"))
            sp.report_step(callback, x, i, sigmas[i], d)
            x = sp.ddim_step(x, d, sigmas[i], sigmas[i + 1])
        return x

    def run(sampler):
        return call_node("SamplerCustom", model=model, add_noise=True, noise_seed=7, cfg=5.0, positive=pos,
                         negative=neg, sampler=sampler, sigmas=sigmas, latent_image=latent)[0]["samples"]
    mine = run(sp.sampler_from_function(ddim, tag="hello"))
    euler = run(call_node("KSamplerSelect", sampler_name="euler")[0])
    assert seen["tag"] == "hello"
    assert seen["scales"] == [5.0] * 4  # the guider's cfg, through the public pre-CFG hook, at every step
    torch.testing.assert_close(mine, euler, rtol=1e-4, atol=1e-4)  # float32: x + dt·d vs x + (σ′−σ)(x−D)/σ
    assert float(mine.abs().max()) > 0

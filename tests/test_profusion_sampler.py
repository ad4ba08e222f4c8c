"""ProFusion Fusion Sampling (methods/profusion.py; ../shared/docs/methods.md §5.7): the fusion move's closed form
against its definition (stochastic DDIM step, then DDIM's forward posterior) and against Monte-Carlo on an
analytic Gaussian model, the whole sampler against straightforward loops written with the official code's
formulas, the UNet evaluation count (2m + 3 per step), and the SAMPLER inside stock SamplerCustom /
SamplerCustomAdvanced and ComfyUI's executor on the tiny SD1.5 fixture."""
import math

import pytest
import torch

from helpers import call_node, pack_module
from test_inversion import SIGMAS_10, GaussianToy


@pytest.fixture(scope="module")
def pf(host):
    return pack_module(host, "methods.profusion")


@pytest.fixture
def err(host):
    return pack_module(host, "core.host").PersonalizeError


# (ᾱ_t, ᾱ_p) pairs of SD's schedule: high noise, middle, low noise, the last DDIM step of the official code
PAIRS = [(0.0047, 0.0158), (0.2, 0.35), (0.88, 0.95), (0.9904, 0.99915)]


def _official_coefficients(at, ap, eta):
    """The official pipeline's expressions (pipeline_stable_diffusion_promptnet.py, refine_step loop), verbatim:
    ``variance = (1−ᾱ_p)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_p)`` (DDIMScheduler._get_variance), ``sigma_t = eta·√variance``,
    ``latents − eps·(sigma_t²√(1−ᾱ_t))/(1−ᾱ_p) + sigma_t·noise·√((1−ᾱ_t)(2−2ᾱ_p−sigma_t²))/(1−ᾱ_p)``."""
    variance = (1 - ap) / (1 - at) * (1 - at / ap)
    s = eta * math.sqrt(variance)
    return s * s * math.sqrt(1 - at) / (1 - ap), s * math.sqrt((1 - at) * (2 - 2 * ap - s * s)) / (1 - ap)


# ---------------------------------------------------------------------------------------------------------
# The fusion move: closed form = definition.

@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("at,ap", PAIRS)
def test_closed_form_is_the_official_expression_and_equals_the_two_step_move_given_the_same_noise(pf, at, ap, eta):
    """(a) the coefficients are the official code's; (b) with ``z = (√(1−r)·z1 + z2)/√(2−r)`` the closed form is
    exactly "DDIM step t → p with noise s_f, then x_t ~ q_σ(x_t | x_p, x̂0)" fed with z1 and z2 (float64)."""
    drift, std = pf.fusion_coefficients(at, ap, eta)
    want = _official_coefficients(at, ap, eta)
    assert drift == pytest.approx(want[0], rel=1e-9) and std == pytest.approx(want[1], rel=1e-9)
    g = torch.Generator().manual_seed(0)
    x, eps, z1, z2 = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(4))
    two = pf.fusion_two_step(x, eps, at, ap, eta, z1, z2)
    closed = pf.fusion_step(x, eps, at, ap, eta, pf.two_step_noise(z1, z2, at, ap, eta))
    torch.testing.assert_close(closed, two, rtol=1e-10, atol=1e-10)
    # the combined noise is unit normal: the two weights' squares sum to 1
    r = pf.fusion_ratio(at, ap, eta)
    assert (1 - r) / (2 - r) + 1 / (2 - r) == pytest.approx(1.0)


def test_ddim_forward_posterior_by_monte_carlo(pf):
    """``q_σ(x_t | x_p, x0)`` written in the module (mean and variance by Bayes' rule) against simulation of its
    definition: x_t ~ q(x_t | x0), x_p ~ the DDIM kernel q_σ(x_p | x_t, x0) (Song et al. Eq. 7); the regression of
    x_t on x_p has the module's slope and residual variance (2M draws, within 5 standard errors)."""
    at, ap, x0 = 0.3, 0.5, 0.7
    s = pf.fusion_noise_level(at, ap, 1.0)
    g = torch.Generator().manual_seed(1)
    n = 2_000_000
    xt = math.sqrt(at) * x0 + math.sqrt(1 - at) * torch.randn(n, generator=g, dtype=torch.float64)
    xp = (math.sqrt(ap) * x0 + math.sqrt(1 - ap - s * s) * (xt - math.sqrt(at) * x0) / math.sqrt(1 - at)
          + s * torch.randn(n, generator=g, dtype=torch.float64))
    cov = torch.cov(torch.stack([xt, xp]))
    slope = float(cov[0, 1] / cov[1, 1])
    resid = float(cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1])
    zero = torch.zeros(1, dtype=torch.float64)
    # the module's posterior: mean affine in x_p (slope = d mean / d x_p), variance from a zero-noise/unit-noise pair
    mean0 = float(pf.ddim_forward_posterior(zero, zero + x0, at, ap, s, zero))
    mean1 = float(pf.ddim_forward_posterior(zero + 1, zero + x0, at, ap, s, zero))
    var = float(pf.ddim_forward_posterior(zero, zero + x0, at, ap, s, zero + 1)) - mean0
    assert abs((mean1 - mean0) - slope) < 5 * math.sqrt(resid / cov[1, 1] / n), (mean1 - mean0, slope)
    assert abs(var ** 2 - resid) < 5 * resid * math.sqrt(2 / n), (var ** 2, resid)
    # the intercept: E[x_t | x_p] at x_p = √ᾱ_p x0 is √ᾱ_t x0
    assert mean0 + (mean1 - mean0) * math.sqrt(ap) * x0 == pytest.approx(math.sqrt(at) * x0, abs=1e-12)


def test_sigma_space_move_is_the_vp_move(pf):
    """:func:`fusion_step_sigma` on ``x = x_t·√(1+σ²)`` is :func:`fusion_step` on x_t with ᾱ = 1/(1+σ²)."""
    g = torch.Generator().manual_seed(2)
    x, eps, z = (torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for s, s_next, eta in ((14.6146, 7.8399, 1.0), (0.9324, 0.625, 0.7), (0.0292, 0.0, 1.0), (0.3687, 0.0, 0.5)):
        at, ap = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
        want = pf.fusion_step(x / math.sqrt(1 + s * s), eps, at, ap, eta, z) * math.sqrt(1 + s * s)
        torch.testing.assert_close(pf.fusion_step_sigma(x, eps, s, s_next, eta, z), want, rtol=1e-12, atol=1e-12)


def test_last_step_edge_alpha_p_one(pf):
    """ᾱ_p = 1 (σ_next = 0): s_f = 0 but r = s_f²/(1−ᾱ_p) → η², so the move is the continuous limit of the official
    expression (which is 0/0 there), and with η = 1 it re-noises the prediction: x_t ← √ᾱ_t·x̂0 + √(1−ᾱ_t)·z."""
    at = 0.9904
    assert pf.fusion_noise_level(at, 1.0, 1.0) == 0.0
    for eta in (1.0, 0.6):
        drift, std = pf.fusion_coefficients(at, 1.0, eta)
        near = _official_coefficients(at, 1 - 1e-9, eta)
        assert drift == pytest.approx(near[0], rel=1e-6) and std == pytest.approx(near[1], rel=1e-6)
        assert drift == pytest.approx(eta ** 2 * math.sqrt(1 - at))
    g = torch.Generator().manual_seed(3)
    x, eps, z = (torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    x0 = (x - math.sqrt(1 - at) * eps) / math.sqrt(at)
    torch.testing.assert_close(pf.fusion_step(x, eps, at, 1.0, 1.0, z), math.sqrt(at) * x0 + math.sqrt(1 - at) * z)


# ---------------------------------------------------------------------------------------------------------
# The analytic Gaussian model: data N(μ, s²I), exact ε in closed form.

def _exact_eps(x_t, at, mu, s2):
    """ε̂(x_t) = E[ε | x_t] for data N(μ, s²I) with x_t = √ᾱ x0 + √(1−ᾱ) ε (Gaussian conditioning)."""
    return math.sqrt(1 - at) * (x_t - math.sqrt(at) * mu) / (at * s2 + 1 - at)


@pytest.mark.parametrize("at,ap", [(0.2, 0.35), (0.88, 0.95)])
def test_gaussian_toy_fusion_move_mean_and_variance_match_the_two_step_reference(pf, at, ap):
    """Data N(μ, s²I) (two prompts: μ_u, μ_γ), fixed x_t, the guided ε_f = e_u + ω_f(e_γ − e_u) from the exact ε's:
    400k fusion moves in closed form and 400k by the two-step definition (independent noise) have the same mean and
    variance per element, both within 5 standard errors of the theory (mean x_t − drift·ε_f, variance std²)."""
    g = torch.Generator().manual_seed(4)
    d, n, s2, omega_f = 6, 400_000, 0.25, 7.0
    mu_u, mu_g = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    x_t = math.sqrt(at) * mu_g + math.sqrt(at * s2 + 1 - at) * torch.randn(d, generator=g, dtype=torch.float64)
    e_u, e_g = _exact_eps(x_t, at, mu_u, s2), _exact_eps(x_t, at, mu_g, s2)
    eps_f = e_u + omega_f * (e_g - e_u)
    xs, es = x_t.expand(n, d), eps_f.expand(n, d)
    closed = pf.fusion_step(xs, es, at, ap, 1.0, torch.randn(n, d, generator=g, dtype=torch.float64))
    two = pf.fusion_two_step(xs, es, at, ap, 1.0, torch.randn(n, d, generator=g, dtype=torch.float64),
                             torch.randn(n, d, generator=g, dtype=torch.float64))
    drift, std = pf.fusion_coefficients(at, ap, 1.0)
    mean_want, var_want = x_t - drift * eps_f, std * std
    se_mean, se_var = std / math.sqrt(n), var_want * math.sqrt(2 / (n - 1))
    report = {}
    for name, sample in (("closed", closed), ("two-step", two)):
        m, v = sample.mean(0), sample.var(0)
        assert float((m - mean_want).abs().max()) < 5 * se_mean, (name, m, mean_want)
        assert float((v - var_want).abs().max()) < 5 * se_var, (name, v, var_want)
        report[name] = (float((m - mean_want).abs().max() / se_mean), float((v - var_want).abs().max() / se_var))
    # closed vs two-step directly (difference of two independent estimates)
    assert float((closed.mean(0) - two.mean(0)).abs().max()) < 5 * math.sqrt(2) * se_mean
    assert float((closed.var(0) - two.var(0)).abs().max()) < 5 * math.sqrt(2) * se_var
    print(f"ᾱ_t={at} ᾱ_p={ap}: drift {drift:.4f}, std {std:.4f}; max |error|/SE (mean, var): {report}")


# ---------------------------------------------------------------------------------------------------------
# The sampler loop on the toy denoiser vs straightforward loops.

class _ToyBranches:
    """``evaluate(x, σ, branches)`` on the GaussianToy, counting evaluations and calls."""

    def __init__(self, toy, templates):
        self.toy, self.templates = toy, templates
        self.evaluations, self.calls, self.per_call = 0, 0, []

    def __call__(self, x, sigma, branches):
        s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype)
        self.calls += 1
        self.evaluations += len(branches)
        self.per_call.append(len(branches))
        return [self.toy(x, s, self.templates[name] if ctx is None else ctx) for name, ctx in branches]


class _RecordingNoise:
    def __init__(self, shape, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.shape, self.drawn = shape, []

    def __call__(self, sigma, sigma_next):
        z = torch.randn(self.shape, generator=self.g, dtype=torch.float64)
        self.drawn.append(z)
        return z


def _toy_setup(pf, width=32, seed=5, gamma_rows=(2,)):
    g = torch.Generator().manual_seed(seed)
    toy = GaussianToy((4, 8, 8), width, dtype=torch.float64)
    neg, pos, cls = (torch.randn(1, 6, width, generator=g, dtype=torch.float64) for _ in range(3))
    conditions = pf.StaticConditions([[pos, {}]], [[cls, {}]], [[neg, {}]], list(gamma_rows))
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) * SIGMAS_10[0]
    return toy, neg, pos, cls, conditions, x


def _toy_eps(toy, x_vp, sigma, context):
    """ε(x_t, t, c) of the toy in VP units (x = x_t·√(1+σ²), ε = (x − D)/σ)."""
    x = x_vp * math.sqrt(1 + sigma * sigma)
    return (x - toy(x, torch.full((1,), sigma, dtype=x.dtype), context)) / sigma


def test_m0_is_two_condition_cfg_exactly(pf):
    """m = 0: the sampler is DDIM (η = 0) with ε̂ = e_u + ω1(e_1 − e_u) + ω2(e_2 − e_u), written here in VP
    units from the papers (x̂0 = (x_t − √(1−ᾱ_t)ε̂)/√ᾱ_t, x_p = √ᾱ_p x̂0 + √(1−ᾱ_p)ε̂); float64, to 1e-10."""
    toy, neg, pos, cls, conditions, x = _toy_setup(pf)
    settings = pf.FusionSettings(m=0)
    got = pf.fusion_sample(_ToyBranches(toy, {"negative": neg, "prompt": pos, "class": cls}), x,
                           torch.tensor(SIGMAS_10, dtype=torch.float64), conditions, settings, None)
    x_vp = x / math.sqrt(1 + SIGMAS_10[0] ** 2)
    for s, sn in zip(SIGMAS_10, SIGMAS_10[1:]):
        at, ap = 1 / (1 + s * s), 1 / (1 + sn * sn)
        e_u, e_1, e_2 = (_toy_eps(toy, x_vp, s, c) for c in (neg, pos, cls))
        e = e_u + 7.0 * (e_1 - e_u) + 5.0 * (e_2 - e_u)
        x0 = (x_vp - math.sqrt(1 - at) * e) / math.sqrt(at)
        x_vp = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * e
    torch.testing.assert_close(got, x_vp, rtol=1e-10, atol=1e-10)  # σ_N = 0: x = x_VP


@pytest.mark.parametrize("m", [1, 2])
def test_fusion_sampler_equals_the_official_loop(pf, m):
    """m ≥ 1, η_fuse 0.8, γ 0.6: the sampler equals the official pipeline's loop written in VP units with its own
    expressions (fusion with ``eps_f = e_u + ω_f(e_γ − e_u)``, e_γ from the prompt with its S* row × γ, then
    refinement + DDIM), given the same fusion noise, on a schedule ending at σ_min (where the official expression
    is defined); float64."""
    toy, neg, pos, cls, conditions, x = _toy_setup(pf)
    sigmas = SIGMAS_10[:-1]
    settings = pf.FusionSettings(m=m, eta_fuse=0.8)
    noise = _RecordingNoise(x.shape)
    got = pf.fusion_sample(_ToyBranches(toy, {"negative": neg, "prompt": pos, "class": cls}), x,
                           torch.tensor(sigmas, dtype=torch.float64), conditions, settings, noise)
    assert len(noise.drawn) == m * (len(sigmas) - 1)
    pos_gamma = pos.clone()
    pos_gamma[:, 2] *= 0.6
    draws = iter(noise.drawn)
    x_vp = x / math.sqrt(1 + sigmas[0] ** 2)
    for s, sn in zip(sigmas, sigmas[1:]):
        at, ap = 1 / (1 + s * s), 1 / (1 + sn * sn)
        for _ in range(m):
            e_u, e_g = _toy_eps(toy, x_vp, s, neg), _toy_eps(toy, x_vp, s, pos_gamma)
            eps_f = e_u + 7.0 * (e_g - e_u)
            drift, std = _official_coefficients(at, ap, 0.8)
            x_vp = x_vp - eps_f * drift + std * next(draws)
        e_u, e_1, e_2 = (_toy_eps(toy, x_vp, s, c) for c in (neg, pos, cls))
        e = e_u + 7.0 * (e_1 - e_u) + 5.0 * (e_2 - e_u)
        x0 = (x_vp - math.sqrt(1 - at) * e) / math.sqrt(at)
        x_vp = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * e
    want = x_vp * math.sqrt(1 + sigmas[-1] ** 2)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # and fusion changes the result (the test has teeth)
    plain = pf.fusion_sample(_ToyBranches(toy, {"negative": neg, "prompt": pos, "class": cls}), x,
                             torch.tensor(sigmas, dtype=torch.float64), conditions, pf.FusionSettings(m=0), None)
    assert float((plain - got).abs().max()) > 1e-2


@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_evaluations_per_step_are_2m_plus_3_in_m_plus_1_calls(pf, m):
    toy, neg, pos, cls, conditions, x = _toy_setup(pf)
    ev = _ToyBranches(toy, {"negative": neg, "prompt": pos, "class": cls})
    stats = {}
    pf.fusion_sample(ev, x, torch.tensor(SIGMAS_10, dtype=torch.float64), conditions, pf.FusionSettings(m=m),
                     _RecordingNoise(x.shape), stats=stats)
    steps = len(SIGMAS_10) - 1
    assert ev.evaluations == stats["evaluations"] == steps * (2 * m + 3)
    assert pf.FusionSettings(m=m).evaluations_per_step() == 2 * m + 3
    assert ev.calls == stats["calls"] == steps * (m + 1)
    assert ev.per_call == ([2] * m + [3]) * steps


def test_several_references_follow_the_official_weights(pf):
    """Two references (S*_0 and S*_1 with scale s_1 = 3): fusion averages the per-reference guided ε's with
    weights ω1/(ω1+s_1), s_1/(ω1+s_1); refinement adds s_1(e_{S_1} − e_u); evaluations per step 2 + 1 + 2 + 2."""

    class TwoRefs(pf.FusionConditions):
        def __init__(self, pos, pos1, cls, neg):
            self.prompt, self.class_prompt, self.negative = [[pos, {}]], [[cls, {}]], [[neg, {}]]
            self.extra_scales = (3.0,)
            self.p0, self.p1 = pos, pos1

        def fusion_contexts(self, x_t, sigma, timestep, gamma):
            return [self.p0 * gamma, self.p1 * gamma]

        def refinement_contexts(self, x_t, sigma, timestep):
            return [self.p0, self.p1]

    toy, neg, pos, cls, _, x = _toy_setup(pf)
    pos1 = torch.randn(pos.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sigmas = SIGMAS_10[:4]
    noise = _RecordingNoise(x.shape)
    ev = _ToyBranches(toy, {"negative": neg, "prompt": pos, "class": cls})
    got = pf.fusion_sample(ev, x, torch.tensor(sigmas, dtype=torch.float64), TwoRefs(pos, pos1, cls, neg),
                           pf.FusionSettings(), noise)
    assert ev.per_call == [3, 4] * 3
    draws = iter(noise.drawn)
    x_vp = x / math.sqrt(1 + sigmas[0] ** 2)
    for s, sn in zip(sigmas, sigmas[1:]):
        at, ap = 1 / (1 + s * s), 1 / (1 + sn * sn)
        e_u = _toy_eps(toy, x_vp, s, neg)
        f0 = e_u + 7.0 * (_toy_eps(toy, x_vp, s, pos * 0.6) - e_u)
        f1 = e_u + 7.0 * (_toy_eps(toy, x_vp, s, pos1 * 0.6) - e_u)
        eps_f = f0 * 7.0 / 10.0 + f1 * 3.0 / 10.0                   # official: eps·ω1/Σ + eps_k·s_k/Σ
        drift, std = _official_coefficients(at, ap, 1.0)
        x_vp = x_vp - eps_f * drift + std * next(draws)
        e_u, e_1, e_k, e_2 = (_toy_eps(toy, x_vp, s, c) for c in (neg, pos, pos1, cls))
        e = e_u + 7.0 * (e_1 - e_u) + 5.0 * (e_2 - e_u) + 3.0 * (e_k - e_u)
        x0 = (x_vp - math.sqrt(1 - at) * e) / math.sqrt(at)
        x_vp = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * e
    torch.testing.assert_close(got, x_vp * math.sqrt(1 + sigmas[-1] ** 2), rtol=1e-9, atol=1e-9)


def test_provider_sees_the_vp_latent_and_timestep_of_each_evaluation(pf):
    """The provider is asked once per fusion iteration (with γ) and once per refinement, with x_t = x/√(1+σ²) of
    the state about to be evaluated (after the fusion move for the refinement) and the model timestep of σ."""
    toy, neg, pos, cls, conditions, x = _toy_setup(pf)
    seen = []

    class Spy(pf.StaticConditions):
        def fusion_contexts(self, x_t, sigma, timestep, gamma):
            seen.append(("fusion", x_t.clone(), sigma, timestep, gamma))
            return super().fusion_contexts(x_t, sigma, timestep, gamma)

        def refinement_contexts(self, x_t, sigma, timestep):
            seen.append(("refine", x_t.clone(), sigma, timestep, None))
            return super().refinement_contexts(x_t, sigma, timestep)

    states = []
    spy = Spy([[pos, {}]], [[cls, {}]], [[neg, {}]], [2])
    pf.fusion_sample(_ToyBranches(toy, {"negative": neg, "prompt": pos, "class": cls}), x,
                     torch.tensor(SIGMAS_10[:3], dtype=torch.float64), spy, pf.FusionSettings(m=1),
                     _RecordingNoise(x.shape), timestep=lambda s: 1000.0 * s, callback=lambda d: states.append(d["x"]))
    assert [k for k, *_ in seen] == ["fusion", "refine"] * 2
    torch.testing.assert_close(seen[0][1], x / math.sqrt(1 + SIGMAS_10[0] ** 2))
    assert seen[0][2:] == (SIGMAS_10[0], 1000.0 * SIGMAS_10[0], 0.6)
    for k in (1, 3):  # refinement: the fused state the callback reports
        s = seen[k][2]
        torch.testing.assert_close(seen[k][1], states[k // 2] / math.sqrt(1 + s * s))
    assert not torch.equal(seen[1][1], seen[0][1])


def test_static_conditions_scale_the_placeholder_row_of_the_encoded_tensor(pf):
    pos = torch.randn(1, 77, 16, dtype=torch.float64)
    c = pf.StaticConditions([[pos, {}]], [[pos, {}]], [[pos, {}]], [3])
    c.check()
    got = c.fusion_contexts(None, 1.0, 1.0, 0.6)[0]
    want = pos.clone()
    want[:, 3] = pos[:, 3] * 0.6
    assert torch.equal(got, want)
    assert torch.equal(got[:, :3], pos[:, :3]) and torch.equal(got[:, 4:], pos[:, 4:])
    assert c.refinement_contexts(None, 1.0, 1.0) == [None]


# ---------------------------------------------------------------------------------------------------------
# Inside ComfyUI: stock SamplerCustom / SamplerCustomAdvanced, the host's batching, the executor.

def _prompts(clip, pf):
    text = "a holder in Ghibli style"
    pos = call_node("CLIPTextEncode", clip=clip, text=text)[0]
    cls = call_node("CLIPTextEncode", clip=clip, text="a dog in Ghibli style")[0]
    neg = call_node("CLIPTextEncode", clip=clip, text="")[0]
    return pos, cls, neg, pf.placeholder_rows(clip, text, "holder")


def _sample(model, sampler, sigmas, pos, neg, seed=3, cfg=7.0, latent=None):
    latent = latent if latent is not None else {"samples": torch.zeros(1, 4, 8, 8)}
    return call_node("SamplerCustom", model=model, add_noise=True, noise_seed=seed, cfg=cfg, positive=pos,
                     negative=neg, sampler=sampler, sigmas=sigmas, latent_image=latent)[0]["samples"]


def test_placeholder_rows_on_the_sd15_tokenizer(host, pf, sd15, err):
    _, clip, _ = sd15
    assert pf.placeholder_rows(clip, "a holder in Ghibli style", "holder") == [2]   # [start, a, holder, ...]
    assert pf.placeholder_rows(clip, "holder", "holder") == [1]
    with pytest.raises(err, match="does not contain the placeholder 'holder'"):
        pf.placeholder_rows(clip, "a dog in Ghibli style", "holder")


class _CountingWrapper:
    def __init__(self):
        self.batches = []

    def __call__(self, apply_model, args):
        self.batches.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])


@pytest.mark.parametrize("m", [1, 2])
def test_sd15_unet_calls_per_step_are_m_plus_1_batched_into_2m_plus_3_evaluations(host, pf, sd15, m):
    """Real tiny SD1.5 UNet through SamplerCustom, a counting model_function_wrapper on the MODEL: per step m calls
    of batch 2 (fusion) and one of batch 3 (refinement) — 2m + 3 evaluations (the official code: 6 for m = 1)."""
    model, clip, _ = sd15
    pos, cls, neg, rows = _prompts(clip, pf)
    counter = _CountingWrapper()
    counted = model.clone()
    counted.set_model_unet_function_wrapper(counter)
    sigmas = call_node("BasicScheduler", model=model, scheduler="normal", steps=2, denoise=1.0)[0]
    sampler = pf.fusion_sampler(pf.StaticConditions(pos, cls, neg, rows), pf.FusionSettings(m=m))
    out = _sample(counted, sampler, sigmas, pos, neg)
    assert counter.batches == ([2] * m + [3]) * 2
    assert torch.isfinite(out).all()


def _m0_is_stock_cfg_euler(pf, sd, steps):
    """m = 0, ω2 = 0: Fusion Sampling is CFG with ω1 and DDIM = Euler, so SamplerCustom with it equals
    SamplerCustom with stock euler at cfg ω1 on the same prompts (real UNet, float32)."""
    model, clip, _ = sd
    pos, cls, neg, rows = _prompts(clip, pf)
    sigmas = call_node("BasicScheduler", model=model, scheduler="karras", steps=steps, denoise=1.0)[0]
    mine = _sample(model, pf.fusion_sampler(pf.StaticConditions(pos, cls, neg, rows),
                                            pf.FusionSettings(m=0, omega1=6.0, omega2=0.0)), sigmas, pos, neg)
    euler = _sample(model, call_node("KSamplerSelect", sampler_name="euler")[0], sigmas, pos, neg, cfg=6.0)
    torch.testing.assert_close(mine, euler, rtol=1e-4, atol=1e-4)
    assert float(mine.abs().max()) > 0


def test_sd15_m0_without_class_prompt_is_stock_cfg_euler(host, pf, sd15):
    _m0_is_stock_cfg_euler(pf, sd15, 3)


@pytest.mark.slow
def test_sd2_v_prediction(host, pf, sd2):
    """SD2 (v-prediction; the released PromptNet's base): m = 0 equals stock CFG euler, and m = 1 runs (finite, and
    different from m = 0). Every prediction is the host's D, so ε̂ = (x − D)/σ holds for v as for ε."""
    import comfy.model_sampling as ms
    model, clip, _ = sd2
    assert isinstance(model.model.model_sampling, ms.V_PREDICTION)
    _m0_is_stock_cfg_euler(pf, sd2, 2)
    pos, cls, neg, rows = _prompts(clip, pf)
    sigmas = call_node("BasicScheduler", model=model, scheduler="normal", steps=2, denoise=1.0)[0]
    fused = _sample(model, pf.fusion_sampler(pf.StaticConditions(pos, cls, neg, rows)), sigmas, pos, neg)
    plain = _sample(model, pf.fusion_sampler(pf.StaticConditions(pos, cls, neg, rows), pf.FusionSettings(m=0)),
                    sigmas, pos, neg)
    assert torch.isfinite(fused).all() and float((fused - plain).abs().max()) > 1e-3


def test_sd15_toy_model_through_sampler_custom_equals_the_loop(host, pf, sd15):
    """Toy MODEL (the closed-form denoiser as the UNet), m = 1: SamplerCustom with the Fusion SAMPLER equals
    :func:`fusion_sample` run directly on the toy from the same start with the fusion noise of the host's seeded
    noise sampler (CPU generator seeded with the noise seed) — so the host's conditioning processing, batching and
    the seed are what the loop assumes; the same seed gives the same latent, another seed another."""
    import comfy.sample
    from test_inversion import _toy_model
    model, clip, _ = sd15
    pos, cls, neg, rows = _prompts(clip, pf)
    toy = GaussianToy((4, 8, 8), 768, dtype=torch.float32)
    tmodel = _toy_model(model, toy)
    sigmas = call_node("BasicScheduler", model=model, scheduler="normal", steps=6, denoise=1.0)[0]
    conditions = pf.StaticConditions(pos, cls, neg, rows)
    sampler = pf.fusion_sampler(conditions, pf.FusionSettings(m=1))
    got = _sample(tmodel, sampler, sigmas, pos, neg, seed=11)
    assert torch.equal(got, _sample(tmodel, sampler, sigmas, pos, neg, seed=11))
    assert float((got - _sample(tmodel, sampler, sigmas, pos, neg, seed=12)).abs().max()) > 1e-2
    start = {}
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 11)
    comfy.sample.sample_custom(tmodel, noise, 7.0, call_node("KSamplerSelect", sampler_name="euler")[0], sigmas,
                               pos, neg, latent, callback=lambda i, x0, x, n: start.setdefault(i, x.clone()),
                               disable_pbar=True, seed=11)
    dev = start[0].device  # the host's noise sampler draws on the sampling device with a generator seeded there
    x = start[0].cpu().double()
    g = torch.Generator(device=dev).manual_seed(11)
    ev = _ToyBranches(GaussianToy((4, 8, 8), 768), {"negative": neg[0][0].double(), "prompt": pos[0][0].double(),
                                                     "class": cls[0][0].double()})
    want = pf.fusion_sample(ev, x, sigmas.double(), pf.StaticConditions(
        [[pos[0][0].double(), {}]], [[cls[0][0].double(), {}]], [[neg[0][0].double(), {}]], rows),
        pf.FusionSettings(m=1), lambda s, sn: torch.randn(x.shape, generator=g, device=dev).cpu().double())
    want = tmodel.model.process_latent_out(want.float())
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max()), float((got - want).abs().max())
    if "SamplerCustomAdvanced" in host.nodes.NODE_CLASS_MAPPINGS:
        guider = call_node("CFGGuider", model=tmodel, positive=pos, negative=neg, cfg=7.0)[0]
        advanced = call_node("SamplerCustomAdvanced", noise=call_node("RandomNoise", noise_seed=11)[0], guider=guider,
                             sampler=sampler, sigmas=sigmas, latent_image={"samples": latent})[0]["samples"]
        torch.testing.assert_close(advanced, got)


class _TestFusionSampler:
    """A test-only node (registered for one test) that makes the SAMPLER from three CONDITIONINGs."""
    FUNCTION, CATEGORY, RETURN_TYPES = "make", "testing", ("SAMPLER",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "prompt": ("CONDITIONING",), "class_prompt": ("CONDITIONING",),
                             "negative": ("CONDITIONING",), "m": ("INT", {"default": 1, "min": 0, "max": 8})}}

    def make(self, clip, prompt, class_prompt, negative, m):
        pf = _TestFusionSampler.pf
        rows = pf.placeholder_rows(clip, "a holder in Ghibli style", "holder")
        return (pf.fusion_sampler(pf.StaticConditions(prompt, class_prompt, negative, rows), pf.FusionSettings(m=m)),)


class _TestLatentSink:
    FUNCTION, CATEGORY, RETURN_TYPES, OUTPUT_NODE = "keep", "testing", (), True
    kept = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def keep(self, samples):
        _TestLatentSink.kept.append(samples["samples"].clone())
        return {}


def test_executor_runs_the_sampler_in_sampler_custom(host, pf, sd15, ckpt_sd15, run_workflow, monkeypatch):
    """An API prompt through ComfyUI's own executor: Load Checkpoint → three CLIP Text Encodes → (test node making
    the Fusion SAMPLER) → stock SamplerCustom with BasicScheduler's SIGMAS; the latent equals the direct call."""
    _TestFusionSampler.pf = pf
    _TestLatentSink.kept = []
    monkeypatch.setitem(host.nodes.NODE_CLASS_MAPPINGS, "TestPFFusionSampler", _TestFusionSampler)
    monkeypatch.setitem(host.nodes.NODE_CLASS_MAPPINGS, "TestPFLatentSink", _TestLatentSink)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_sd15}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a holder in Ghibli style"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a dog in Ghibli style"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "TestPFFusionSampler", "inputs": {"clip": ["1", 1], "prompt": ["2", 0],
                                                              "class_prompt": ["3", 0], "negative": ["4", 0], "m": 1}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 2,
                                                         "denoise": 1.0}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "SamplerCustom", "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": 5,
                                                        "cfg": 7.0, "positive": ["2", 0], "negative": ["4", 0],
                                                        "sampler": ["5", 0], "sigmas": ["6", 0],
                                                        "latent_image": ["7", 0]}},
        "9": {"class_type": "TestPFLatentSink", "inputs": {"samples": ["8", 0]}},
    }
    run_workflow(prompt)
    assert len(_TestLatentSink.kept) == 1
    model, clip, _ = sd15
    pos, cls, neg, rows = _prompts(clip, pf)
    sigmas = call_node("BasicScheduler", model=model, scheduler="simple", steps=2, denoise=1.0)[0]
    direct = _sample(model, pf.fusion_sampler(pf.StaticConditions(pos, cls, neg, rows)), sigmas, pos, neg, seed=5)
    torch.testing.assert_close(_TestLatentSink.kept[0].cpu(), direct, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any work.

def test_bad_input(host, pf, sd15, err):
    model, clip, _ = sd15
    pos, cls, neg, rows = _prompts(clip, pf)
    good = pf.StaticConditions(pos, cls, neg, rows)
    with pytest.raises(err, match="η_fuse must lie in 0..1"):
        pf.fusion_sampler(good, pf.FusionSettings(eta_fuse=1.5))
    with pytest.raises(err, match="whole number ≥ 0"):
        pf.fusion_sampler(good, pf.FusionSettings(m=-1))
    with pytest.raises(err, match="holds 2 entries"):
        pf.fusion_sampler(pf.StaticConditions(pos + pos, cls, neg, rows))
    with pytest.raises(err, match="outside the encoded prompt"):
        pf.fusion_sampler(pf.StaticConditions(pos, cls, neg, [80]))
    with pytest.raises(err, match="different text encoders"):
        pf.fusion_sampler(pf.StaticConditions(pos, [[torch.zeros(1, 77, 1024), {}]], neg, rows))
    sigmas = call_node("BasicScheduler", model=model, scheduler="normal", steps=2, denoise=1.0)[0]
    masked = {"samples": torch.zeros(1, 4, 8, 8), "noise_mask": torch.ones(1, 1, 64, 64)}
    with pytest.raises(err, match="noise mask"):
        _sample(model, pf.fusion_sampler(good), sigmas, pos, neg, latent=masked)

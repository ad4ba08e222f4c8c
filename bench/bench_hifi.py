"""HiFi Tuner benchmark: the cost of the pack's HiFi Tuner steps, each as a ratio to one plain CFG sampling step.

The denominator ("cfg") is one step of the host's stock ``euler`` sampler run through ``comfy.sample.sample_custom``
(what SamplerCustom runs) for ``--steps`` steps at cfg ``--cfg``, divided by the number of steps: one call of the
host's CFG denoiser per step, i.e. the cond and uncond UNet forwards at batch 1 each (the host batches them into one
batch-2 forward), plus the step's share of sample_custom's fixed cost. Workloads, on the tiny random SD1.5 fixture
(``harness.fixtures.ensure_checkpoint("sd15")``) loaded by the host's ``CheckpointLoaderSimple``:

* HiFi Subject Tune (methods/hifi_tuner.py): one step of the global phase (t ~ U{0..999}) and one of the step-wise
  phase (t fixed): ``TrainingSession`` + ``ConditioningRows`` + ``masked_eps_loss`` (mask and regulariser on) +
  ``tuning.train_step`` + the progress-bar update, exactly the body of ``learn_subject``'s ``phase``. One UNet
  forward + backward (w.r.t. the subject rows in the cross-attention context) of the cond branch.
* Invert Image (methods/inversion.py): one DDIM inversion step (``ddim_invert``, cfg 1: one cond forward) and one
  null-text step (``null_text_optimise``, J = ``--inner-steps`` inner steps, early stop off so all J run: one cached
  cond forward, J uncond forward+backward, one final uncond forward), with the ``ModelPrediction`` that
  ``invert_image`` builds, inside a ``TrainingSession``.
* HiFi Reference-Guided Sampler (methods/reference_guidance.py): ``sample_custom`` with
  ``reference_guided_sampler(ReferenceGuidance(...))`` on the stock MODEL; "guided" has t_start = N, t_end = 1 (every
  step guided, J inner steps each; mask = a quarter of the latent; trajectory from ``ddim_invert``), "unguided" has
  an empty guidance range (t_start = t_end = 0: no step guided, no paste). Expected cost of a guided step: one CFG
  step + (J+1) uncond forwards + J uncond backwards = ``1 + (J+1)/2 + J·r/2`` CFG steps with r = backward/forward
  time of the uncond branch (measured, "components" rows) and a CFG step counted as two batch-1 forwards; "parts"
  is the same sum from the measured component times instead. Conditional-branch evaluations per step are counted
  with a ``model_function_wrapper`` on a clone of the MODEL (calls whose ``cond_or_uncond`` contains 0): must be 1.

Components (for the expectations): one uncond forward at batch 1 (no grad) and one forward + backward w.r.t. the
context, on the stock MODEL as the guided sampler runs them (host attention) and through the training session's
``ModelPrediction`` as tuning/inversion run them (fused SDPA on CPU).

The session-side models are a second load of the checkpoint, so the stock sampling never unloads the training
session's patched clone (they are not clones of each other). Timing: ``measure.interleaved`` - every workload and the
denominator once per round, order alternating, after one warm-up round; per round the ratio (workload time per unit)
/ (cfg time per step); reported: median [25th-75th percentile] of the per-round ratios and the median ms per unit.
No pass/fail on speed; the exit status is 1 only if a guided step evaluated the conditional branch other than once.

Run: ``python bench/bench_hifi.py`` from the repository root (``make bench`` does, via bench/run_all.py);
``--quick`` for a smoke run (8x8 only, 1 round, 1 step).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
from bench_training import boot_quiet, run_scratch  # noqa: E402

CAPTION = "a photo of a dog"
TUNE_LR = 5e-3          # learn_subject defaults
REG_WEIGHT = 1e-2
N_TOKENS = 5
STEPWISE_T = 501        # a step-wise phase timestep (ddim_timesteps(50) contains 501)
GUIDE_LR = 1e-2
NULL_TEXT_LR = 1e-2


@dataclass
class Row:
    workload: str
    latent: int
    rounds: int
    unit: str
    ratio_median: float
    ratio_q1: float
    ratio_q3: float
    ms_per_unit: float
    expected: float | None = None          # analytic, in CFG steps
    expected_parts: float | None = None    # from the measured component times
    cond_evals: float | None = None        # conditional-branch UNet evaluations per step
    uncond_evals: float | None = None
    component: bool = False


def pack_modules(h):
    import importlib
    p = h.pack_module_name
    names = ("core.tuning", "core.diffusion", "core.textual", "core.host", "core.sampling", "methods.hifi_tuner",
             "methods.inversion", "methods.reference_guidance")
    return {n.split(".")[-1]: importlib.import_module(f"{p}.{n}") for n in names}


def call_node(class_type: str, **inputs):
    """A node's FUNCTION as ComfyUI's executor runs it (inside inference mode)."""
    import nodes
    import torch
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def stock_sampler(name: str):
    import comfy.samplers
    return comfy.samplers.sampler_object(name)


class CondCounter:
    """A ``model_function_wrapper`` counting UNet calls per branch (both hosts call ``f(apply_model, args)``), per
    sampling run: ``side`` names the run in progress, ``runs[side]`` counts its sample_custom calls."""

    def __init__(self):
        self.side = None
        self.cond, self.uncond, self.runs = {}, {}, {}

    def start(self, side):
        self.side = side
        self.runs[side] = self.runs.get(side, 0) + 1

    def __call__(self, apply_model, args):
        tags = list(args["cond_or_uncond"])
        self.cond[self.side] = self.cond.get(self.side, 0) + int(0 in tags)
        self.uncond[self.side] = self.uncond.get(self.side, 0) + int(1 in tags)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def per_step(self, side, steps: int) -> tuple[float, float]:
        n = self.runs.get(side, 0) * steps
        return self.cond.get(side, 0) / n, self.uncond.get(side, 0) / n


# ---------------------------------------------------------------------------------------------------------------
# one latent size


class Bench:
    """Everything for one latent size: the stock MODEL's sampling sides, a TrainingSession on the second load for
    tuning and inversion, and the component sides. Use as a context manager (the session stays open)."""

    def __init__(self, M, stock, session_models, size: int, steps: int, inner: int, cfg: float, reps: int = 1,
                 seed: int = 0):
        self.M, self.stock, self.size, self.n, self.J, self.cfg, self.reps = M, stock, size, steps, inner, cfg, reps
        self.model_s, self.clip_s = stock
        self.model_t, self.clip_t = session_models
        self.seed = seed

    # -- setup ---------------------------------------------------------------------------------------------------
    def __enter__(self):
        import torch
        M, s_ = self.M, self.size
        tuning, inv, rg, host = M["tuning"], M["inversion"], M["reference_guidance"], M["host"]
        g = torch.Generator().manual_seed(1000 + s_)
        self.latents = torch.randn(1, 4, s_, s_, generator=g)            # user-space VAE latent (cached by the pack)
        self.ref_latents = torch.randn(1, 4, s_, s_, generator=g)
        mask = torch.zeros(1, 1, s_, s_)
        mask[..., s_ // 4: s_ // 4 + s_ // 2, s_ // 4: s_ // 4 + s_ // 2] = 1.0   # a quarter of the latent
        self.mask = mask
        self.pos = call_node("CLIPTextEncode", clip=self.clip_s, text=CAPTION)[0]
        self.neg = call_node("CLIPTextEncode", clip=self.clip_s, text="")[0]
        self.sigmas = call_node("BasicScheduler", model=self.model_s, scheduler="normal", steps=self.n,
                                denoise=1.0)[0]
        self.noise = torch.randn(1, 4, s_, s_, generator=g)
        self.latent_image = torch.zeros(1, 4, s_, s_)
        self.euler = stock_sampler("euler")
        # every sampling run (euler, guided, unguided) uses this clone of the stock MODEL, whose only change is a
        # model_function_wrapper counting UNet calls per branch (one Python call per UNet call; the same on all
        # three sides)
        self.counter = CondCounter()
        self.model_c = self.model_s.clone()
        self.model_c.set_model_unet_function_wrapper(self.counter)

        # the training session (as learn_subject / invert_image open it), on the second load
        self.session = tuning.TrainingSession(self.model_t, self.clip_t)
        s = self.session.__enter__()
        try:
            cond, pooled = host.encode_text(s.clip, CAPTION)
            null, _ = host.encode_text(s.clip, "")
            s.load()
            dev = s.device
            cond = cond.detach().clone().float().to(dev)
            pooled = pooled.detach().clone().to(dev) if pooled is not None else None
            null = null.detach().clone().float().to(dev)
            self.cond_t, self.null_t = cond, null
            gen = tuning.seeded_generator(self.seed)
            objective = M["diffusion"].DiffusionObjective(s.model, self.latents, mask, gen)
            self.tune_cfg = tuning.TuningConfig(steps=10 ** 6, learning_rate=TUNE_LR, seed=self.seed)
            self.tune = {label: self._tune_side(objective, cond, pooled, null[0, -N_TOKENS:], t, label)
                         for label, t in (("global", None), ("step-wise", STEPWISE_T))}
            # inversion: the ModelPrediction invert_image builds
            x0 = s.model.model.process_latent_in(self.latents.float().clone()).to(dev)
            self.x0_t = x0
            pos_t, neg_t = [[cond, {}]], [[null, {}]]
            self.denoiser = M["sampling"].ModelPrediction.for_conditioning(s.model, pos_t, neg_t, x0, inv.NODE)
            self.sig = self.sigmas.detach().double().cpu()
            self.traj_t = inv.ddim_invert(self.denoiser, x0, cond, self.sig)
            ref_x0 = s.model.model.process_latent_in(self.ref_latents.float().clone()).to(dev)
            ref_traj = inv.ddim_invert(self.denoiser, ref_x0, cond, self.sig).detach().cpu()
        except BaseException:
            self.session.__exit__(*sys.exc_info())
            raise
        # the reference guidance (every step guided) and the empty one (no step guided)
        self.guided = rg.ReferenceGuidance(sigmas=self.sigmas.detach().float().cpu(), trajectory=ref_traj,
                                           mask=mask.clone(), t_start=self.n, t_end=1, inner_steps=self.J,
                                           lr=GUIDE_LR)
        self.unguided = rg.ReferenceGuidance(sigmas=self.sigmas.detach().float().cpu(), trajectory=ref_traj,
                                             mask=mask.clone(), t_start=0, t_end=0, inner_steps=self.J, lr=GUIDE_LR)
        assert self.guided.start_index == 0 and self.guided.end_index == self.n - 1
        return self

    def _tune_side(self, objective, cond, pooled, null_tail, t, label):
        """learn_subject's phase(): one train_step of masked_eps_loss on fresh rows and their own AdamW."""
        M, s = self.M, self.session
        hifi, tuning = M["hifi_tuner"], M["tuning"]
        rows = s.adopt(M["textual"].ConditioningRows(null_tail))
        rows.anchor = rows.anchor.to(s.device)
        opt = tuning.make_optimizer([rows.rows], self.tune_cfg, s.device)
        pbar = M["host"].progress_bar(self.tune_cfg.steps)
        cfg, state = self.tune_cfg, {"i": 0}

        def step_fn(_i):
            return hifi.masked_eps_loss(objective, rows, cond, pooled, cfg.batch_size, t, True, REG_WEIGHT)

        def step():
            value, _d = tuning.train_step(f"{hifi.NODE} ({label})", state["i"], step_fn, opt, cfg, s.device)
            state["i"] += 1
            pbar.update_absolute(state["i"], cfg.steps)
            return value
        return step

    def __exit__(self, *exc):
        return self.session.__exit__(*exc)

    # -- sides -----------------------------------------------------------------------------------------------------
    def sample(self, sampler, side: str, sigmas=None):
        """comfy.sample.sample_custom (what SamplerCustom runs), under inference mode like the executor."""
        import comfy.sample
        import torch
        self.counter.start(side)
        with torch.inference_mode():
            return comfy.sample.sample_custom(self.model_c, self.noise, self.cfg, sampler,
                                              self.sigmas if sigmas is None else sigmas, self.pos, self.neg,
                                              self.latent_image, disable_pbar=True, seed=1)

    def sides(self) -> tuple[dict, dict, dict]:
        """{name: callable}, {name: units per call} ("cfg" first: the denominator) and {name: warm-up callable}.
        Null-text and the guided sampler warm up with one inner step per step (same code path, including the
        first-call costs, a fraction of the time)."""
        import dataclasses
        import torch
        M, n, J = self.M, self.n, self.J
        inv, rg = M["inversion"], M["reference_guidance"]
        guided_sampler = rg.reference_guided_sampler(self.guided)
        unguided_sampler = rg.reference_guided_sampler(self.unguided)

        # components on the stock MODEL, as UncondCapture's branch runs them
        base = self.model_s.model
        to = dict(self.model_s.model_options.get("transformer_options", {}))
        g = torch.Generator().manual_seed(7)
        with torch.inference_mode(False):
            x_s = (self.noise * float(self.sigmas[1])).clone()
            sig_s = torch.full((1,), float(self.sigmas[1]))
            ctx_s = self.neg[0][0].detach().clone().float()
            w_s = torch.randn(x_s.shape, generator=g)

        def stock_call(ctx):
            return base.apply_model(x_s, sig_s, c_crossattn=ctx, transformer_options=dict(to, cond_or_uncond=[1]))

        def stock_fwd():
            with torch.no_grad():
                stock_call(ctx_s)

        def stock_fwd_bwd():
            phi = ctx_s.clone().requires_grad_(True)
            (stock_call(phi) * w_s).sum().backward()

        # components through the session's ModelPrediction (fused SDPA)
        den = self.denoiser
        x_t = (self.x0_t + float(self.sigmas[1]) * self.noise.to(self.x0_t.device)).detach()
        sig_t = torch.full((1,), float(self.sigmas[1]), device=x_t.device)
        w_t = w_s.to(x_t.device)

        def sess_fwd():
            with torch.no_grad():
                den(x_t, sig_t, self.null_t, uncond=True)

        def sess_fwd_bwd():
            phi = self.null_t.clone().requires_grad_(True)
            (den(x_t, sig_t, phi, uncond=True) * w_t).sum().backward()

        def rep(fn, k):
            def run():
                for _ in range(k):
                    fn()
            return run

        k = self.reps
        sides = {
            "cfg": (lambda: self.sample(self.euler, "cfg"), n),
            "uncond fwd (stock MODEL)": (rep(stock_fwd, k), k),
            "uncond fwd+bwd wrt ctx (stock MODEL)": (rep(stock_fwd_bwd, k), k),
            "uncond fwd (session)": (rep(sess_fwd, k), k),
            "uncond fwd+bwd wrt ctx (session)": (rep(sess_fwd_bwd, k), k),
            "Subject Tune: global step": (rep(self.tune["global"], k), k),
            "Subject Tune: step-wise step": (rep(self.tune["step-wise"], k), k),
            "Invert: DDIM inversion step": (lambda: inv.ddim_invert(den, self.x0_t, self.cond_t, self.sig), n),
            f"Invert: null-text step (J={J})": (
                lambda: inv.null_text_optimise(den, self.traj_t, self.cond_t, self.null_t, self.sig, self.cfg,
                                               inner_steps=J, lr=NULL_TEXT_LR, early_stop=0.0), n),
            f"Ref-guided: guided step (J={J})": (lambda: self.sample(guided_sampler, "guided"), n),
            "Ref-guided: unguided step": (lambda: self.sample(unguided_sampler, "unguided"), n),
        }
        # the guided sampler first: its first call makes the stock weights normal tensors (host.uninference), which
        # the stock fwd+bwd component needs as well
        warm_guided = rg.reference_guided_sampler(dataclasses.replace(self.guided, inner_steps=1))
        warm = {"guided": lambda: self.sample(warm_guided, "warm-up guided (J=1)")}
        warm.update({k: v[0] for k, v in sides.items() if not k.startswith(("Ref-guided: guided", "Invert: null"))})
        warm["null-text"] = lambda: inv.null_text_optimise(den, self.traj_t, self.cond_t, self.null_t, self.sig,
                                                           self.cfg, inner_steps=1, lr=NULL_TEXT_LR, early_stop=0.0)
        return {k: v[0] for k, v in sides.items()}, {k: v[1] for k, v in sides.items()}, warm

    def sample_custom_overhead(self) -> tuple[float, float] | None:
        """(seconds of fixed cost per euler sample_custom call, seconds per step), from 1-step and N-step runs (best
        of 2): the fixed cost the denominator carries, spread over N steps. None for N = 1."""
        if self.n < 2:
            return None
        t1, tn = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            self.sample(self.euler, "overhead", self.sigmas[-2:])
            t1.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.sample(self.euler, "overhead")
            tn.append(time.perf_counter() - t0)
        a, b = min(t1), min(tn)
        per = (b - a) / (self.n - 1)
        return a - per, per

    def session_still_loaded(self) -> bool:
        import comfy.model_management as mm
        return any(lm.model is self.session.model for lm in mm.current_loaded_models)


# ---------------------------------------------------------------------------------------------------------------


def run_size(M, stock, session_models, size, steps, inner, cfg, reps, rounds, log) -> tuple[list[Row], dict]:
    with Bench(M, stock, session_models, size, steps, inner, cfg, reps) as b:
        over = b.sample_custom_overhead()
        if over is not None:
            log(f"  [{size}x{size}] sample_custom euler: fixed cost {over[0] * 1e3:.1f} ms per call, "
                f"{over[1] * 1e3:.1f} ms per step (the denominator spreads the fixed cost over {steps} steps)")
        fns, units, warm = b.sides()
        for fn in warm.values():  # warm-up (first calls: optimizer state, lazy patches, uninference)
            fn()
        t0 = time.perf_counter()
        timing = measure.interleaved(fns, rounds)
        log(f"  [{size}x{size}] timed {rounds} round(s) in {time.perf_counter() - t0:.1f} s")
        if not b.session_still_loaded():
            log("  WARNING: the training session's MODEL was unloaded during timing; its rows are not representative")
        counts = {k: b.counter.per_step(k, steps) for k in ("cfg", "guided", "unguided")}
        log(f"  [{size}x{size}] UNet calls per step (cond, uncond): " +
            ", ".join(f"{k} {c:g}/{u:g}" for k, (c, u) in counts.items()))
        guided_losses = list(b.guided.losses)

    n_cfg = units["cfg"]
    cfg_times = timing.times["cfg"]
    t_cfg = timing.median("cfg") / n_cfg
    per_unit = {k: timing.median(k) / units[k] for k in fns}
    ratios = {k: [(timing.times[k][i] / units[k]) / (cfg_times[i] / n_cfg) for i in range(rounds)] for k in fns}

    f_s, fb_s = per_unit["uncond fwd (stock MODEL)"], per_unit["uncond fwd+bwd wrt ctx (stock MODEL)"]
    f_t, fb_t = per_unit["uncond fwd (session)"], per_unit["uncond fwd+bwd wrt ctx (session)"]
    r_s, r_t = (fb_s - f_s) / f_s, (fb_t - f_t) / f_t
    J = inner
    expect = {   # name: (analytic in CFG steps with 1 CFG step = 2 batch-1 forwards, from measured parts)
        "cfg": (1.0, 1.0),
        "uncond fwd (stock MODEL)": (0.5, None),
        "uncond fwd+bwd wrt ctx (stock MODEL)": ((1 + r_s) / 2, None),
        "uncond fwd (session)": (0.5, None),
        "uncond fwd+bwd wrt ctx (session)": ((1 + r_t) / 2, None),
        "Subject Tune: global step": ((1 + r_t) / 2, fb_t / t_cfg),
        "Subject Tune: step-wise step": ((1 + r_t) / 2, fb_t / t_cfg),
        "Invert: DDIM inversion step": (0.5, f_t / t_cfg),
        f"Invert: null-text step (J={J})": (1 + J * (1 + r_t) / 2, (2 * f_t + J * fb_t) / t_cfg),
        f"Ref-guided: guided step (J={J})": (1 + (J + 1) / 2 + J * r_s / 2, (t_cfg + f_s + J * fb_s) / t_cfg),
        "Ref-guided: unguided step": (1.0, 1.0),
    }
    evals = {"cfg": counts["cfg"], f"Ref-guided: guided step (J={J})": counts["guided"],
             "Ref-guided: unguided step": counts["unguided"]}
    rows = []
    for k in fns:
        q1, med, q3 = measure.quantiles(ratios[k])
        ea, ep = expect[k]
        c, u = evals.get(k, (None, None))
        rows.append(Row(k, size, rounds, "step" if k != "cfg" else "CFG step", med, q1, q3, per_unit[k] * 1e3, ea, ep,
                        c, u, component=k.startswith("uncond")))
    info = {"latent": size, "steps": steps, "r_stock": r_s, "r_session": r_t,
            "fixed_ms": over[0] * 1e3 if over else None, "euler_step_ms": over[1] * 1e3 if over else None,
            "guided_last_losses": guided_losses}
    log(f"  [{size}x{size}] backward/forward time r: stock MODEL {r_s:.2f}, session {r_t:.2f}")
    return rows, info


def table(rows: list[Row]) -> str:
    head = ("workload", "latent", "ratio to CFG step [IQR]", "ms/step", "expected (analytic / parts)",
            "cond evals/step", "uncond evals/step")
    out = [head]
    for r in rows:
        exp = "" if r.expected is None else f"{r.expected:.2f}"
        if r.expected_parts is not None and r.workload != "cfg":
            exp += f" / {r.expected_parts:.2f}"
        out.append((("  " if r.component else "") + r.workload, f"{r.latent}x{r.latent}",
                    f"{r.ratio_median:.2f} [{r.ratio_q1:.2f}-{r.ratio_q3:.2f}]", f"{r.ms_per_unit:.1f}", exp,
                    "" if r.cond_evals is None else f"{r.cond_evals:g}",
                    "" if r.uncond_evals is None else f"{r.uncond_evals:g}"))
    widths = [max(len(str(row[i])) for row in out) for i in range(len(head))]
    lines = []
    for j, row in enumerate(out):
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default=os.environ.get("COMFYUI_PATH") or None,
                    help="ComfyUI tree (default: $COMFYUI_PATH or the repository's default host)")
    ap.add_argument("--latents", default="8,32", help="latent sizes (8 = 64x64 px, 32 = 256x256 px)")
    ap.add_argument("--rounds", default="5,3",
                    help="timed rounds per latent size (one value or one per size); a round times every workload "
                         "and the CFG denominator once, in alternating order")
    ap.add_argument("--steps", default="auto",
                    help="sampling steps N of the schedule per latent size (one value or one per size; auto: 2 below "
                         "32x32, else 1): the sampler and inversion runs do N steps per timed call (a 32x32 guided "
                         "step takes ~16 s at 1 thread)")
    ap.add_argument("--reps", type=int, default=1,
                    help="steps per timed call of the tuning and component sides (default 1)")
    ap.add_argument("--inner-steps", type=int, default=10, help="J: null-text / guidance inner steps per step")
    ap.add_argument("--cfg", type=float, default=7.5, help="guidance scale (must not be 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: stable on a shared 2-core machine, see README)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8x8 only, 1 round, 1 step")
    ap.add_argument("--json", default=None, help="also write the results here")
    # accepted for `run_all.py` argument compatibility with bench_training.py; unused here
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        print(f"bench_hifi: ignoring arguments meant for other benchmarks: {' '.join(unknown)}", flush=True)
    if args.quick:
        args.latents, args.rounds, args.steps = "8", "1", "1"
    if args.cfg == 1.0:
        raise SystemExit("--cfg must not be 1 (the host skips the negative branch at cfg 1)")

    return run_scratch("personalize-bench-hifi-", lambda work, t_start, log: _run(args, work, t_start, log))


def _run(args, work: Path, t_start: float, log) -> int:
    h, ckpt = boot_quiet(args.host, work, args.threads)
    import torch
    M = pack_modules(h)
    stock = tuple(call_node("CheckpointLoaderSimple", ckpt_name=ckpt.name)[:2])
    session_models = tuple(call_node("CheckpointLoaderSimple", ckpt_name=ckpt.name)[:2])
    log(f"host {h.path} ({h.version}); torch {torch.__version__}, {args.threads} thread(s); checkpoint {ckpt.name}; "
        f"UNet {sum(p.numel() for p in stock[0].model.diffusion_model.parameters()) / 1e6:.1f} M params; "
        f"J = {args.inner_steps}, cfg {args.cfg}")

    sizes = [int(s) for s in args.latents.split(",") if s]
    rounds = measure.per_item(args.rounds, len(sizes), "latent size")
    if args.steps == "auto":
        steps = [2 if s < 32 else 1 for s in sizes]
    else:
        steps = measure.per_item(args.steps, len(sizes), "latent size")
    rows, infos = [], []
    for size, n_rounds, n_steps in zip(sizes, rounds, steps):
        log(f"{size}x{size} latent ({size * 8}x{size * 8} px), N = {n_steps} step(s), {n_rounds} round(s)")
        r, info = run_size(M, stock, session_models, size, n_steps, args.inner_steps, args.cfg, args.reps,
                           n_rounds, log)
        rows += r
        infos.append(info)

    print()
    print(f"HiFi Tuner benchmark: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} intra-op thread(s), fp32, batch 1, host {h.path} ({h.version})")
    print(f"ratio: (time per step) / (time per step of stock euler via sample_custom over the same N steps, cfg "
          f"{args.cfg}); median of per-round ratios over interleaved rounds [25th-75th pct]; ms/step: median.")
    print("expected: analytic CFG-step count with 1 CFG step = 2 batch-1 forwards and r = backward/forward of the "
          "indented component rows / the same sum from their measured times (guided: 1 CFG + (J+1) fwd + J bwd).")
    print(table(rows))
    for info in infos:
        fixed = "" if info["fixed_ms"] is None else \
            f"; sample_custom fixed cost {info['fixed_ms']:.1f} ms/call, euler {info['euler_step_ms']:.1f} ms/step"
        print(f"  {info['latent']}x{info['latent']}: N = {info['steps']} steps; backward/forward r stock MODEL "
              f"{info['r_stock']:.2f}, session {info['r_session']:.2f}{fixed}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [asdict(r) for r in rows], "info": infos}, indent=1))
    bad = [r for r in rows if r.workload.startswith("Ref-guided: guided") and r.cond_evals != 1]
    if bad:
        print(f"FAIL: a guided step evaluated the conditional branch {bad[0].cond_evals:g} times per step (must be 1)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

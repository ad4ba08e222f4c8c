"""ProFusion benchmark: one Fusion Sampler step (PromptNet included) as a ratio to one plain CFG sampling step.

The denominator ("cfg") is one step of the host's stock ``ddim`` sampler run through ``comfy.sample.sample_custom``
(what SamplerCustom runs) for ``--steps`` steps at cfg 7.5, divided by the number of steps: one call of the host's
CFG denoiser per step, i.e. the cond and uncond UNet evaluations in one batched call. The numerator is one step of
the pack's Fusion Sampler (methods/profusion.py: ``fusion_sampler`` with :class:`PromptNetConditions`, what the node
Fusion Sampler hands to SamplerCustom) through the same ``sample_custom`` on the same MODEL, SIGMAS, noise and latent,
for m = 0, 1, 2 fusion iterations (one reference). Per step it runs

* m fusion iterations: PromptNet (S* for the current x_t, t), the prompt with S* through the text encoder, one
  batched call of 2 UNet evaluations (∅ and the γ-scaled prompt);
* the refinement: PromptNet again, the text encoder again, one batched call of 3 UNet evaluations (∅, the prompt
  with S*, the class-word prompt),

so ``2m + 3`` UNet evaluations and ``m + 1`` PromptNet passes and text encodes per step. Expected cost in CFG steps:
**analytic** ``(2m + 3)/2`` (UNet evaluations alone, a CFG step = 2) and **parts** ``(2m + 3)/2 + (m + 1)·(t_PN +
t_text)/t_cfg`` from the measured component rows (one PromptNet pass, one encode of the prompt with S*, both at
batch 1). UNet evaluations per step are counted with a ``model_function_wrapper`` (batch entries per call) on the
MODEL clone every side samples with: the run fails (exit 1) unless they are 2 for cfg and 2m + 3 for Fusion Sampling.
FLOPs (``torch.utils.flop_counter``, noise-free) of every side and component are reported beside the times.

Regimes (``--regimes``):

* ``mini``: the shipped mini-world model (models/mini_world.safetensors, 8x8 latents = 64 px) with a PromptNet built
  by ``PromptNet.from_model`` on it and the shipped mini CLIP vision (width 128; the reference is one image of the
  test subject encoded by ``encode_reference``): the shape of the shipped ``mini_world_promptnet``.
* ``sd2``: the tiny random SD2.x (v-prediction) fixture (harness/fixtures.py: 320 channels, 4 levels x 2 res blocks,
  the full 24-layer OpenCLIP ViT-H text tower) - the architecture family of the official ProFusion release - with a
  PromptNet from it for CLIP ViT-H/14 vision tokens (257 x 1280, random: PromptNet's cost does not depend on their
  values) at each ``--latents`` size; PromptNet's ``region_kernel`` is set so that its latent size equals the
  sampled one (the official PromptNet reads 64x64 latents when SD2 samples 512 px: it runs at the UNet's own
  resolution). The fixture's UNet is narrow (320 channels on every level, transformers on two levels) while its
  text tower is full size, so the text encode weighs more here than with the real SD2 UNet (at 8x8 it dwarfs the
  UNet: ``--latents 8`` shows it); the parts column shows by how much.
* **SD 2.x at 512 px, by FLOPs** (printed after the sd2 regime): one evaluation of the real SD 2.x UNet at 64x64
  latents and one pass of the official-shape PromptNet, counted on the meta device (no weights, no time), with the
  text encode's FLOPs measured on the fixture's full-size text tower: ``((2m+3)·UNet + (m+1)·(PromptNet + text)) /
  (2·UNet)``, the analytic ratio at the scale the official PromptNet runs.

Timing: ``measure.interleaved`` (every side once per round, order alternating, GC off) after one warm-up round; per
round the ratio (side time per step) / (cfg time per step); reported: median [25th-75th percentile] of the per-round
ratios and the median ms per step. One intra-op thread by default (see bench/README.md, "Threads").

Defaults: mini with N = 2 steps and 5 rounds, sd2 at 32x32 with N = 1 and 3 rounds (``--rounds 5,3 --steps 2,1``),
about 4 minutes on 2 vCPUs at 1 thread. The exit status is 1 only if a side evaluated the UNet other than 2 (cfg) or
2m + 3 (Fusion Sampler) times per step; the m = 1 target (≤ 2.5 CFG steps, issue #20) is reported, not gated.

Run: ``python bench/bench_profusion.py`` from the repository root (``make bench`` does, via bench/run_all.py);
``--quick`` for a smoke run (mini only, 1 round, 1 step).
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

PROMPT = "a photo of holder on the beach"
CLASS_WORD = "dog"
CFG = 7.5
FUSION_MS = (0, 1, 2)
TARGET_M1 = 2.5            # issue #20: a Fusion Sampler step with m = 1 at most 2.5 CFG steps
VIT_H_TOKENS, VIT_H_WIDTH = 257, 1280  # CLIP ViT-H/14 last_hidden_state at 224 px (the official PromptNet's input)


@dataclass
class Row:
    regime: str
    workload: str
    latent: int
    rounds: int
    ratio_median: float
    ratio_q1: float
    ratio_q3: float
    ms_per_step: float
    gflops: float
    flops_ratio: float
    expected: float | None = None        # analytic: UNet evaluations / 2
    expected_parts: float | None = None  # + PromptNet passes and text encodes, from the measured components
    unet_evals: float | None = None      # UNet evaluations (batch entries) per step, counted
    component: bool = False


def pack_modules(h):
    import importlib
    p = h.pack_module_name
    names = ("core.mini_family", "core.host", "methods.profusion", "networks.promptnet", "networks.mini_clip")
    return {n.split(".")[-1]: importlib.import_module(f"{p}.{n}") for n in names}


def call_node(class_type: str, **inputs):
    """A node's FUNCTION as ComfyUI's executor runs it (inside inference mode)."""
    import nodes
    import torch
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


class EvalCounter:
    """A ``model_function_wrapper`` counting UNet evaluations (batch entries of ``cond_or_uncond``) per sampling
    run: ``side`` names the run in progress."""

    def __init__(self):
        self.side = None
        self.evals, self.runs = {}, {}

    def start(self, side):
        self.side = side
        self.runs[side] = self.runs.get(side, 0) + 1

    def __call__(self, apply_model, args):
        self.evals[self.side] = self.evals.get(self.side, 0) + len(args["cond_or_uncond"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    def per_step(self, side, steps: int) -> float:
        return self.evals.get(side, 0) / (self.runs.get(side, 0) * steps)


class Regime:
    """One model at one latent size: the stock ddim side, the Fusion Sampler sides (m = 0, 1, 2) and the components
    (one PromptNet pass, one text encode of the prompt with S*, one batch-1 UNet forward)."""

    def __init__(self, M, name: str, model, clip, promptnet, reference, size: int, steps: int):
        import torch
        self.M, self.name, self.size, self.n = M, name, size, steps
        self.model, self.clip, self.net, self.ref = model, clip, promptnet, reference
        g = torch.Generator().manual_seed(1000 + size)
        self.noise = torch.randn(1, 4, size, size, generator=g)
        self.latent_image = torch.zeros(1, 4, size, size)
        self.pos = call_node("CLIPTextEncode", clip=clip, text=PROMPT.replace("holder", CLASS_WORD))[0]
        self.neg = call_node("CLIPTextEncode", clip=clip, text="")[0]
        self.sigmas = call_node("BasicScheduler", model=model, scheduler="ddim_uniform", steps=steps, denoise=1.0)[0]
        import comfy.samplers
        self.ddim = comfy.samplers.sampler_object("ddim")
        self.counter = EvalCounter()
        self.model_c = model.clone()
        self.model_c.set_model_unet_function_wrapper(self.counter)
        pf = M["profusion"]
        with torch.inference_mode():
            self.conditions = pf.PromptNetConditions(promptnet, [reference], clip, PROMPT, CLASS_WORD, None,
                                                     base_model=model.model)
            self.samplers = {m: pf.fusion_sampler(self.conditions, pf.FusionSettings(m=m)) for m in FUSION_MS}
        # component inputs: a VP x_t at the schedule's second σ, its timestep, S* for it
        s = float(self.sigmas[1])
        self.x_t = (self.noise * s / (1 + s * s) ** 0.5).clone()
        self.t = model.model.model_sampling.timestep(torch.tensor([s])).float()
        self.sig1 = torch.tensor([s])
        with torch.inference_mode():
            self.words = pf.promptnet_words(promptnet, reference, model.model, self.x_t, self.t)
        self.ctx = self.neg[0][0]

    def sample(self, sampler, side: str):
        import comfy.sample
        import torch
        self.counter.start(side)
        with torch.inference_mode():
            return comfy.sample.sample_custom(self.model_c, self.noise, CFG, sampler, self.sigmas, self.pos, self.neg,
                                              self.latent_image, disable_pbar=True, seed=1)

    def sides(self) -> tuple[dict, dict]:
        """{name: callable} ("cfg" first: the denominator) and {name: steps per call}."""
        import torch
        pf, net, base = self.M["profusion"], self.net, self.model.model

        def promptnet_pass():
            with torch.inference_mode():
                pf.promptnet_words(net, self.ref, base, self.x_t, self.t)

        def text_encode():
            with torch.inference_mode():
                self.conditions.template.encode(self.words)

        def unet_fwd():
            with torch.inference_mode():
                base.apply_model(self.noise, self.sig1, c_crossattn=self.ctx,
                                 transformer_options={"cond_or_uncond": [1]})

        sides = {"cfg": (lambda: self.sample(self.ddim, "cfg"), self.n)}
        for m in FUSION_MS:
            sides[f"Fusion Sampler m={m}"] = ((lambda m=m: self.sample(self.samplers[m], f"fusion m={m}")), self.n)
        sides["PromptNet pass"] = (promptnet_pass, 1)
        sides["text encode with S*"] = (text_encode, 1)
        sides["UNet forward, batch 1"] = (unet_fwd, 1)
        return {k: v[0] for k, v in sides.items()}, {k: v[1] for k, v in sides.items()}


def run_regime(reg: Regime, rounds: int, log) -> list[Row]:
    fns, units = reg.sides()
    for fn in fns.values():  # warm-up (first calls: lazy patches, allocator)
        fn()
    flops = {k: measure.count_flops_and_ops(fn)[0] / units[k] for k, fn in fns.items()}
    t0 = time.perf_counter()
    timing = measure.interleaved(fns, rounds)
    log(f"  [{reg.name} {reg.size}x{reg.size}] timed {rounds} round(s) in {time.perf_counter() - t0:.1f} s")
    n = units["cfg"]
    per_step = {k: timing.median(k) / units[k] for k in fns}
    ratios = {k: [(timing.times[k][i] / units[k]) / (timing.times["cfg"][i] / n) for i in range(rounds)]
              for k in fns}
    t_cfg = per_step["cfg"]
    extra = (per_step["PromptNet pass"] + per_step["text encode with S*"]) / t_cfg
    rows = []
    for k in fns:
        q1, med, q3 = measure.quantiles(ratios[k])
        exp = parts = evals = None
        if k == "cfg":
            exp, parts, evals = 1.0, 1.0, reg.counter.per_step("cfg", reg.n)
        elif k.startswith("Fusion"):
            m = int(k.rsplit("=", 1)[1])
            exp = (2 * m + 3) / 2
            parts = exp + (m + 1) * extra
            evals = reg.counter.per_step(f"fusion m={m}", reg.n)
        elif k == "UNet forward, batch 1":
            exp = 0.5
        rows.append(Row(reg.name, k, reg.size, rounds, med, q1, q3, per_step[k] * 1e3, flops[k] / 1e9,
                        flops[k] / flops["cfg"], exp, parts, evals,
                        component=not (k == "cfg" or k.startswith("Fusion"))))
    return rows


def table(rows: list[Row]) -> str:
    head = ("regime", "workload", "latent", "ratio to CFG step [IQR]", "ms/step", "expected (analytic / parts)",
            "GFLOP/step", "FLOPs ratio", "UNet evals/step")
    out = [head]
    for r in rows:
        exp = "" if r.expected is None else f"{r.expected:.2f}"
        if r.expected_parts is not None and r.workload != "cfg":
            exp += f" / {r.expected_parts:.2f}"
        out.append((r.regime, ("  " if r.component else "") + r.workload, f"{r.latent}x{r.latent}",
                    f"{r.ratio_median:.2f} [{r.ratio_q1:.2f}-{r.ratio_q3:.2f}]", f"{r.ms_per_step:.1f}", exp,
                    f"{r.gflops:.3f}", f"{r.flops_ratio:.2f}", "" if r.unet_evals is None else f"{r.unet_evals:g}"))
    widths = [max(len(str(row[i])) for row in out) for i in range(len(head))]
    lines = []
    for j, row in enumerate(out):
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(rows: list[Row]) -> list[str]:
    """The m = 1 target (≤ 2.5 CFG steps) per regime, said plainly, with where the time goes."""
    out = []
    for r in rows:
        if r.workload != "Fusion Sampler m=1":
            continue
        comp = {x.workload.strip(): x for x in rows if x.regime == r.regime and x.latent == r.latent}
        pn, te = comp["PromptNet pass"], comp["text encode with S*"]
        met = "met" if r.ratio_median <= TARGET_M1 else "NOT met"
        out.append(f"{r.regime} {r.latent}x{r.latent}: m = 1 step = {r.ratio_median:.2f} CFG steps (target <= "
                   f"{TARGET_M1}: {met}); the 5 UNet evaluations alone are 2.50, the 2 PromptNet passes add "
                   f"{2 * pn.ratio_median:.2f} (one pass = {pn.ratio_median:.2f} CFG steps of time, "
                   f"{pn.flops_ratio:.2f} "
                   f"of FLOPs: PromptNet is the UNet's encoder half) and the 2 text encodes {2 * te.ratio_median:.2f}")
    return out


#: SD 2.x's UNet (stabilityai/stable-diffusion-2-1: ComfyUI's detected config), for the FLOP count at 512 px
SD2_UNET = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
                num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                context_dim=1024, use_linear_in_transformer=True, num_head_channels=64, use_spatial_transformer=True,
                legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False)


def flops_at_512(M, text_flops: float) -> dict:
    """FLOPs of the parts at the official scale, counted on the meta device (no weights, no time): one SD 2.x UNet
    evaluation at 64x64 latents (512 px, batch 1, 77 context tokens) and one pass of the official-shape PromptNet
    (``PromptNet.from_model``'s defaults for 4 levels: downsize 8, region kernel 8; 257 x 1280 CLIP ViT-H/14 tokens);
    the text encode is the sd2 fixture's measured one (the fixture holds the full 24-layer OpenCLIP ViT-H text
    tower). Attention is counted through F.scaled_dot_product_attention (the host's CPU default, sub-quadratic
    attention, asks the allocator for free memory, which the meta device has none of)."""
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    pn = M["promptnet"]
    saved = attention.optimized_attention, pn.build_encoder
    attention.optimized_attention = attention.attention_pytorch
    original_build = pn.build_encoder
    pn.build_encoder = lambda config, device=None: original_build(config, "meta")
    try:
        with torch.device("meta"):
            unet = UNetModel(**SD2_UNET, device="meta", operations=comfy.ops.disable_weight_init)
            x = torch.empty(1, 4, 64, 64)
            unet_flops = measure.count_flops_and_ops(
                lambda: unet(x, torch.empty(1), context=torch.empty(1, 77, 1024)))[0]
            net = pn.PromptNet(family="sd2", unet=pn.encoder_config(SD2_UNET), vision_width=VIT_H_WIDTH,
                               text_width=1024)
            pn_flops = measure.count_flops_and_ops(
                lambda: net(x, torch.empty(1), torch.empty(1, VIT_H_TOKENS, VIT_H_WIDTH), x))[0]
    finally:
        attention.optimized_attention, pn.build_encoder = saved
    cfg_step = 2 * unet_flops
    out = {"unet_gflop": unet_flops / 1e9, "promptnet_gflop": pn_flops / 1e9, "text_gflop": text_flops / 1e9,
           "promptnet_params_m": sum(p.numel() for p in net.parameters()) / 1e6,
           "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6}
    for m in FUSION_MS:
        out[f"m={m}"] = ((2 * m + 3) * unet_flops + (m + 1) * (pn_flops + text_flops)) / cfg_step
    return out


def scale_table(s: dict) -> str:
    lines = [f"SD 2.x at 512 px (64x64 latents), by FLOPs (meta device): UNet evaluation {s['unet_gflop']:.0f} GFLOP "
             f"({s['unet_params_m']:.0f} M params), PromptNet pass {s['promptnet_gflop']:.0f} GFLOP "
             f"({s['promptnet_params_m']:.0f} M params; {s['promptnet_gflop'] / s['unet_gflop']:.2f} of a UNet "
             f"evaluation), text encode {s['text_gflop']:.0f} GFLOP; a CFG step = 2 UNet evaluations"]
    for m in FUSION_MS:
        lines.append(f"  Fusion Sampler m={m}: {s[f'm={m}']:.2f} CFG steps of FLOPs ((2m+3) = {2 * m + 3} UNet "
                     f"evaluations + {m + 1} PromptNet passes and text encodes; UNet alone {(2 * m + 3) / 2:.2f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default=os.environ.get("COMFYUI_PATH") or None,
                    help="ComfyUI tree (default: $COMFYUI_PATH or the repository's default host)")
    ap.add_argument("--regimes", default="mini,sd2", help="mini (shipped mini model, 8x8), sd2 (tiny SD2 fixture)")
    ap.add_argument("--latents", default="32", help="latent sizes of the sd2 regime (32 = 256 px; at 8 = 64 px the "
                                                    "fixture's full-size text tower dwarfs its narrow UNet)")
    ap.add_argument("--rounds", default="5,3", help="timed rounds per regime (mini, then each sd2 size; one value or "
                                                    "one per regime): every side once per round")
    ap.add_argument("--steps", default="2,1", help="sampling steps N per timed sampling call, per regime like "
                                                   "--rounds")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: stable on a shared 2-core machine, see README)")
    ap.add_argument("--quick", action="store_true", help="smoke run: mini only, 1 round, 1 step")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)  # run_all.py compatibility
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        print(f"bench_profusion: ignoring arguments meant for other benchmarks: {' '.join(unknown)}", flush=True)
    if args.quick:
        args.regimes, args.rounds, args.steps = "mini", "1", "1"
    return run_scratch("personalize-bench-profusion-", lambda work, t_start, log: _run(args, work, t_start, log))


def _run(args, work: Path, t_start: float, log) -> int:
    h, _ = boot_quiet(args.host, work, args.threads)
    import torch
    M = pack_modules(h)
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    sizes = [int(s) for s in args.latents.split(",") if s] if "sd2" in regimes else []
    n_regimes = int("mini" in regimes) + len(sizes)
    rounds = measure.per_item(args.rounds, n_regimes, "regime")
    steps = measure.per_item(args.steps, n_regimes, "regime")
    log(f"host {h.path} ({h.version}); torch {torch.__version__}, {args.threads} thread(s); N = {steps} "
        f"step(s), {rounds} round(s); regimes {', '.join(regimes)}")
    rows = []
    PromptNet = M["promptnet"].PromptNet
    if "mini" in regimes:
        from harness.subjects import subject_images
        mf, mc, pf = M["mini_family"], M["mini_clip"], M["profusion"]
        with torch.inference_mode():
            model, clip, vae = mf.load_checkpoint(mf.shipped_checkpoint())
            tower = mc.load_clip_vision(mc.PACK_MODELS / "clip_vision" / mc.SHIPPED_NAME)
            width = int(tower.encode_image(torch.zeros(1, 64, 64, 3))["last_hidden_state"].shape[-1])
            net = PromptNet.from_model(model, family=M["host"].model_family(model), vision_width=width, seed=1)
            ref = pf.encode_reference(subject_images(1, 64)[0][:1], net, vae, tower)
        size = net.latent_size
        unet_m = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
        log(f"mini: {M['host'].model_family(model)} UNet {unet_m:.1f} M "
            f"params, PromptNet {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M ({net.describe()})")
        rows += run_regime(Regime(M, "mini", model, clip, net, ref, size, steps.pop(0)), rounds.pop(0), log)
    if "sd2" in regimes:
        from harness import fixtures
        ckpt = fixtures.ensure_checkpoint("sd2", REPO / ".cache" / "fixtures")
        link = work / "models" / "checkpoints" / ckpt.name
        if not link.exists():
            link.symlink_to(ckpt)
        h.refresh_model_lists()
        model, clip = call_node("CheckpointLoaderSimple", ckpt_name=ckpt.name)[:2]
        pf = M["profusion"]
        for size in sizes:
            with torch.inference_mode():
                # downsize 8 (official, 4 levels); region_kernel so that PromptNet reads latents of the sampled size
                net = PromptNet.from_model(model, family=M["host"].model_family(model), vision_width=VIT_H_WIDTH,
                                           downsize=8, region_kernel=max(1, size // 8), seed=1)
                g = torch.Generator().manual_seed(size)
                ref = pf.Reference(torch.randn(1, 4, size, size, generator=g),
                                   torch.randn(1, VIT_H_TOKENS, VIT_H_WIDTH, generator=g), net.latent_size, VIT_H_WIDTH)
            log(f"sd2 {size}x{size}: UNet {sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6:.1f} "
                f"M params, PromptNet {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M ({net.describe()})")
            rows += run_regime(Regime(M, "sd2", model, clip, net, ref, size, steps.pop(0)), rounds.pop(0), log)
        text = next(r for r in rows if r.regime == "sd2" and r.workload == "text encode with S*")
        scale = flops_at_512(M, text.gflops * 1e9)

    print()
    print(f"ProFusion benchmark: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} intra-op thread(s), fp32, batch 1, host {h.path} ({h.version})")
    print(f"ratio: (time per step) / (time per step of stock ddim via sample_custom over the same N steps (mini "
          f"{args.steps.split(',')[0]}), cfg {CFG}); median of per-round ratios over interleaved rounds [25th-75th "
          "pct]; ms/step: median.")
    print("expected: analytic (2m+3)/2 (UNet evaluations; a CFG step = 2) / parts: + (m+1) x (PromptNet pass + text "
          "encode) / CFG step, from the indented component rows. FLOPs ratio: FLOPs per step / a CFG step's.")
    print(table(rows))
    for line in verdict(rows):
        print(line)
    if "sd2" in regimes:
        print()
        print(scale_table(scale))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [asdict(r) for r in rows],
                                               "sd2_512_flops": scale if "sd2" in regimes else None}, indent=1))
    bad = [r for r in rows if r.unet_evals is not None and r.unet_evals != (
        2 if r.workload == "cfg" else 2 * int(r.workload.rsplit("=", 1)[1]) + 3)]
    if bad:
        print(f"FAIL: {bad[0].regime} {bad[0].workload} evaluated the UNet {bad[0].unet_evals:g} times per step")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

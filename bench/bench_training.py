"""Training-step benchmark: the pack's Textual Inversion and LoRA steps vs diffusers' example-script steps.

Ours: the exact per-step code path of the pack's nodes - :class:`TrainingSession` clones of the MODEL/CLIP loaded by
the host's ``CheckpointLoaderSimple``, :class:`PlaceholderEmbeddings` (TI, text encoder re-run every step) or
:class:`LowRankDeltas` (LoRA by bypass forward patches, cached prompt embedding), :class:`DiffusionObjective`
(ε-loss through ``BaseModel.apply_model``) and ``core.tuning.train_step`` (the body of ``run_loop``: interrupt check,
loss, NaN check, backward, AdamW) plus the progress-bar update.

Reference: :mod:`reference` - diffusers ``UNet2DConditionModel`` + transformers ``CLIPTextModel`` built with the
fixture's shapes and loaded with the fixture's weights, trained as in diffusers' textual_inversion.py and
train_dreambooth_lora.py (PEFT LoRA, rank 4, on to_q/to_k/to_v/to_out.0).

Checks before timing (the run fails if they do not hold): both sides compute the same loss for the same timestep
and noise (same network, same weights, same LoRA values), and FLOPs per step match within ``--flop-tol``.
Then: warm-up (whose steps also measure peak step memory - torch allocator, profiler memory events - and the RSS
high-water delta), ``--rounds`` interleaved rounds (ABBA order), median time per step of each side, median and IQR
of the per-round ratios ours/ref.

Both sides run with the same ``--threads`` intra-op threads (default 1: on a 2-vCPU machine shared with other torch
processes, 2 OpenMP threads per process spin-wait for each other and a step becomes 10-50x slower on *both* sides;
see bench/README.md), flush-to-zero on, fp32, batch 1, cached latents and no VAE in the step.

Workload ``profusion`` (no reference implementation exists): one ProFusion Tune step (methods/profusion_tune.py:
``TuneRun``'s step closure - PromptNet forward, prompt encoded with S*, UNet with full-rank q/k/v deltas, backward
through all three - + ``train_step``) against one of our DreamBooth-LoRA steps, both on the shipped mini model, same
latents and batch (``--pf-batch``, ProFusion's official 4); the row's "ref" is the LoRA step and the printed ratio
is ProFusion / LoRA.

Run: ``python bench/bench_training.py`` from the repository root (``make bench`` does, via bench/run_all.py).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import reference  # noqa: E402

LORA_RANK = 4
TI_LR = 5e-3
LORA_LR = 1e-4


@dataclass
class Result:
    """One row: our step vs one reference step, same workload and latent size."""
    workload: str
    reference: str
    latent: int
    rounds: int
    ours_s: float
    ref_s: float
    ratio_median: float
    ratio_q1: float
    ratio_q3: float
    ours_peak_bytes: int
    ref_peak_bytes: int
    ours_rss_bytes: int | None
    ref_rss_bytes: int | None
    ours_flops: int
    ref_flops: int
    ours_ops: int
    ref_ops: int
    loss_ours: float
    loss_ref: float
    ours_times: list = field(default_factory=list)
    ref_times: list = field(default_factory=list)

    @property
    def flop_ratio(self) -> float:
        return self.ours_flops / self.ref_flops

    @property
    def mem_ratio(self) -> float:
        return self.ours_peak_bytes / max(1, self.ref_peak_bytes)


# ---------------------------------------------------------------------------------------------------------------
# setup


def boot(host_path: str | None, work: Path):
    from harness import fixtures
    from harness import host as H

    h = H.boot(host_path, models_dir=work / "models", output_dir=work / "out", input_dir=work / "in",
               temp_dir=work / "temp")
    ckpt = fixtures.ensure_checkpoint("sd15", REPO / ".cache" / "fixtures")
    link = work / "models" / "checkpoints" / ckpt.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(ckpt)
    h.refresh_model_lists()
    return h, ckpt


def boot_quiet(host_path: str | None, work: Path, threads: int):
    """:func:`boot`, then what every benchmark measures under: WARNING-level logging (ComfyUI's per-load INFO lines
    would bury the results), ``threads`` intra-op threads, denormals flushed, torch seeded 0. Returns (host, ckpt)."""
    h, ckpt = boot(host_path, work)
    logging.getLogger().setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    return h, ckpt


def run_scratch(prefix: str, run) -> int:
    """``run(work, t_start, log)`` in a fresh temporary folder (removed after, whatever happens); ``log(msg)`` prints
    ``msg`` with the seconds since the start. Returns ``run``'s exit status."""
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return run(work, t_start, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pack_modules(h):
    p = h.pack_module_name
    names = ("core.tuning", "core.diffusion", "core.textual", "core.deltas", "core.host", "methods.textual_inversion",
             "methods.dreambooth_lora", "methods.profusion_tune", "core.mini_family", "networks.promptnet",
             "networks.mini_clip")
    return {n.split(".")[-1]: importlib.import_module(f"{p}.{n}") for n in names}


def ldm_to_diffusers_unet_keys(ckpt_keys, unet_config: dict) -> dict:
    """{ldm UNet key (without 'model.diffusion_model.'): diffusers key}, from diffusers' own converter (run on
    tagged scalars so the mapping is exactly the one used for the weights)."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    prefix = "model.diffusion_model."
    ldm = [k for k in ckpt_keys if k.startswith(prefix)]
    tagged = {k: torch.tensor([float(i)]) for i, k in enumerate(ldm)}
    conv = convert_ldm_unet_checkpoint(tagged, reference.diffusers_unet_config(unet_config))
    return {ldm[int(v.item())][len(prefix):]: dk for dk, v in conv.items() if v.numel() == 1}


# ---------------------------------------------------------------------------------------------------------------
# ours


class OursTI:
    """The pack's TI step (methods/textual_inversion.py's step closure + tuning.train_step)."""

    def __init__(self, M, model, clip, latents, seed=0):
        self.M = M
        ti = M["textual_inversion"]
        self.cfg = M["tuning"].TuningConfig(steps=10 ** 6, learning_rate=TI_LR, seed=seed)
        self.emb = M["textual"].PlaceholderEmbeddings(clip, "sks", "dog")
        self.session = M["tuning"].TrainingSession(model, clip, train_text=True,
                                                   gradient_checkpointing=self.cfg.gradient_checkpointing)
        self.latents = latents
        self.ti = ti

    def __enter__(self):
        s = self.session.__enter__()
        M, emb = self.M, self.emb
        s.adopt(emb, s.clip.patcher.load_device)
        emb.attach(s.clip)
        s.load()
        self.gen = gen = M["tuning"].seeded_generator(self.cfg.seed)
        self.objective = objective = M["diffusion"].DiffusionObjective(s.model, self.latents, None, gen)
        self.tokens = tokens = [s.clip.tokenize(t.format(emb.word)) for t in self.ti.TEMPLATES]
        cfg = self.cfg
        import torch

        def step(_i):  # == methods/textual_inversion.py
            tok = tokens[int(torch.randint(0, len(tokens), (1,), generator=gen))]
            cond, pooled = s.clip.encode_from_tokens(tok, return_pooled=True)
            idx, sigma, noise = objective.sample(cfg.batch_size)
            return objective.loss(cond, idx, sigma, noise, pooled)

        self.step_fn = step
        params = [p for p in emb.parameters() if p.requires_grad]
        self.opt = M["tuning"].make_optimizer(params, cfg, s.device)
        self.pbar = M["host"].progress_bar(cfg.steps)
        self.i = 0
        return self

    def step(self):
        tuning = self.M["tuning"]
        value, _ = tuning.train_step(self.ti.NODE, self.i, self.step_fn, self.opt, self.cfg, self.session.device)
        self.i += 1
        self.pbar.update_absolute(self.i, self.cfg.steps, None)
        return value

    def loss_at(self, t: int, noise):
        """Loss for template 0, timestep t and the given noise, without updating anything."""
        import torch
        s = self.session
        cond, pooled = s.clip.encode_from_tokens(self.tokens[0], return_pooled=True)
        sigma = self.objective.sigmas[torch.tensor([t])].to(self.objective.device)
        loss, _ = self.objective.loss(cond, torch.zeros(1, dtype=torch.long), sigma, noise, pooled)
        return float(loss)

    def __exit__(self, *exc):
        return self.session.__exit__(*exc)


class OursLoRA:
    """The pack's DreamBooth-LoRA step (methods/dreambooth_lora.py without prior preservation, text encoder
    frozen and its prompt embedding cached) + tuning.train_step."""

    def __init__(self, M, model, clip, latents, seed=0, prompt="a photo of sks dog", batch_size=1):
        self.M = M
        self.cfg = M["tuning"].TuningConfig(steps=10 ** 6, learning_rate=LORA_LR, seed=seed, batch_size=batch_size)
        self.session = M["tuning"].TrainingSession(model, clip, train_text=False,
                                                   gradient_checkpointing=self.cfg.gradient_checkpointing)
        self.latents, self.prompt = latents, prompt

    def __enter__(self):
        M, cfg = self.M, self.cfg
        s = self.session.__enter__()
        self.gen = gen = M["tuning"].seeded_generator(cfg.seed)
        self.deltas = s.adopt(M["deltas"].LowRankDeltas(M["deltas"].find_unet_targets(s.model, "attention"),
                                                        LORA_RANK, None, generator=gen))
        self.deltas.attach(s.model)
        s.load()
        cond, pooled = M["host"].encode_text(s.clip, self.prompt)
        cached = {self.prompt: (cond.clone(), pooled.clone() if pooled is not None else None)}
        self.cond = cached[self.prompt][0]
        self.objective = objective = M["diffusion"].DiffusionObjective(s.model, self.latents, None, gen)
        prompt = self.prompt

        def step(_i):  # == methods/dreambooth_lora.py (no prior)
            cond, pooled = cached[prompt]
            idx, sigma, noise = objective.sample(cfg.batch_size)
            loss, denoised = objective.loss(cond, idx, sigma, noise, pooled)
            return loss, denoised

        self.step_fn = step
        params = [p for p in self.deltas.parameters() if p.requires_grad]
        self.opt = M["tuning"].make_optimizer(params, cfg, s.device)
        self.pbar = M["host"].progress_bar(cfg.steps)
        self.i = 0
        return self

    def step(self):
        tuning = self.M["tuning"]
        value, _ = tuning.train_step(self.M["dreambooth_lora"].NODE, self.i, self.step_fn, self.opt, self.cfg,
                                     self.session.device)
        self.i += 1
        self.pbar.update_absolute(self.i, self.cfg.steps, None)
        return value

    def loss_at(self, t: int, noise):
        import torch
        sigma = self.objective.sigmas[torch.tensor([t])].to(self.objective.device)
        loss, _ = self.objective.loss(self.cond, torch.zeros(1, dtype=torch.long), sigma, noise, None)
        return float(loss)

    def __exit__(self, *exc):
        return self.session.__exit__(*exc)


class OursProFusion:
    """One ProFusion Tune step (methods/profusion_tune.py: ``TuneRun.step_fn`` + ``tuning.train_step``) on the
    shipped mini model: a PromptNet made from the MODEL, the mini CLIP vision tower, one subject image and its
    augmented copies (``augmented_copies``), q/k/v deltas on."""

    def __init__(self, M, model, clip, vae, batch_size=4, copies=31, seed=0):
        import torch
        from harness.subjects import subject_images
        pt, mc = M["profusion_tune"], M["mini_clip"]
        self.M, self.pt = M, pt
        self.cfg = pt.ProFusionTuneConfig(steps=10 ** 6, batch_size=batch_size, augmented_copies=copies, seed=seed)
        with torch.inference_mode():
            self.net = M["promptnet"].PromptNet.from_model(model, family="sd1", vision_width=128, seed=1)
            tower = mc.load_clip_vision(mc.PACK_MODELS / "clip_vision" / mc.SHIPPED_NAME)
            image = subject_images(1, 64)[0]
            pt.check_inputs(self.net, model, clip, image, None, self.cfg)
            self.data = pt.build_dataset(self.net, vae, tower, image, None, self.cfg)
        self.latents = self.data.latents
        self.run = pt.TuneRun(self.net, model, clip, self.data, self.cfg)

    def __enter__(self):
        run = self.run.__enter__()
        self.opt = self.M["tuning"].make_optimizer([p for p in run.params if p.requires_grad], self.cfg,
                                                   run.session.device)
        self.pbar = self.M["host"].progress_bar(self.cfg.steps)
        self.i = 0
        return self

    def step(self):
        value, _ = self.M["tuning"].train_step(self.pt.NODE, self.i, self.run.step_fn, self.opt, self.cfg,
                                               self.run.session.device)
        self.i += 1
        self.pbar.update_absolute(self.i, self.cfg.steps, None)
        return value

    def __exit__(self, *exc):
        return self.run.__exit__(*exc)


def run_profusion(M, rounds, warmup, batch, copies, log) -> Result:
    """ProFusion Tune step vs our DreamBooth-LoRA step on the shipped mini model (same latents, same batch): FLOPs,
    aten ops, step memory, interleaved timing; the row's reference is the LoRA step."""
    import torch
    mf = M["mini_family"]
    with torch.inference_mode():  # two copies: each side's session patches its own model (both stay loaded)
        model, clip, vae = mf.load_checkpoint(mf.shipped_checkpoint())
        model_b, clip_b, _ = mf.load_checkpoint(mf.shipped_checkpoint())
    pf = OursProFusion(M, model, clip, vae, batch_size=batch, copies=copies)
    lora = OursLoRA(M, model_b, clip_b, pf.latents, batch_size=batch, prompt="a photo of sks toy")
    with pf as ours, lora as ref:
        sides = {"ours": ours, "lora": ref}
        losses = {k: side.step() for k, side in sides.items()}
        counts = {k: measure.count_flops_and_ops(side.step) for k, side in sides.items()}
        peak = {k: measure.peak_step_bytes(side.step) for k, side in sides.items()}
        rss = {k: measure.rss_peak_delta_bytes(side.step) for k, side in sides.items()}
        for _ in range(warmup):
            for side in sides.values():
                side.step()
        log(f"  [profusion] FLOPs/step ProFusion Tune {counts['ours'][0] / 1e9:.3f} G, LoRA "
            f"{counts['lora'][0] / 1e9:.3f} G; aten ops {counts['ours'][1].total} / {counts['lora'][1].total}")
        timing = measure.interleaved({k: side.step for k, side in sides.items()}, rounds)
    q1, med, q3 = timing.ratio("lora")
    r = Result("profusion-tune", f"lora-ours (mini, batch {batch})", int(pf.latents.shape[-1]), rounds,
               timing.median("ours"), timing.median("lora"), med, q1, q3, peak["ours"], peak["lora"], rss["ours"],
               rss["lora"], counts["ours"][0], counts["lora"][0], counts["ours"][1].total, counts["lora"][1].total,
               losses["ours"], losses["lora"], timing.times["ours"], timing.times["lora"])
    log(f"  [profusion] ProFusion Tune {r.ours_s * 1e3:.1f} ms/step, DreamBooth-LoRA {r.ref_s * 1e3:.1f} ms/step: "
        f"ratio ProFusion/LoRA {med:.2f} [{q1:.2f}-{q3:.2f}]")
    return r


# ---------------------------------------------------------------------------------------------------------------
# one workload


def run_workload(name, ours_ctx, make_refs, rounds, warmup, flop_tol, loss_tol, log) -> list[Result]:
    """Check equivalence, count, measure memory and time ``ours`` against every reference ``make_refs`` builds."""
    import torch

    with ours_ctx as ours:
        refs = make_refs(ours)
        sides = {"ours": ours, **refs}
        # 1) same maths: identical loss for the same timestep and noise
        g = torch.Generator().manual_seed(1234)
        noise = torch.randn(ours.latents.shape, generator=g)
        with torch.no_grad():
            lo = ours.loss_at(500, noise)
            lr = {k: float(r.loss(torch.tensor([500]), noise)) for k, r in refs.items()}
        for k, v in lr.items():
            rel = abs(lo - v) / max(abs(v), 1e-12)
            log(f"  [{name}] loss at t=500: ours {lo:.6f}  {k} {v:.6f}  (rel diff {rel:.1e})")
            if rel > loss_tol:
                raise SystemExit(f"{name}: ours and {k} disagree (loss {lo} vs {v}); the comparison is invalid")
        # 2) warm-up that also measures: a plain step (creates optimizer state), FLOPs + aten ops of a step,
        #    peak allocator bytes of a step, RSS high-water delta of a step; then plain warm-up steps
        for side in sides.values():
            side.step()
        counts = {k: measure.count_flops_and_ops(side.step) for k, side in sides.items()}
        peak = {k: measure.peak_step_bytes(side.step) for k, side in sides.items()}
        rss = {k: measure.rss_peak_delta_bytes(side.step) for k, side in sides.items()}
        for _ in range(warmup):
            for side in sides.values():
                side.step()
        f_o = counts["ours"][0]
        for k in refs:
            f_r = counts[k][0]
            log(f"  [{name}] FLOPs/step ours {f_o / 1e9:.2f} G  {k} {f_r / 1e9:.2f} G  (ratio {f_o / f_r:.3f}); "
                f"aten ops ours {counts['ours'][1].total}  {k} {counts[k][1].total}")
            if abs(f_o / f_r - 1) > flop_tol:
                raise SystemExit(f"{name}: FLOPs of ours and {k} differ by more than {flop_tol:.0%}: {f_o} vs {f_r}")
        # 3) time, interleaved
        t0 = time.perf_counter()
        timing = measure.interleaved({k: side.step for k, side in sides.items()}, rounds)
        log(f"  [{name}] timed {rounds} rounds in {time.perf_counter() - t0:.1f} s")
        out = []
        for k in refs:
            q1, med, q3 = timing.ratio(k)
            out.append(Result(name, k, int(ours.latents.shape[-1]), rounds, timing.median("ours"), timing.median(k),
                              med, q1, q3, peak["ours"], peak[k], rss["ours"], rss[k], f_o, counts[k][0],
                              counts["ours"][1].total, counts[k][1].total, lo, lr[k], timing.times["ours"],
                              timing.times[k]))
            log(f"  [{name}] ours {out[-1].ours_s:.3f} s/step, {k} {out[-1].ref_s:.3f} s/step, "
                f"ratio {med:.2f} [{q1:.2f}-{q3:.2f}]")
        return out


# ---------------------------------------------------------------------------------------------------------------
# report


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2 ** 20:.1f} MiB"


def table(results: list[Result]) -> str:
    head = ("workload", "reference", "latent", "ours s/step", "ref s/step", "time ours/ref [IQR]", "peak mem ours",
            "peak mem ref", "mem ours/ref", "RSS Δ ours", "RSS Δ ref", "GFLOP ours/ref (ratio)", "aten ops ours/ref")
    rows = [head]
    for r in results:
        rows.append((
            r.workload, r.reference, f"{r.latent}x{r.latent}", f"{r.ours_s:.3f}", f"{r.ref_s:.3f}",
            f"{r.ratio_median:.2f} [{r.ratio_q1:.2f}-{r.ratio_q3:.2f}]",
            fmt_bytes(r.ours_peak_bytes), fmt_bytes(r.ref_peak_bytes), f"{r.mem_ratio:.2f}",
            fmt_bytes(r.ours_rss_bytes), fmt_bytes(r.ref_rss_bytes),
            f"{r.ours_flops / 1e9:.1f}/{r.ref_flops / 1e9:.1f} ({r.flop_ratio:.3f})",
            f"{r.ours_ops}/{r.ref_ops}",
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default=os.environ.get("COMFYUI_PATH") or None,
                    help="ComfyUI tree (default: $COMFYUI_PATH or the repository's default host)")
    ap.add_argument("--latents", default="8,32", help="latent sizes (8 = 64x64 px, 32 = 256x256 px)")
    ap.add_argument("--workloads", default="ti,lora,profusion",
                    help="ti, lora (ours vs diffusers, per latent size), profusion (ProFusion Tune vs our LoRA step "
                         "on the mini model, once)")
    ap.add_argument("--pf-batch", type=int, default=4, help="batch of both sides of the profusion workload")
    ap.add_argument("--pf-copies", type=int, default=31, help="augmented copies of the profusion workload")
    ap.add_argument("--pf-rounds", type=int, default=12, help="timed rounds of the profusion workload")
    ap.add_argument("--ti-refs", default="script,row",
                    help="TI references: script (diffusers' scheme) and/or row (same models, one trainable row)")
    ap.add_argument("--rounds", default="12,6",
                    help="timed rounds per latent size (one value or one per size); a round times one step of "
                         "every side, in alternating order")
    ap.add_argument("--warmup", type=int, default=1, help="plain warm-up steps per side after the measuring ones")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both sides (default 1: stable on a shared 2-core machine)")
    ap.add_argument("--flop-tol", type=float, default=0.05)
    ap.add_argument("--loss-tol", type=float, default=1e-3)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--max-time-ratio", type=float, default=None,
                    help="exit 1 if a median time ratio ours/ref exceeds this (no gate by default)")
    args = ap.parse_args(argv)

    return run_scratch("personalize-bench-", lambda work, t_start, log: _run(args, work, t_start, log))


def _run(args, work: Path, t_start: float, log) -> int:
    h, ckpt = boot_quiet(args.host, work, args.threads)
    import torch
    import nodes
    from harness import fixtures

    M = pack_modules(h)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    results = []
    if "profusion" in workloads:
        log("profusion: ProFusion Tune step vs DreamBooth-LoRA step, mini model")
        results.append(run_profusion(M, args.pf_rounds, args.warmup, args.pf_batch, args.pf_copies, log))
        workloads.remove("profusion")
    if not workloads:
        return _report(args, results, h, t_start)
    with torch.inference_mode():
        model, clip, _vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt.name)[:3]
    unet_cfg = fixtures.UNET_CONFIGS["sd15"]
    base_unet, base_te = reference.build_reference_models(ckpt, unet_cfg)
    from safetensors import safe_open
    with safe_open(str(ckpt), "pt") as f:
        key_map = ldm_to_diffusers_unet_keys(list(f.keys()), unet_cfg)
    log(f"host {h.path} ({h.version}); torch {torch.__version__}, {args.threads} thread(s); "
        f"checkpoint {ckpt.name}; UNet {sum(p.numel() for p in base_unet.parameters()) / 1e6:.1f} M params, "
        f"CLIP-L {sum(p.numel() for p in base_te.parameters()) / 1e6:.1f} M")

    sizes = [int(s) for s in args.latents.split(",") if s]
    rounds = [int(p) for p in args.rounds.split(",")]
    rounds = (rounds * len(sizes))[:len(sizes)] if len(rounds) == 1 else rounds
    for size, n_rounds in zip(sizes, rounds):
        g = torch.Generator().manual_seed(size)
        latents = torch.randn(1, 4, size, size, generator=g)  # user-space VAE latent (the pack caches these)
        model_latents = latents * model.model.latent_format.scale_factor  # == vae.config.scaling_factor
        for w in workloads:
            log(f"{w} @ {size}x{size} latent ({size * 8}x{size * 8} px)")
            if w == "ti":
                ours_ctx = OursTI(M, model, clip, latents)

                def make_refs(ours, model_latents=model_latents):
                    ids = torch.tensor([[t for t, _w in ours.tokens[0]["l"][0]]])
                    init_id = M["textual"].word_token_ids(clip, "dog")["l"][0]
                    refs = {}
                    for mode in args.ti_refs.split(","):
                        te, unet = copy.deepcopy(base_te), copy.deepcopy(base_unet)
                        refs[f"diffusers-{mode}"] = ref = reference.ReferenceTI(
                            unet, te, ids, ours.emb.token_ids["l"], init_id, model_latents, lr=TI_LR, mode=mode)
                        assert torch.equal(ref.trained_vector(), ours.emb.vectors["l"].detach())
                    return refs
            elif w == "lora":
                ours_ctx = OursLoRA(M, model, clip, latents)

                def make_refs(ours, model_latents=model_latents):
                    unet = copy.deepcopy(base_unet)
                    ref = reference.ReferenceLoRA(unet, ours.cond.detach().clone(), model_latents, rank=LORA_RANK,
                                                  lr=LORA_LR)
                    share_lora_values(ours, ref, key_map)
                    return {"diffusers-peft": ref}
            else:
                raise SystemExit(f"unknown workload {w!r}")
            results += run_workload(w, ours_ctx, make_refs, n_rounds, args.warmup, args.flop_tol, args.loss_tol, log)
    return _report(args, results, h, t_start)


def _report(args, results, h, t_start) -> int:
    import torch
    print()
    print(f"Training-step benchmark: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} intra-op thread(s), fp32, batch 1 (profusion-tune: --pf-batch), host {h.path}")
    print("s/step: median; time ours/ref: median of per-round ratios over interleaved rounds [25th-75th pct];")
    print("peak mem: peak bytes held by torch's CPU allocator during one step above the pre-step level "
          "(profiler memory events); RSS Δ: resident high-water mark during one step minus RSS before it")
    print(table(results))
    gated = [r.ratio_median for r in results if r.workload != "profusion-tune"]  # that one is method vs method
    worst = max(gated) if gated else 0.0
    for r in results:
        if r.workload == "profusion-tune":
            print(f"ProFusion Tune step / DreamBooth-LoRA step (mini model, batch {args.pf_batch}): "
                  f"{r.ratio_median:.2f} [{r.ratio_q1:.2f}-{r.ratio_q3:.2f}] ({r.ours_s * 1e3:.1f} vs "
                  f"{r.ref_s * 1e3:.1f} ms; FLOPs {r.flop_ratio:.2f}x)")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    if args.max_time_ratio is not None and worst > args.max_time_ratio:
        print(f"FAIL: median time ratio {worst:.2f} > {args.max_time_ratio}")
        return 1
    return 0


def share_lora_values(ours: OursLoRA, ref, key_map: dict) -> None:
    """Give both LoRAs the same values: ours' Kaiming-uniform ``down`` and a small non-zero ``up`` (zero ``up`` is
    a degenerate start: exact-zero LoRA outputs and no gradient for ``down`` in the first step)."""
    import torch

    g = torch.Generator().manual_seed(7)
    ref_mods = ref.lora_modules()
    n = 0
    with torch.no_grad():
        for name, spec in ours.deltas.specs.items():
            ldm = spec.module_path.removeprefix("diffusion_model.")
            dkey = key_map[ldm + ".weight"]
            lora_a, lora_b = ref_mods[dkey.removesuffix(".weight")]
            up = torch.randn(ours.deltas.up[name].shape, generator=g) * 1e-3
            ours.deltas.up[name].copy_(up)
            lora_b.weight.copy_(up)
            lora_a.weight.copy_(ours.deltas.down[name])
            n += 1
    if n != len(ref_mods):
        raise SystemExit(f"LoRA layer sets differ: ours {n}, diffusers/PEFT {len(ref_mods)}")


if __name__ == "__main__":
    raise SystemExit(main())

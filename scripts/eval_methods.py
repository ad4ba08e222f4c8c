"""`make eval`: the mini-world personalisation benchmark (miniworld/benchmark.py) - every registered row
(miniworld/registry.py) on the reporting half of the held-out subjects x reference-view draws x scene prompts x
seeds, printed as a table with 95 % bootstrap intervals over subjects and paired differences against the baseline
rows (full description, Textual Inversion, DreamBooth-LoRA) on the same subjects, draws, prompts and seeds.

    .venv/bin/python scripts/eval_methods.py [--half reporting|tuning] [--subjects 12] [--draws 2] [--views 4]
        [--seeds 2] [--methods ti,lora,hifi] [--set FIELD=VALUE] [--quick] [--threads 1] [--json out.json]
        [--plot out.png]

--quick is the short version CI runs (the tuning half's first 2 subjects, 1 draw, 1 seed, the gated rows). Sweeps
(--set, --methods) belong on the tuning half (--half tuning); on the reporting half they are refused unless
--allow-reporting-half says the setting is already chosen. The exit status is 1 when a method at its default
settings (the registry's gated rows; not the ablations) does not beat the base model's subject fidelity (class word
only). --json writes every row's per-subject scores, intervals and paired differences; a per-subject plot (PNG) is
written beside it (or to --plot).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def refusal(half: str, sweeping: bool, allowed: bool) -> str | None:
    """Why a run must not start, or None: a sweep (--set / --methods) on the reporting half without
    --allow-reporting-half."""
    if half == "reporting" and sweeping and not allowed:
        return ("--set / --methods on the reporting half: sweeps and default choices are made on the tuning half "
                "(add --half tuning); pass --allow-reporting-half only to report a setting already chosen there")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="", help="mini-family file (default: the pack's shipped models/mini_world)")
    p.add_argument("--half", choices=("reporting", "tuning"), default=None,
                   help="held-out half (default: reporting; --quick: tuning)")
    p.add_argument("--allow-reporting-half", action="store_true",
                   help="allow --set / --methods on the reporting half (to report a setting chosen on the tuning half)")
    p.add_argument("--subjects", type=int, default=None, help="the first N subjects of the half (default: all 12)")
    p.add_argument("--draws", type=int, default=None, help="reference-view draws per subject (default 2)")
    p.add_argument("--views", type=int, default=None,
                   help="k: reference images per subject a method personalises from (default 4; 1: one-image protocol)")
    p.add_argument("--seeds", type=int, default=None, help="sampling seeds per (subject, draw, prompt) (default 2)")
    p.add_argument("--methods", default="", help="comma-separated subset of the registered personalisation rows")
    p.add_argument("--quick", action="store_true", help="the short CI version")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a numeric BenchConfig field, e.g. --set ti_steps=500")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1, the README tables' setting). The scores depend on it: with 2 "
                        "threads instead of 1 a 200-step LoRA trained from the same seed ends 47 %% away in weight "
                        "norm (float sums in another order, amplified by training), so tables are reproduced at "
                        "the thread count in their header")
    p.add_argument("--json", default="", help="write rows, per-subject scores, intervals and paired differences here")
    p.add_argument("--plot", default="", help="per-subject plot PNG (default: beside --json, else not written)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from harness import host as H
    h = H.boot_scratch("mini_bench_")
    import comfy.utils
    import nodes
    import torch
    comfy.utils.PROGRESS_BAR_ENABLED = False  # one tqdm bar per sampled image otherwise
    torch.set_num_threads(args.threads)
    bench, report, registry = h.pack("miniworld.benchmark"), h.pack("miniworld.report"), h.pack("miniworld.registry")
    ev_mod, mf = h.pack("miniworld.evaluators"), h.pack("core.mini_family")

    cfg = bench.quick_config() if args.quick else bench.BenchConfig()
    overrides = {k: v for k, v in (("half", args.half), ("subjects", args.subjects), ("draws", args.draws),
                                   ("views", args.views), ("seeds", args.seeds)) if v is not None}
    if args.methods:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in overrides["methods"] if m not in registry.keys()]
        if unknown:
            p.error(f"--methods: unknown row(s) {', '.join(unknown)}; registered: {', '.join(registry.keys())}")
    cfg = dataclasses.replace(cfg, **overrides)
    try:
        cfg = H.replace_numeric(cfg, args.set)
    except ValueError as e:
        p.error(str(e))
    why = refusal(cfg.half, bool(args.set or args.methods), args.allow_reporting_half)
    if why:
        p.error(why)

    ckpt = Path(args.ckpt or mf.shipped_checkpoint())
    model, clip, vae = mf.load_checkpoint(ckpt, embedding_directory=str(h.models_dir / "embeddings"))
    runner = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, ev_mod.load_evaluator(), cfg)
    draws = bench.pick_draws(cfg)
    subjects = [k.subject.name for k in draws[0]]
    t0 = time.perf_counter()
    rows = runner.run(draws=draws)
    seconds = time.perf_counter() - t0
    header = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "checkpoint": ckpt.name,
              "weights_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
              "host": f"ComfyUI {h.version} ({h.path})",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
              "command": "scripts/eval_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"\nmini-world benchmark, {header['date']}, commit {header['commit']}, checkpoint {ckpt.name} (sha256 "
          f"{header['weights_sha256'][:12]}…), {header['host']}, torch {header['torch']} on {header['threads']} "
          f"threads, {seconds:.0f} s\n")
    print(report.format_table(rows, cfg, subjects))
    paired = report.format_paired(rows)
    if paired:
        print("\n" + paired)
    if args.json:
        report.write_json(Path(args.json), report.to_json(rows, dataclasses.asdict(cfg), subjects, header))
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else "")
    if plot:
        report.plot_per_subject(rows, subjects, Path(plot))
        print(f"\nper-subject plot: {plot}")
    losers = report.below_floor(rows)
    if losers:
        floor = next(r for r in rows if registry.get(r.method).floor)
        print(f"\nFAIL: not above the base model's subject fidelity ({floor.subject_fidelity:.3f}): "
              f"{', '.join(r.title for r in losers)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

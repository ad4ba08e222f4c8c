"""`make eval`: the mini-world personalisation benchmark (miniworld/benchmark.py) - every registered row
(miniworld/registry.py) on the reporting half of the held-out subjects x reference-view draws x scene prompts x
seeds, printed as a table with 95 % bootstrap intervals over subjects and paired differences against the baseline
rows (full description, Textual Inversion, DreamBooth-LoRA) on the same subjects, draws, prompts and seeds.

    .venv/bin/python scripts/eval_methods.py [--protocol both|multi|one] [--half reporting|tuning] [--subjects 12]
        [--draws 2] [--views 4] [--seeds 2] [--methods ti,lora,hifi] [--set FIELD=VALUE] [--quick] [--threads 1]
        [--json out.json] [--plot out.png]

Two protocols (--protocol, default both: `make eval`, EVAL_PROTOCOL=multi|one to choose): **multi-image**, each
method personalises from all --views reference views of a draw; **one-image**, from view 0 of the same draw only (the
setting of ProFusion, HyperDreamBooth, the tuning encoder and Subject-Diffusion), at the same settings. Every row of
both is scored against all --views views. The one-image table adds each metric's interval, the seconds to personalise
a subject (encode + any tuning) and whether the method tuned at test time; with both protocols the bounds' rows are
run once (they see no reference) and a last table pairs each method's one-image row with its multi-image row.
`--protocol one --pair-with MULTI.json` pairs with an earlier multi-image run's --json instead (same config, subjects,
weights and threads; refused otherwise), and says whether the bounds' rows reproduced that run's. `--protocol one
--pair-with ONE.json` (an earlier one-image run's --json, e.g. docs/mini_world_eval_one_image.json) runs the given
--methods and joins the earlier run's other rows to the table, the paired differences (subject and prompt fidelity)
and the --json, as if one run had produced them all (same conditions as above); the bounds are run again and
compared score for score.

--quick is the short version CI runs (the tuning half's first 2 subjects, 1 draw, 1 seed, the gated rows). Sweeps
(--set, --methods) belong on the tuning half (--half tuning); on the reporting half they are refused unless
--allow-reporting-half says the setting is already chosen. The exit status is 1 when a method at its default
settings (the registry's gated rows; not the ablations) does not beat the base model's subject fidelity (class word
only) in the multi-image table; one-image rows below it are named, not failed (the gate is about a method at the
settings it was built for). --json writes every row's per-subject scores, intervals and paired differences; a
per-subject plot (PNG) is written beside it (or to --plot); with both protocols the one-image table's go to
``<name>_one_image.json`` / ``.png`` beside them.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)


log = logging.getLogger("eval_methods")


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
    p.add_argument("--protocol", choices=("both", "multi", "one"), default="both",
                   help="multi: each method personalises from all --views reference views of a draw; one: from "
                        "view 0 only (the one-image protocol); both (default): the two tables. Every row is scored "
                        "against all --views views")
    p.add_argument("--pair-with", default="", metavar="JSON",
                   help="with --protocol one: an earlier multi-image run's --json to pair each method's one-image "
                        "row with (same config, subjects, weights and threads)")
    p.add_argument("--views", type=int, default=None,
                   help="reference views per draw, the set every row is scored against (default 4)")
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
    try:
        cfg = H.replace_numeric(dataclasses.replace(cfg, **overrides), args.set)
    except ValueError as e:
        p.error(str(e))
    protocols = ("multi", "one") if args.protocol == "both" else (args.protocol,)
    if len(protocols) == 2 and cfg.views == 1:
        p.error("--views 1 makes the multi-image and one-image protocols the same run; pass --protocol one")
    if args.pair_with and protocols != ("one",):
        p.error("--pair-with pairs a one-image run with an earlier multi-image run: pass --protocol one")
    why = refusal(cfg.half, bool(args.set or args.methods), args.allow_reporting_half)
    if why:
        p.error(why)

    ckpt = Path(args.ckpt or mf.shipped_checkpoint())
    weights_sha256 = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    subjects = [k.subject.name for k in bench.pick_subjects(cfg.subjects, cfg.half)]
    earlier = None
    if args.pair_with:
        earlier = json.loads(Path(args.pair_with).read_text())
        earlier_protocol = "one" if earlier.get("protocol") == "one" else "multi"
        mine = dataclasses.asdict(cfg if earlier_protocol == "multi" else bench.one_image(cfg))
        why = report.unpaired(earlier, mine, subjects, {"weights_sha256": weights_sha256, "threads": args.threads},
                              earlier_protocol)
        if why:
            p.error(f"--pair-with {args.pair_with}: not the same run to pair with: {'; '.join(why)}")
    model, clip, vae = mf.load_checkpoint(ckpt, embedding_directory=str(h.models_dir / "embeddings"))
    evaluator = ev_mod.load_evaluator()
    draws = bench.pick_draws(cfg)  # both protocols: the same draws of cfg.views views (one-image: view 0 seen)
    t0 = time.perf_counter()
    results, bounds = {}, None  # protocol -> (config, rows, seconds)
    for protocol in protocols:
        pcfg = cfg if protocol == "multi" else bench.one_image(cfg)
        runner = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, evaluator, pcfg,
                                 run_name=f"bench_{protocol}")
        t = time.perf_counter()
        if bounds is None:
            rows = runner.run(draws=draws)
        else:  # the bounds see no reference: their rows are the same under both protocols
            rows = bounds + runner.run(methods=pcfg.method_keys(), draws=draws)
        bounds = [r for r in rows if not registry.get(r.method).personalises]
        if earlier is not None and earlier_protocol == "one":  # the earlier run's other rows join (bounds: ours)
            rows, joined = report.join_rows(rows, report.rows_from_json(earlier))
            log.info("rows joined from %s: %s", args.pair_with, ", ".join(joined) or "none")
        results[protocol] = (pcfg, rows, time.perf_counter() - t)
        log.info("%s-image protocol: %.0f s", protocol, results[protocol][2])
    seconds = time.perf_counter() - t0
    header = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "checkpoint": ckpt.name,
              "weights_sha256": weights_sha256,
              "host": f"ComfyUI {h.version} ({h.path})",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
              "command": "scripts/eval_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"\nmini-world benchmark, {header['date']}, commit {header['commit']}, checkpoint {ckpt.name} (sha256 "
          f"{header['weights_sha256'][:12]}…), {header['host']}, torch {header['torch']} on {header['threads']} "
          f"threads, {seconds:.0f} s\n")
    status = 0
    for protocol, (pcfg, rows, secs) in results.items():
        if len(results) > 1:
            print(f"\n## {TITLES[protocol].format(views=cfg.views)} ({secs:.0f} s)\n")
        print((report.format_table if protocol == "multi" else report.format_one_image_table)(rows, pcfg, subjects))
        paired = report.format_paired(rows)
        if paired:
            print("\n" + paired)
        if earlier is not None and earlier_protocol == "one":
            print(f"\n(rows of methods not run here come from {args.pair_with}: same subjects, draws, prompts, seeds "
                  "and weights)\n\n" + report.format_paired(rows, "prompt_fidelity"))
        out = _beside(args.json, protocol, len(results))
        if out:
            report.write_json(out, report.to_json(rows, dataclasses.asdict(pcfg), subjects,
                                                  {**header, "protocol_seconds": round(secs, 1)}, protocol))
        plot = _beside(args.plot, protocol, len(results)) or (out.with_suffix(".png") if out else None)
        if plot:
            report.plot_per_subject(rows, subjects, plot)
            print(f"\nper-subject plot: {plot}")
        losers = report.below_floor(rows)
        if losers:
            floor = next(r for r in rows if registry.get(r.method).floor)
            names = ", ".join(r.title for r in losers)
            if protocol == "multi":
                print(f"\nFAIL: not above the base model's subject fidelity ({floor.subject_fidelity:.3f}): {names}")
                status = 1
            else:
                print(f"\nFrom one image, not above the base model's subject fidelity ({floor.subject_fidelity:.3f}; "
                      f"named, not failed): {names}")
    if len(results) == 2:
        print("\n" + report.format_protocol_gap(results["multi"][1], results["one"][1]))
    if earlier is not None and earlier_protocol == "one":
        theirs = {r.method: r.per_subject for r in report.rows_from_json(earlier)}
        fresh = [r for r in bounds if r.method in theirs]
        same = [r.title for r in fresh if r.per_subject == theirs[r.method]]
        other = [r.title for r in fresh if r.per_subject != theirs[r.method]]
        print(f"\nBounds' rows equal to that run's, score for score: {', '.join(same) or 'none'}"
              + (f"; different: {', '.join(other)}" if other else ""))
    elif earlier is not None:
        multi, one = report.rows_from_json(earlier), results["one"][1]
        gap = report.format_protocol_gap(multi, one)
        print("\n" + gap.replace("views (", f"views (multi-image rows from {args.pair_with}; ", 1))
        theirs = {r.method: r.per_subject for r in multi}
        bounds = [r for r in one if not registry.get(r.method).personalises]
        same = [r.title for r in bounds if r.per_subject == theirs.get(r.method)]
        other = [r.title for r in bounds if r.per_subject != theirs.get(r.method)]
        print(f"\nBounds' rows equal to that run's, score for score: {', '.join(same) or 'none'}"
              + (f"; different: {', '.join(other)}" if other else ""))
    return status


TITLES = {"multi": "Multi-image protocol: each method personalises from all {views} reference views of a draw",
          "one": "One-image protocol: each method personalises from view 0 of a draw, scored against all {views}"}


def _beside(path: str, protocol: str, protocols: int) -> Path | None:
    """Where ``protocol``'s file goes: ``path`` itself with one protocol or for the multi-image table, else
    ``<stem>_one_image<suffix>`` beside it."""
    if not path:
        return None
    path = Path(path)
    return path if protocols == 1 or protocol == "multi" else path.with_name(f"{path.stem}_one_image{path.suffix}")


if __name__ == "__main__":
    raise SystemExit(main())

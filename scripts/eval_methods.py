"""`make eval`: the mini-world personalisation benchmark (miniworld/benchmark.py) - every method of the pack on
held-out subjects x scene prompts x seeds, printed as a table in the papers' form.

    .venv/bin/python scripts/eval_methods.py [--subjects 6] [--seeds 2] [--methods ti,lora,hifi] [--quick]
                                             [--json out.json]

--quick is the short version CI runs (2 subjects, 1 seed, TI / DreamBooth-LoRA / HiFi Tuner). The exit status is 1
when a method at its default settings (bench.GATED_METHODS; not the ablation rows) does not beat the base model's
subject fidelity (class word only).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="", help="mini-family file (default: the pack's shipped models/mini_world)")
    p.add_argument("--subjects", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--methods", default="", help="comma-separated subset of the personalisation methods")
    p.add_argument("--quick", action="store_true", help="the short CI version")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a numeric BenchConfig field, e.g. --set ti_steps=500")
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from harness import host as H
    h = H.boot_scratch("mini_bench_")
    import comfy.utils
    import nodes
    comfy.utils.PROGRESS_BAR_ENABLED = False  # one tqdm bar per sampled image otherwise
    bench, ev_mod, mf = h.pack("miniworld.benchmark"), h.pack("miniworld.evaluators"), h.pack("core.mini_family")

    cfg = bench.quick_config() if args.quick else bench.BenchConfig()
    overrides = {k: v for k, v in (("subjects", args.subjects), ("seeds", args.seeds)) if v is not None}
    if args.methods:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    cfg = dataclasses.replace(cfg, **overrides)
    try:
        cfg = H.replace_numeric(cfg, args.set)
    except ValueError as e:
        p.error(str(e))

    ckpt = args.ckpt or str(mf.shipped_checkpoint())
    model, clip, vae = mf.load_checkpoint(ckpt, embedding_directory=str(h.models_dir / "embeddings"))
    runner = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, ev_mod.load_evaluator(), cfg)
    kits = bench.pick_subjects(cfg.subjects)
    t0 = time.perf_counter()
    rows = runner.run(kits=kits)
    print(f"\nmini-world benchmark, {time.strftime('%Y-%m-%d')}, checkpoint {Path(ckpt).name}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(bench.format_table(rows, cfg, len(kits)))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": dataclasses.asdict(cfg),
                                               "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    base = next(r for r in rows if r.method == "base-class")
    losers = [r.title for r in rows
              if r.method in bench.GATED_METHODS and r.subject_fidelity <= base.subject_fidelity]
    if losers:
        print(f"\nFAIL: not above the base model's subject fidelity ({base.subject_fidelity:.3f}): {', '.join(losers)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

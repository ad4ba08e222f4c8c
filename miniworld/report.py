"""`make eval`'s report (scripts/eval_methods.py): the tables with 95 % bootstrap intervals over subjects (the
multi-image table, :func:`format_table`; the one-image table, :func:`format_one_image_table`), the paired
differences against the baseline rows, a method's one-image row against its multi-image row
(:func:`format_protocol_gap`), the floor gate, the JSON and the per-subject plot. Plain data in, text and files out;
the intervals come from miniworld/stats.py."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from . import registry, stats, world

LEVEL = 0.95
#: the scores of every row (benchmark.Row's fields, per_subject's keys)
METRICS = ("subject_fidelity", "image_similarity", "prompt_fidelity", "attributes")


def intervals(rows, metric: str = "subject_fidelity", level: float = LEVEL) -> dict[str, stats.Interval]:
    return {r.method: stats.bootstrap(r.per_subject[metric], level) for r in rows}


def paired(rows, metric: str = "subject_fidelity", level: float = LEVEL) -> dict[tuple[str, str], stats.Interval]:
    """(row, baseline) -> interval of mean(row - baseline) over subjects, for every personalisation row (tuned or
    not) against every registered baseline row present (other than itself)."""
    by_key = {r.method: r for r in rows}
    baselines = [k for k in registry.keys(baseline=True) if k in by_key]
    out = {}
    for r in rows:
        if not registry.get(r.method).personalises:
            continue
        for b in baselines:
            if b != r.method:
                out[(r.method, b)] = stats.paired_difference(r.per_subject[metric], by_key[b].per_subject[metric],
                                                             level)
    return out


def below_floor(rows) -> list:
    """Gated rows (methods at their defaults) whose subject fidelity is not above the floor row's."""
    floor = next((r for r in rows if registry.get(r.method).floor), None)
    if floor is None:
        return []
    return [r for r in rows if registry.get(r.method).gated and r.subject_fidelity <= floor.subject_fidelity]


def format_table(rows, cfg, subjects: list[str]) -> str:
    fid, pf = intervals(rows, "subject_fidelity"), intervals(rows, "prompt_fidelity")
    head = ("| method | subject fidelity (DINO analog) [95 % CI] | image similarity (CLIP-I analog) | prompt fidelity "
            "(CLIP-T analog, scene) [95 % CI] | attributes right | tuning s / subject | bytes / subject |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        t = "-" if r.tune_seconds is None else f"{r.tune_seconds:.1f}"
        b = "0" if not r.bytes_per_subject else f"{r.bytes_per_subject:,}"
        lines.append(f"| {r.title} | {fid[r.method]} | {r.image_similarity:.3f} | {pf[r.method]} "
                     f"| {100 * r.attributes:.1f} % | {t} | {b} |")
    lines.append("\n" + _footer(cfg, subjects))
    return "\n".join(lines)


def _footer(cfg, subjects: list[str]) -> str:
    seen = getattr(cfg, "seen", cfg.views)
    which = "view 0 alone (the one-image protocol)" if seen == 1 else f"its first {seen} views"
    saw = (f"; each method personalises from {which} of each draw's {cfg.views} and every row is scored against all "
           f"{cfg.views}" if seen != cfg.views else "")
    return (f"{len(subjects)} held-out subjects ({cfg.half} half: {', '.join(subjects)}) x {cfg.draws} "
            f"reference-view draw(s) of {cfg.views} image(s) x {len(world.SCENES)} scene prompts x {cfg.seeds} "
            f"seed(s) per row{saw}; ddim / ddim_uniform, {cfg.sampler_steps} steps, cfg {cfg.cfg}. Intervals: "
            f"percentile bootstrap over subjects ({stats.DEFAULT_RESAMPLES} resamples, seed {stats.DEFAULT_SEED}).")


ONE_IMAGE_COLUMNS = ("method", "subject fidelity (DINO analog) [95 % CI]", "image similarity (CLIP-I analog) [95 % CI]",
                     "prompt fidelity (CLIP-T analog, scene) [95 % CI]", "attributes right [95 % CI]",
                     "s to personalise / subject (encode + tuning)", "tuned at test time")


def tuned_at_test_time(method: str) -> str:
    """The one-image table's last column: yes / no for a method (registry ``tuned``), - for a bound or baseline."""
    entry = registry.get(method)
    return "-" if not entry.personalises else "yes" if entry.tuned else "no"


def format_one_image_table(rows, cfg, subjects: list[str]) -> str:
    """The one-image protocol's table: every metric with its interval over subjects, the seconds to personalise a
    subject (encoding plus any test-time tuning, as the row timed it) and whether the method tuned at test time."""
    iv = {m: intervals(rows, m) for m in METRICS}
    lines = ["| " + " | ".join(ONE_IMAGE_COLUMNS) + " |", "|" + "---|" * len(ONE_IMAGE_COLUMNS)]
    for r in rows:
        a = iv["attributes"][r.method]
        t = "-" if r.tune_seconds is None else f"{r.tune_seconds:.1f}"
        lines.append(f"| {r.title} | {iv['subject_fidelity'][r.method]} | {iv['image_similarity'][r.method]} "
                     f"| {iv['prompt_fidelity'][r.method]} | {100 * a.mean:.1f} % [{100 * a.low:.1f}, "
                     f"{100 * a.high:.1f}] | {t} | {tuned_at_test_time(r.method)} |")
    lines.append("\n" + _footer(cfg, subjects))
    return "\n".join(lines)


def protocol_gap(multi_rows, one_rows, metric: str = "subject_fidelity",
                 level: float = LEVEL) -> dict[str, stats.Interval]:
    """method -> interval of mean(one-image - multi-image) over subjects, for every personalisation row in both
    tables (the same subjects, draws, scoring references, prompts and seeds: only what the method saw differs)."""
    multi = {r.method: r for r in multi_rows}
    return {r.method: stats.paired_difference(r.per_subject[metric], multi[r.method].per_subject[metric], level)
            for r in one_rows if r.method in multi and registry.get(r.method).personalises}


def format_protocol_gap(multi_rows, one_rows, metrics=("subject_fidelity", "prompt_fidelity")) -> str:
    """Each method's one-image row against its multi-image row: both means and the paired difference [95 % CI]
    per metric; * where the interval excludes 0."""
    gaps = {m: protocol_gap(multi_rows, one_rows, m) for m in metrics}
    if not gaps[metrics[0]]:
        return ""
    multi = {r.method: r for r in multi_rows}
    head = " | ".join(f"{m.replace('_', ' ')}: all views | one image | one - all [95 % CI]" for m in metrics)
    lines = ["One image against all views (same subjects, draws, scoring references, prompts and seeds; row by row; "
             "* : the 95 % interval excludes 0)", "", f"| method | {head} |", "|" + "---|" * (1 + 3 * len(metrics))]
    for r in one_rows:
        if r.method not in gaps[metrics[0]]:
            continue
        cells = []
        for m in metrics:
            d = gaps[m][r.method]
            cells.append(f"{getattr(multi[r.method], m):.3f} | {getattr(r, m):.3f} | {d.mean:+.3f} [{d.low:+.3f}, "
                         f"{d.high:+.3f}]" + (" *" if d.excludes_zero else ""))
        lines.append(f"| {r.title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_paired(rows, metric: str = "subject_fidelity") -> str:
    """Rows x baselines: mean difference [95 % CI] on the same subjects, draws, prompts and seeds; * where the
    interval excludes 0."""
    diffs = paired(rows, metric)
    if not diffs:
        return ""
    titles = {r.method: r.title for r in rows}
    baselines = list(dict.fromkeys(b for _, b in diffs))
    lines = [f"Paired differences in {metric.replace('_', ' ')} (row - column; * : the 95 % interval excludes 0)",
             "", "| method | " + " | ".join(f"- {titles[b]}" for b in baselines) + " |",
             "|" + "---|" * (len(baselines) + 1)]
    for m in dict.fromkeys(a for a, _ in diffs):
        cells = []
        for b in baselines:
            d = diffs.get((m, b))
            cells.append("" if d is None else f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
                         + (" *" if d.excludes_zero else ""))
        lines.append(f"| {titles[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(rows, cfg_dict: dict, subjects: list[str], header: dict, protocol: str = "multi") -> dict:
    """The rows (with per-subject scores and every metric's interval), paired differences, the config and
    ``protocol`` ("multi": a method saw every reference view; "one": view 0 only, scored against all)."""
    metrics = ("subject_fidelity", "prompt_fidelity")
    return {
        "header": header, "protocol": protocol, "config": cfg_dict, "subjects": subjects,
        "rows": [{**{k: v for k, v in vars(r).items()},
                  "interval": {m: vars(stats.bootstrap(v, LEVEL)) for m, v in r.per_subject.items()}}
                 for r in rows],
        "paired": [{"metric": m, "row": a, "baseline": b, **vars(d)}
                   for m in metrics for (a, b), d in paired(rows, m).items()],
    }


def rows_from_json(payload: dict) -> list:
    """The rows of a :func:`to_json` payload (name, title, means and per-subject scores: what the tables and
    :func:`protocol_gap` read)."""
    keys = ("method", "title", *METRICS, "tune_seconds", "bytes_per_subject", "images", "per_subject")
    return [SimpleNamespace(**{k: r.get(k) for k in keys}) for r in payload["rows"]]


#: config fields two runs may differ in and still pair row by row (what the method saw; which rows ran)
PAIRABLE = ("seen_views", "methods")


def unpaired(payload: dict, cfg_dict: dict, subjects: list[str], header: dict, protocol: str = "multi") -> list[str]:
    """Why the ``protocol`` run ``payload`` (a :func:`to_json` dict; a multi-image run by default, "one" for an
    earlier one-image run whose rows join this one's) cannot pair with a run of ``cfg_dict`` on ``subjects`` under
    ``header`` (weights, thread count), or ``[]``: they must share every config field but :data:`PAIRABLE`, the
    subjects in order, the weights and the threads, and the payload must be of ``protocol``."""
    why = []
    theirs_protocol = payload.get("protocol", "multi")
    if theirs_protocol != protocol:
        why.append(f"it is a {theirs_protocol}-image run, not a {protocol}-image one")
    theirs = payload.get("config", {})
    why += [f"{k} {theirs.get(k)!r} against {v!r}" for k, v in cfg_dict.items()
            if k not in PAIRABLE and theirs.get(k) != v]
    if payload.get("subjects") != subjects:
        why.append(f"subjects {payload.get('subjects')} against {subjects}")
    for k in ("weights_sha256", "threads"):
        if payload.get("header", {}).get(k) != header.get(k):
            why.append(f"{k} {payload.get('header', {}).get(k)!r} against {header.get(k)!r}")
    return why


def join_rows(rows, earlier_rows) -> tuple[list, list[str]]:
    """This run's ``rows`` and, in table order, the rows of an earlier run of the same protocol, config and subjects
    (:func:`unpaired` said so) that this run did not produce: a run of new methods alone then gets the table and
    paired differences against the earlier run's baselines. Returns (rows, the keys taken from the earlier run)."""
    mine = {r.method for r in rows}
    taken = [r for r in earlier_rows if r.method not in mine and r.method in registry.keys()]
    order = {k: i for i, k in enumerate(registry.keys())}
    return sorted([*rows, *taken], key=lambda r: order.get(r.method, len(order))), [r.method for r in taken]


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict) -> None:
    atomic_write(path, json.dumps(payload, indent=1).encode())


_PALETTE = [(0, 0, 0), (150, 150, 150), (230, 159, 0), (86, 180, 233), (0, 158, 115), (213, 94, 0),
            (0, 114, 178), (204, 121, 167), (240, 228, 66), (120, 60, 20), (100, 0, 160), (0, 90, 60)]


def plot_per_subject(rows, subjects: list[str], path: Path, metric: str = "subject_fidelity") -> None:
    """A PNG (PIL only): one column per subject, one coloured marker per row at its score, rows joined by thin lines
    so a method's wins and losses against the others read across the subjects; legend below."""
    from PIL import Image, ImageDraw

    n = len(subjects)
    left, top, col, height = 60, 30, 70, 300
    width = max(left + col * n + 20, 460)  # room for the title and the legend
    legend_h = 18 * len(rows) + 10
    label_h = 90
    img = Image.new("RGB", (width, top + height + label_h + legend_h), "white")
    d = ImageDraw.Draw(img)
    lo, hi = -0.2, 1.0

    def y(v: float) -> float:
        return top + (hi - min(max(v, lo), hi)) / (hi - lo) * height

    d.text((left, 8), f"{metric.replace('_', ' ')} per subject (mean over draws, prompts, seeds)", fill="black")
    for tick in (-0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        d.line([(left, y(tick)), (left + col * n, y(tick))], fill=(225, 225, 225) if tick else (160, 160, 160))
        d.text((8, y(tick) - 6), f"{tick:+.1f}", fill="black")
    for i, name in enumerate(subjects):
        x = left + col * i + col // 2
        d.line([(x, top), (x, top + height)], fill=(240, 240, 240))
        for k, word in enumerate(name.split()):
            d.text((x - 3 * len(word), top + height + 6 + 12 * k), word, fill="black")
    for j, r in enumerate(rows):
        colour = _PALETTE[j % len(_PALETTE)]
        pts = [(left + col * i + col // 2 + (j - len(rows) / 2) * 3, y(v))
               for i, v in enumerate(r.per_subject[metric])]
        d.line(pts, fill=colour, width=1)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + height + label_h + 18 * j
        d.rectangle([left, ly + 2, left + 10, ly + 12], fill=colour)
        d.text((left + 16, ly), f"{r.title}: {getattr(r, metric):.3f}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())

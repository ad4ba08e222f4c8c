"""The method registry (miniworld/registry.py + miniworld/rows/), the report's paired differences, gate and plot
(miniworld/report.py), and eval_methods' refusal to sweep on the reporting half. No host needed."""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from comfyui_personalize.miniworld import registry, report

REPO = Path(__file__).resolve().parents[1]


def test_rows_register_with_their_roles_in_table_order():
    keys = registry.keys()
    assert keys[:6] == ("real", "base-class", "base-full", "ti", "lora", "hifi")
    assert set(keys) >= {"hifi-no-mask", "hifi-no-reg", "hifi-no-stepwise"}
    assert registry.keys(tuned=True, default=True) == ("ti", "lora", "hifi")  # ablations are opt-in diagnostics
    assert registry.keys(gated=True) == ("ti", "lora", "hifi")
    assert registry.keys(baseline=True) == ("base-full", "ti", "lora")
    assert registry.keys(floor=True) == ("base-class",)
    assert registry.keys(tuned=False) == ("real", "base-class", "base-full")
    assert registry.get("lora").title == "DreamBooth-LoRA (rank 4)"
    with pytest.raises(ValueError, match="unknown benchmark row 'nope'.*known: real, base-class"):
        registry.get("nope")


def test_a_key_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("ti", "again")(lambda b, heldout, index: None)


def test_bench_scripts_exist_and_run_all_uses_the_registry():
    scripts = registry.bench_scripts()
    assert scripts == ("bench/bench_training.py", "bench/bench_hifi.py")
    assert all((REPO / s).is_file() for s in scripts)
    assert "registry.bench_scripts()" in (REPO / "bench" / "run_all.py").read_text()


def test_benchmark_has_no_chain_on_method_names():
    src = (REPO / "miniworld" / "benchmark.py").read_text()
    assert not re.search(r"method (==|in) [\"'(]", src)


@dataclass
class FakeRow:
    method: str
    title: str
    subject_fidelity: float
    prompt_fidelity: float = 0.9
    image_similarity: float = 0.5
    attributes: float = 0.5
    tune_seconds: float | None = None
    bytes_per_subject: int | None = 0
    images: int = 0
    per_subject: dict = field(default_factory=dict)


def _row(key, scores):
    return FakeRow(key, registry.get(key).title, sum(scores) / len(scores),
                   per_subject={"subject_fidelity": list(scores), "prompt_fidelity": [0.9] * len(scores)})


def test_paired_differences_against_the_baselines():
    base = [0.1, 0.2, 0.3, 0.4]
    rows = [_row("base-class", [0.0] * 4), _row("base-full", base), _row("ti", base),
            _row("lora", [b - 0.1 for b in base]), _row("hifi", [b + 0.2 for b in base])]
    diffs = report.paired(rows)
    assert set(diffs) == {(a, b) for a in ("ti", "lora", "hifi") for b in ("base-full", "ti", "lora") if a != b}
    same = diffs[("ti", "base-full")]
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    assert diffs[("hifi", "base-full")].low == pytest.approx(0.2) and diffs[("hifi", "lora")].excludes_zero
    table = report.format_paired(rows)
    assert "| HiFi Tuner | +0.200 [+0.200, +0.200] * |" in table
    assert report.below_floor(rows) == []
    rows[3] = _row("lora", [0.0] * 4)
    assert [r.method for r in report.below_floor(rows)] == ["lora"]


def test_json_and_plot(tmp_path):
    rows = [_row("base-class", [0.1, 0.2]), _row("hifi", [0.6, 0.9])]
    payload = report.to_json(rows, {"half": "tuning"}, ["red circle", "yellow heart"], {"commit": "x"})
    report.write_json(tmp_path / "e.json", payload)
    back = json.loads((tmp_path / "e.json").read_text())
    assert back["rows"][1]["per_subject"]["subject_fidelity"] == [0.6, 0.9]
    assert back["rows"][1]["interval"]["subject_fidelity"]["low"] == pytest.approx(0.6)
    report.plot_per_subject(rows, ["red circle", "yellow heart"], tmp_path / "e.png")
    with Image.open(tmp_path / "e.png") as im:
        assert im.size[0] > 100 and len(im.convert("RGB").getcolors(maxcolors=1 << 16)) > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.png"]  # no temporary files left


def test_sweeps_on_the_reporting_half_are_refused():
    spec = importlib.util.spec_from_file_location("eval_methods", REPO / "scripts" / "eval_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "--half tuning" in mod.refusal("reporting", sweeping=True, allowed=False)
    assert mod.refusal("reporting", sweeping=True, allowed=True) is None
    assert mod.refusal("reporting", sweeping=False, allowed=False) is None
    assert mod.refusal("tuning", sweeping=True, allowed=False) is None

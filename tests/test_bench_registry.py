"""The method registry (miniworld/registry.py + miniworld/rows/), the report's paired differences, gate and plot
(miniworld/report.py), the one-image table and its pairing with the multi-image table, and eval_methods' refusal to
sweep on the reporting half. No host needed."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from comfyui_personalize.miniworld import registry, report, stats

REPO = Path(__file__).resolve().parents[1]


def test_rows_register_with_their_roles_in_table_order():
    keys = registry.keys()
    assert keys[:6] == ("real", "base-class", "base-full", "ti", "lora", "hifi")
    assert set(keys) >= {"hifi-no-mask", "hifi-no-reg", "hifi-no-stepwise"}
    assert registry.keys(tuned=True, default=True) == ("ti", "lora", "hifi", "profusion-tune")  # ablations: opt-in
    assert registry.keys(gated=True) == ("ti", "lora", "hifi")
    assert registry.keys(baseline=True) == ("base-full", "ti", "lora")
    assert registry.keys(floor=True) == ("base-class",)
    assert registry.keys(tuned=False) == ("real", "base-class", "base-full", "profusion-m0", "profusion")
    # the bounds and the words-only baseline are no methods: no seconds, no paired differences, "-" for "tuned"
    assert registry.keys(personalises=False) == ("real", "base-class", "base-full")
    assert registry.keys(personalises=True, default=True) == ("ti", "lora", "hifi", "profusion-m0", "profusion",
                                                              "profusion-tune")
    # ProFusion's encoder rows are tuning-free methods: they personalise (seconds, bytes, paired differences)
    assert registry.keys(personalises=True, tuned=False) == ("profusion-m0", "profusion")
    assert registry.get("lora").title == "DreamBooth-LoRA (rank 4)"
    assert registry.get("profusion").title == "ProFusion, PromptNet only (m=1)"
    with pytest.raises(ValueError, match="unknown benchmark row 'nope'.*known: real, base-class"):
        registry.get("nope")


def test_a_key_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("ti", "again")(lambda b, heldout, index: None)


def test_bench_scripts_exist_and_run_all_uses_the_registry():
    scripts = registry.bench_scripts()
    assert scripts == ("bench/bench_training.py", "bench/bench_hifi.py", "bench/bench_profusion.py")
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


def _eval_methods():
    spec = importlib.util.spec_from_file_location("eval_methods", REPO / "scripts" / "eval_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweeps_on_the_reporting_half_are_refused():
    mod = _eval_methods()
    assert "--half tuning" in mod.refusal("reporting", sweeping=True, allowed=False)
    assert mod.refusal("reporting", sweeping=True, allowed=True) is None
    assert mod.refusal("reporting", sweeping=False, allowed=False) is None
    assert mod.refusal("tuning", sweeping=True, allowed=False) is None


# ------------------------------------------------------------------------------------------ the one-image protocol

def _full_row(key, scores, seconds=None, shift=0.0):
    """A row with every metric per subject (``scores`` + ``shift`` for each; attributes in [0, 1])."""
    per = {m: [v + shift for v in scores] for m in report.METRICS}
    means = {m: sum(v) / len(v) for m, v in per.items()}
    return FakeRow(key, registry.get(key).title, means["subject_fidelity"], means["prompt_fidelity"],
                   means["image_similarity"], means["attributes"], seconds, 0 if seconds is None else 1000,
                   per_subject=per)


CFG = SimpleNamespace(half="tuning", draws=1, views=4, seen=1, seeds=1, sampler_steps=20, cfg=5.0)


def _cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in line[2:-2].split(" | ")]


def test_one_image_table_columns(monkeypatch):
    """Every metric with its interval, seconds to personalise and "tuned at test time": yes for a tuning row, no
    for a tuning-free encoder row (a registered row with ``tuned=False``), - for the bounds."""
    monkeypatch.setitem(registry._ROWS, "encoder", registry.MethodRow(
        "encoder", "a tuning-free encoder", lambda b, h, i: None, order=70, tuned=False, default=False))
    scores = [0.2, 0.4, 0.6]
    rows = [_full_row("real", scores, shift=0.3), _full_row("base-class", [0.0, 0.1, 0.2]),
            _full_row("ti", scores, seconds=12.34), _full_row("encoder", scores, seconds=0.5)]
    table = report.format_one_image_table(rows, CFG, ["a", "b", "c"])
    lines = table.splitlines()
    assert _cells(lines[0]) == list(report.ONE_IMAGE_COLUMNS) and len(report.ONE_IMAGE_COLUMNS) == 7
    assert lines[1] == "|" + "---|" * 7
    body = [_cells(line) for line in lines[2:6]]
    assert all(len(c) == 7 for c in body) and lines[6] == ""
    assert [c[0] for c in body] == ["real images (world renders)", "base model, class word only",
                                    "Textual Inversion", "a tuning-free encoder"]
    assert [c[5:] for c in body] == [["-", "-"], ["-", "-"], ["12.3", "yes"], ["0.5", "no"]]
    ci = stats.bootstrap(scores)  # each metric's cell is the row's own bootstrap interval over subjects
    assert body[2][1] == body[2][2] == body[2][3] == str(ci)
    assert body[2][4] == f"{100 * ci.mean:.1f} % [{100 * ci.low:.1f}, {100 * ci.high:.1f}]"
    assert "from view 0 alone (the one-image protocol) of each draw's 4 and every row is scored against all 4" \
        in lines[7]
    # the encoder row, not tuned, is a method all the same: it gets paired differences against the baselines
    assert ("encoder", "ti") in report.paired(rows) and not any(a == "real" for a, _ in report.paired(rows))


def test_protocol_gap_pairs_each_method_with_its_multi_image_row():
    multi = [_full_row("base-class", [0.1, 0.1, 0.2]), _full_row("ti", [0.5, 0.6, 0.7], seconds=40.0),
             _full_row("lora", [0.4, 0.3, 0.8], seconds=20.0)]
    one = [multi[0], _full_row("ti", [0.5, 0.6, 0.7], seconds=30.0, shift=-0.25),
           _full_row("lora", [0.5, 0.1, 0.8], seconds=15.0)]
    gap = report.protocol_gap(multi, one)
    assert set(gap) == {"ti", "lora"}  # the bounds are the same rows in both tables: no gap
    assert (gap["ti"].mean, gap["ti"].low, gap["ti"].high) == pytest.approx((-0.25, -0.25, -0.25))
    assert gap["ti"].excludes_zero
    assert gap["lora"] == stats.paired_difference([0.5, 0.1, 0.8], [0.4, 0.3, 0.8])
    assert gap["lora"].mean == pytest.approx(-0.1 / 3) and not gap["lora"].excludes_zero
    text = report.format_protocol_gap(multi, one).splitlines()
    assert len(text) == 6 and _cells(text[2])[0] == "method" and len(_cells(text[2])) == 7
    ti = _cells(text[4])
    assert ti[:4] == ["Textual Inversion", "0.600", "0.350", "-0.250 [-0.250, -0.250] *"]
    assert report.format_protocol_gap(multi, [multi[0]]) == ""  # no method in both: no table


def test_one_image_json_and_file_names(tmp_path):
    rows = [_full_row("base-class", [0.1, 0.2]), _full_row("hifi", [0.6, 0.9], seconds=20.0)]
    rows[1].tuned = True
    payload = report.to_json(rows, {"seen_views": 1}, ["red circle", "yellow heart"], {"commit": "x"}, "one")
    back = json.loads(json.dumps(payload))
    assert back["protocol"] == "one" and back["config"]["seen_views"] == 1
    assert back["rows"][1]["tuned"] is True and back["rows"][1]["tune_seconds"] == 20.0
    assert set(back["rows"][1]["interval"]) == set(report.METRICS)
    assert back["rows"][1]["interval"]["attributes"]["low"] == pytest.approx(0.6)
    one = report.to_json([_full_row("ti", [0.4], seconds=1.0)], {}, ["red circle"], {}, "one")
    one = json.loads(json.dumps(one))["rows"][0]["interval"]["subject_fidelity"]
    assert one["low"] == -math.inf  # one subject: no interval, never a claim
    beside = _eval_methods()._beside
    assert beside("out/e.json", "multi", 2) == Path("out/e.json")
    assert beside("out/e.json", "one", 2) == Path("out/e_one_image.json")
    assert beside("out/e.json", "one", 1) == Path("out/e.json") and beside("", "one", 2) is None


def test_a_one_image_run_pairs_with_an_earlier_multi_image_json_only_when_comparable():
    """`--protocol one --pair-with MULTI.json`: the earlier run's rows come back from its JSON and pair as the
    multi-image rows of the same run would; a run that differs in anything but what the method saw is refused."""
    multi = [_full_row("base-class", [0.1, 0.2]), _full_row("ti", [0.5, 0.7], seconds=40.0)]
    cfg = {"half": "reporting", "subjects": 2, "draws": 2, "views": 4, "seeds": 2, "ti_steps": 300,
           "seen_views": None, "methods": None}
    header = {"weights_sha256": "abc", "threads": 1}
    payload = json.loads(json.dumps(report.to_json(multi, cfg, ["a", "b"], header)))
    back = report.rows_from_json(payload)
    assert [(r.method, r.per_subject) for r in back] == [(r.method, r.per_subject) for r in multi]
    one = [_full_row("ti", [0.5, 0.7], seconds=30.0, shift=-0.2)]
    assert report.format_protocol_gap(back, one) == report.format_protocol_gap(multi, one)
    mine = {**cfg, "seen_views": 1, "methods": ["ti"]}
    assert report.unpaired(payload, mine, ["a", "b"], header) == []
    del payload["protocol"]  # written before the protocols existed: a multi-image run
    assert report.unpaired(payload, mine, ["a", "b"], header) == []
    assert report.unpaired(payload, {**mine, "ti_steps": 100}, ["a", "b"], header) == ["ti_steps 300 against 100"]
    assert "subjects" in report.unpaired(payload, mine, ["b", "a"], header)[0]
    assert report.unpaired(payload, mine, ["a", "b"], {**header, "threads": 2}) == ["threads 1 against 2"]
    payload["protocol"] = "one"
    assert "not a multi-image one" in report.unpaired(payload, mine, ["a", "b"], header)[0]


def test_new_one_image_rows_join_an_earlier_one_image_run():
    """`--protocol one --pair-with ONE.json --methods profusion`: the earlier one-image run's other rows join this
    run's in table order (this run's own rows, the bounds included, win), and the paired differences of the new row
    against the earlier run's baselines are those a single run of all rows would give; an earlier one-image run is
    refused where a multi-image one is expected and the other way round."""
    earlier = [_full_row("base-class", [0.1, 0.2]), _full_row("base-full", [0.5, 0.6]),
               _full_row("ti", [0.4, 0.6], seconds=40.0), _full_row("lora", [0.3, 0.5], seconds=30.0)]
    cfg = {"half": "reporting", "subjects": 2, "draws": 2, "views": 4, "seeds": 2, "seen_views": 1, "methods": None}
    header = {"weights_sha256": "abc", "threads": 1}
    payload = json.loads(json.dumps(report.to_json(earlier, cfg, ["a", "b"], header, "one")))
    mine = {**cfg, "methods": ["profusion"]}
    assert report.unpaired(payload, mine, ["a", "b"], header, "one") == []
    assert "not a multi-image one" in report.unpaired(payload, mine, ["a", "b"], header)[0]
    multi = json.loads(json.dumps(report.to_json(earlier, {**cfg, "seen_views": None}, ["a", "b"], header)))
    assert "not a one-image one" in report.unpaired(multi, mine, ["a", "b"], header, "one")[0]
    new = [_full_row("base-class", [0.1, 0.25]), _full_row("profusion", [0.7, 0.9], seconds=2.0)]
    rows, joined = report.join_rows(new, report.rows_from_json(payload))
    assert [r.method for r in rows] == ["base-class", "base-full", "ti", "lora", "profusion"]
    assert joined == ["base-full", "ti", "lora"] and rows[0] is new[0]
    together = report.paired([*earlier[1:], new[1]])
    for metric in ("subject_fidelity", "prompt_fidelity"):
        got = report.paired(rows, metric)
        for b in ("base-full", "ti", "lora"):
            assert vars(got[("profusion", b)]) == vars(report.paired([*earlier[1:], new[1]], metric)[("profusion", b)])
    assert together[("profusion", "ti")].mean == pytest.approx(0.3)

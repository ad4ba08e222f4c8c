"""The pack's node definitions are a public API: node ids, input names, types, defaults, ranges, combo options,
required/optional, output types and names must stay exactly as they were when the pack still used V1 node classes.

``tests/data/node_api_v1.json`` was dumped from the V1 pack (commit bc03951, ComfyUI v0.3.75) with::

    COMFYUI_PATH=... python tests/test_node_api.py > tests/data/node_api_v1.json

A node added later gets its entry added the same way, the existing entries left as they are::

    COMFYUI_PATH=... python tests/test_node_api.py --add PersonalizeNewNode

(from then on its definition is held like the others').

The dump reads what ComfyUI's ``/object_info`` reads (``INPUT_TYPES()``, ``RETURN_TYPES``, ``RETURN_NAMES``,
``OUTPUT_NODE``, ``CATEGORY``, the display name), so it works for V1 classes and, through ComfyUI's V1
compatibility layer, for V3 ``io.ComfyNode`` classes alike. Both forms of a combo (V1: the option list as the type;
V3: ``"COMBO"`` with ``options``) are normalised to ``{"type": "COMBO", "options": [...]}``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "data" / "node_api_v1.json"

# Options that must stay identical (the widget's shape and value range). Tooltips and descriptions may be edited.
COMPARED_OPTIONS = ("default", "min", "max", "step", "round", "multiline", "forceInput", "control_after_generate")
# Combos whose options are the files of a model folder (they depend on the machine, not on the pack).
FOLDER_COMBOS = {("PersonalizeLoadMiniModel", "ckpt_name"): "personalize_mini",
                 ("PersonalizeHiFiLoadSubject", "subject_file"): "personalize_subjects",
                 ("PersonalizeLoadMiniCLIPVision", "clip_name"): "personalize_clip_vision",
                 ("PersonalizePromptNetLoader", "promptnet_name"): "promptnet"}


def _input(node_id: str, name: str, spec) -> dict:
    spec = tuple(spec)
    io_type, opts = spec[0], (dict(spec[1]) if len(spec) > 1 and spec[1] else {})
    out: dict = {}
    if isinstance(io_type, (list, tuple)):
        out["type"], out["options"] = "COMBO", list(io_type)
    elif io_type == "COMBO":
        out["type"], out["options"] = "COMBO", list(opts.get("options") or [])
    else:
        out["type"] = str(io_type)
    if (node_id, name) in FOLDER_COMBOS:
        out["options"] = {"folder": FOLDER_COMBOS[(node_id, name)]}
    for key in COMPARED_OPTIONS:
        if key in opts:
            out[key] = opts[key]
    if opts.get("tooltip"):
        out["tooltip"] = opts["tooltip"]
    return out


def node_api(node_class_mappings: dict, display_names: dict, node_ids) -> dict:
    """``{node_id: definition}`` in a normal form (see the module docstring)."""
    api = {}
    for node_id in sorted(node_ids):
        cls = node_class_mappings[node_id]
        spec = cls.INPUT_TYPES()
        inputs = {section: {name: _input(node_id, name, s) for name, s in (spec.get(section) or {}).items()}
                  for section in ("required", "optional")}
        hidden = {name: (s[0] if isinstance(s, (list, tuple)) else s) for name, s in (spec.get("hidden") or {}).items()}
        types = [str(t) for t in cls.RETURN_TYPES]
        names = list(getattr(cls, "RETURN_NAMES", None) or types)
        api[node_id] = {
            "display_name": display_names.get(node_id, node_id),
            "category": cls.CATEGORY,
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
            "description": getattr(cls, "DESCRIPTION", "") or "",
            "input_order": {k: list(v) for k, v in inputs.items()},
            "inputs": inputs,
            "hidden": hidden,
            "outputs": [{"type": t, "name": n} for t, n in zip(types, names)],
        }
    return api


def _strip_text(d: dict) -> dict:
    """A definition without tooltips and description (compared separately, for presence only)."""
    d = json.loads(json.dumps(d))
    d.pop("description", None)
    for section in d["inputs"].values():
        for spec in section.values():
            spec.pop("tooltip", None)
            if spec.get("multiline") is False:  # V3's String.Input always writes it; False is V1's default
                del spec["multiline"]
    return d


@pytest.fixture(scope="module")
def current(host):
    return node_api(host.nodes.NODE_CLASS_MAPPINGS, host.nodes.NODE_DISPLAY_NAME_MAPPINGS, host.pack_node_ids)


@pytest.fixture(scope="module")
def v1():
    return json.loads(FIXTURE.read_text())


def test_same_node_ids(current, v1):
    assert sorted(current) == sorted(v1)


@pytest.mark.parametrize("node_id", sorted(json.loads(FIXTURE.read_text())) if FIXTURE.exists() else [])
def test_node_definition_unchanged(host, current, v1, node_id):
    now, before = _strip_text(current[node_id]), _strip_text(v1[node_id])
    for key in ("display_name", "category", "output_node", "outputs", "hidden"):
        assert now[key] == before[key], (node_id, key)
    # input names, order and required/optional; inputs may be added after the existing ones, optional only (a
    # saved workflow's widget values stay in place and a new input takes its default)
    for section in ("required", "optional"):
        kept, added = before["input_order"].get(section, []), now["input_order"].get(section, [])
        assert added[:len(kept)] == kept, (node_id, section)
    assert now["input_order"].get("required", []) == before["input_order"].get("required", []), (
        node_id, "a required input was added")
    for section, specs in before["inputs"].items():
        for name, spec in specs.items():
            assert now["inputs"][section][name] == spec, (node_id, section, name)
    # folder combos list the folder's current files
    for (nid, name), folder in FOLDER_COMBOS.items():
        if nid == node_id:
            raw = host.nodes.NODE_CLASS_MAPPINGS[nid].INPUT_TYPES()["required"][name]
            options = raw[0] if isinstance(raw[0], (list, tuple)) else raw[1]["options"]
            assert list(options) == _folder_files(host, nid, folder)


def _folder_files(host, node_id: str, folder: str) -> list[str]:
    """The folder's files; for Load Mini Model less those the pack ships for other kinds under its models/ (its
    folder lists subfolders: models/clip_vision/ holds the CLIP vision tower, not a checkpoint)."""
    files = list(host.folder_paths.get_filename_list(folder))
    if node_id != "PersonalizeLoadMiniModel":
        return files
    pack_models = (Path(host.pack_module.__file__).resolve().parent / "models").resolve()
    shipped = {Path(k.shipped).resolve() for k in host.pack("core.artifacts").registered_kinds() if k.shipped}
    others = {s for s in shipped if s != pack_models and pack_models in s.parents}
    return [f for f in files if not any(s in Path(host.folder_paths.get_full_path(folder, f)).resolve().parents
                                        for s in others)]


def test_tooltips_and_descriptions_kept(current, v1):
    """Every input that had a tooltip still has one, every node still has its description."""
    for node_id, before in v1.items():
        now = current[node_id]
        assert now["description"], node_id
        for section, specs in before["inputs"].items():
            for name, spec in specs.items():
                if spec.get("tooltip"):
                    assert now["inputs"][section][name].get("tooltip"), (node_id, name)


def test_no_v1_node_classes(host):
    """Every node of the pack is a V3 ``io.ComfyNode`` of the pinned API version."""
    from comfy_api.v0_0_2 import io
    for node_id in host.pack_node_ids:
        cls = host.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert issubclass(cls, io.ComfyNode), node_id
        assert "FUNCTION" not in vars(cls) and "INPUT_TYPES" not in vars(cls), node_id


if __name__ == "__main__":  # dump the booted pack's definitions, or add new nodes' (see the module docstring)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from harness.host import boot_scratch

    h = boot_scratch()
    if sys.argv[1:2] == ["--add"]:
        kept = json.loads(FIXTURE.read_text())
        added = node_api(h.nodes.NODE_CLASS_MAPPINGS, h.nodes.NODE_DISPLAY_NAME_MAPPINGS, sys.argv[2:])
        if set(added) & set(kept):
            sys.exit(f"already in {FIXTURE.name}: {sorted(set(added) & set(kept))} (existing entries are not changed)")
        merged = {**kept, **added}
        tmp = FIXTURE.with_name(FIXTURE.name + ".tmp")
        tmp.write_text(json.dumps({k: merged[k] for k in sorted(merged)}, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, FIXTURE)
    else:
        print(json.dumps(node_api(h.nodes.NODE_CLASS_MAPPINGS, h.nodes.NODE_DISPLAY_NAME_MAPPINGS, h.pack_node_ids),
                         indent=1, sort_keys=False))


V1_WORKFLOWS = sorted((Path(__file__).resolve().parent / "data" / "workflows_v1").glob("*.json"))


def test_v1_workflows_kept():
    assert len(V1_WORKFLOWS) == 8


def _v1_spec(definition: dict) -> dict:
    """An ``INPUT_TYPES()``-shaped spec rebuilt from the V1 fixture (V1's combo form: the option list as type)."""
    spec = {}
    for section in ("required", "optional"):
        spec[section] = {}
        for name, s in definition["inputs"][section].items():
            kind = s["type"]
            if kind == "COMBO":
                kind = s["options"] if isinstance(s["options"], list) else []
            spec[section][name] = (kind, {k: s[k] for k in COMPARED_OPTIONS if k in s})
    return spec


@pytest.mark.parametrize("path", V1_WORKFLOWS, ids=lambda p: p.stem)
def test_v1_workflow_widgets_map_alike(host, v1, path):
    """harness/ui_convert maps a saved node's widgets_values (seed control values included) onto the same input
    names and values with the V3 classes as with the V1 definitions."""
    from harness.ui_convert import map_widget_values
    nodes = [n for n in json.loads(path.read_text())["nodes"] if n["type"] in v1]
    assert nodes
    for n in nodes:
        before = map_widget_values(_v1_spec(v1[n["type"]]), n.get("widgets_values"))
        now = map_widget_values(host.nodes.NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES(), n.get("widgets_values"))
        assert now == before, (path.name, n["type"])
        assert before, (path.name, n["type"])


@pytest.mark.parametrize("path", V1_WORKFLOWS, ids=lambda p: p.stem)
def test_v1_workflow_runs(host, run_ui_workflow, ckpt_sd15, ckpt_mini, demo_subject_folder, path):
    """A workflow a user saved with the V1 pack (the shipped files of commit bc03951, unchanged) converts with the
    migrated node definitions and runs through ComfyUI's executor. A fixture byte-identical to the shipped file of
    the same name is already run by tests/test_workflows.py (skipped here, to spend the CPU once)."""
    shipped = Path(__file__).resolve().parents[1] / "workflows" / path.name
    if shipped.exists() and shipped.read_bytes() == path.read_bytes():
        pytest.skip(f"identical to workflows/{path.name}, which tests/test_workflows.py runs")
    from helpers import assert_saved_images

    assert_saved_images(run_ui_workflow(path))

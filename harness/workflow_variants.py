"""What the tests and the thumbnails run in place of a shipped ``_sd15`` workflow, which needs a real SD1.5 checkpoint.

``workflows/<method>_sd15.json`` stays what a user needs (512 px, the papers' step counts, the checkpoint
``v1-5-pruned-emaonly-fp16.safetensors``). These helpers load such a file and substitute values by input name:

* :func:`for_test`: the tiny random SD1.5 test checkpoint, 64 px and a few steps (``build_workflows.SD15_FAST``), so
  that the executor and the browser test run it in seconds;
* :func:`on_mini_model`: the shipped mini model in place of the checkpoint (Load Mini Model, same MODEL/CLIP/VAE
  outputs) at 64 px, every other value the file's own (``build_workflows.SD15_AT_64``): what
  ``scripts/render_thumbnails.py`` runs for an ``_sd15`` thumbnail.

The substituted values come from ``scripts/build_workflows.py`` building the same graph with another target, so they
follow the file when its settings change; a file whose nodes differ from the script's graph is refused (rebuild it).
Other workflows (``_mini``, the mini-world ones) are returned unchanged: they run as shipped.
"""
from __future__ import annotations

import copy
import importlib
import sys
from typing import Any

from . import REPO_ROOT

SEED_INPUT_NAMES = ("seed", "noise_seed")  # build_workflows writes a control value ("fixed") after these
MINI_LOADER = "PersonalizeLoadMiniModel"
VIRTUAL = ("Note", "MarkdownNote")


def build_workflows():
    """``scripts/build_workflows.py`` as a module (the graphs and their targets)."""
    scripts = str(REPO_ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("build_workflows")


def is_sd15(name: str) -> bool:
    return name.endswith("_sd15")


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def widget_names(class_type: str, mappings: dict) -> list[str | None]:
    """Input name of each ``widgets_values`` slot as build_workflows writes them (None: a seed's control value)."""
    spec = mappings[class_type].INPUT_TYPES()
    names: list[str | None] = []
    for section in ("required", "optional"):
        for name, s in (spec.get(section) or {}).items():
            if _is_widget(s):
                names.append(name)
                if name in SEED_INPUT_NAMES:
                    names.append(None)
    return names


def set_values(workflow: dict, values: dict[int, dict[str, Any]], mappings: dict) -> dict:
    """A copy of a UI workflow with widget values set by node id and input name."""
    out = copy.deepcopy(workflow)
    nodes = {n["id"]: n for n in out["nodes"]}
    for nid, inputs in values.items():
        node = nodes[nid]
        names = widget_names(node["type"], mappings)
        if len(names) != len(node["widgets_values"]):
            raise ValueError(f"node {nid} ({node['type']}) has {len(node['widgets_values'])} widget values, its "
                             f"inputs {len(names)}: rebuild the workflow (scripts/build_workflows.py)")
        for name, value in inputs.items():
            node["widgets_values"][names.index(name)] = value
    return out


def _values_of(name: str, workflow: dict, target, mappings: dict) -> dict[int, dict[str, Any]]:
    """The widget values of ``target``'s graph that differ from the file's, after checking that the file has the
    graph's nodes (ids and types)."""
    graph = build_workflows().graph(name, target)
    in_file = {n["id"]: n for n in workflow["nodes"] if n["type"] not in VIRTUAL}
    if {n[0]: n[1] for n in graph} != {nid: n["type"] for nid, n in in_file.items()}:
        raise ValueError(f"workflows/{name}.json does not have the nodes scripts/build_workflows.py builds: rebuild it")
    changed: dict[int, dict[str, Any]] = {}
    for nid, ctype, values, *_ in graph:
        current = dict(zip(widget_names(ctype, mappings), in_file[nid]["widgets_values"]))
        for key, value in values.items():
            if not isinstance(value, tuple) and current.get(key) != value:
                changed.setdefault(nid, {})[key] = value
    return changed


def for_test(name: str, workflow: dict, ckpt_name: str, mappings: dict) -> dict:
    """The workflow the tests run for ``name``: an ``_sd15`` one on the checkpoint ``ckpt_name`` (the tiny random
    SD1.5 fixture) at 64 px with a few steps; any other unchanged."""
    if not is_sd15(name):
        return workflow
    bw = build_workflows()
    values = _values_of(name, workflow, bw.SD15_FAST, mappings)
    values.setdefault(1, {})["ckpt_name"] = ckpt_name
    return set_values(workflow, values, mappings)


def on_mini_model(name: str, workflow: dict, mappings: dict) -> dict:
    """An ``_sd15`` workflow on the shipped mini model: its checkpoint loader (node 1) swapped for Load Mini Model
    (mini_world.safetensors; the same MODEL, CLIP, VAE outputs) and 64 px; every other value the file's own. Any
    other workflow unchanged."""
    if not is_sd15(name):
        return workflow
    bw = build_workflows()
    out = set_values(workflow, _values_of(name, workflow, bw.SD15_AT_64, mappings), mappings)
    loader = next(n for n in out["nodes"] if n["id"] == 1)
    loader.update(type=MINI_LOADER, title="Load Mini Model (in place of SD1.5)", widgets_values=[bw.MINI_CKPT],
                  properties={"Node name for S&R": MINI_LOADER})
    return out

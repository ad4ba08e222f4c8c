"""Convert UI-format workflows (what ComfyUI's "Save" writes and users share) into API-format prompts.

A Python port of the frontend's ``graphToPrompt`` (``comfyui_frontend_package`` 1.27 to 1.32, the versions the
supported hosts pin: ``ExecutableNodeDTO.resolveInput/resolveOutput``; files saved by older frontends are read the
way the current one migrates them), following docs/comfyui-host.md section 9.4:

* muted nodes (mode 2) are skipped; inputs that pointed at them are removed ("dangling");
* bypassed nodes (mode 4) pass one of their inputs through: the input at the same index as the requested output
  when its type fits, else the first input of exactly the wanted type, else the first compatible one;
* ``Reroute`` / ``PrimitiveNode`` / ``Note`` / ``MarkdownNote`` are virtual: links are followed through Reroutes,
  and a PrimitiveNode writes its value into the widget of each input it feeds;
* ``widgets_values`` map positionally onto the widget inputs of ``INPUT_TYPES`` (required then optional; a widget is
  INT/FLOAT/STRING/BOOLEAN/COMBO or a list). The frontend adds a ``control_after_generate`` widget after INT inputs
  named ``seed``/``noise_seed`` or declaring ``control_after_generate`` (and a control + filter-list pair after COMBO
  inputs declaring it); those values are skipped. A widget converted to an input keeps its slot in
  ``widgets_values``; when linked, the link wins.
* links are read from ``links`` as arrays ``[id, origin_id, origin_slot, target_id, target_slot, type]`` or as
  objects (``{"id", "origin_id", "origin_slot", "target_id", "target_slot", "type"}``, newer frontends); a node
  input is resolved through its ``link`` id, so compressed input lists (2025 saves drop unlinked widget sockets) work.

Subgraphs and legacy group nodes are rejected with a clear error.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

MODE_ALWAYS = 0
MODE_NEVER = 2  # "muted"
MODE_BYPASS = 4

VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_INPUT_NAMES = frozenset({"seed", "noise_seed"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})


class WorkflowConversionError(ValueError):
    """The UI workflow cannot be converted."""


class MissingNodeTypeError(WorkflowConversionError):
    def __init__(self, node_type: str, node_id: Any):
        self.node_type = node_type
        self.node_id = node_id
        super().__init__(f"missing node type {node_type!r} (node {node_id}) — is the pack installed?")


def load_workflow(path: str | Path) -> dict:
    """Read a workflow JSON file (UI or API format)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def is_ui_workflow(data: dict) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def is_api_prompt(data: dict) -> bool:
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


# ----------------------------------------------------------------------------------------------------------------
# Input specs


def _default_mappings() -> dict:
    from . import host as host_mod

    host = host_mod.current_host()
    if host is None:
        raise WorkflowConversionError("ui_to_api needs node_class_mappings or object_info when no host is booted")
    return host.nodes.NODE_CLASS_MAPPINGS


def _spec_getter(node_class_mappings: dict | None, object_info: dict | None) -> Callable[[str], dict | None]:
    """Returns class_type -> {"required": {...}, "optional": {...}} or None when unknown."""
    if object_info is not None:
        def from_object_info(class_type: str) -> dict | None:
            info = object_info.get(class_type)
            if info is None:
                return None
            inputs = info.get("input", {})
            return {"required": inputs.get("required") or {}, "optional": inputs.get("optional") or {}}
        return from_object_info

    mappings = node_class_mappings if node_class_mappings is not None else _default_mappings()
    cache: dict[str, dict] = {}

    def from_classes(class_type: str) -> dict | None:
        cls = mappings.get(class_type)
        if cls is None:
            return None
        if class_type not in cache:
            spec = cls.INPUT_TYPES()
            cache[class_type] = {"required": spec.get("required") or {}, "optional": spec.get("optional") or {}}
        return cache[class_type]
    return from_classes


def _is_widget(spec: Any) -> bool:
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or (isinstance(kind, str) and kind in WIDGET_TYPES)


def _options(spec: Any) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_combo(spec: Any) -> bool:
    return isinstance(spec[0], (list, tuple)) or spec[0] == "COMBO"


def _control_widget_count(name: str, spec: Any) -> int:
    """Extra frontend-only widgets created after this widget (their values sit in ``widgets_values``)."""
    opts = _options(spec)
    if spec[0] == "INT" and (name in SEED_INPUT_NAMES or opts.get("control_after_generate")):
        return 1
    if _is_combo(spec) and opts.get("control_after_generate"):
        return 2  # control value + filter list
    return 0


def _widget_inputs(spec: dict, include_force_input: bool) -> list[tuple[str, Any]]:
    out = []
    for section in ("required", "optional"):
        for name, input_spec in (spec.get(section) or {}).items():
            if not _is_widget(input_spec):
                continue
            if _options(input_spec).get("forceInput") and not include_force_input:
                continue
            out.append((name, input_spec))
    return out


def map_widget_values(spec: dict, values: Any, node_label: str = "") -> dict:
    """Map a node's ``widgets_values`` onto input names."""
    if isinstance(values, dict):  # some frontends/extensions store widgets by name
        return {k: v for k, v in values.items() if k in (spec.get("required") or {}) or k in (spec.get("optional") or {})}
    values = list(values or [])
    widgets = _widget_inputs(spec, include_force_input=False)
    # Files saved by older (2024) frontends have values for the hidden widgets of forceInput inputs too; the current
    # frontend migrates such lists when the count matches (migrateWidgetsValues). Do the same.
    with_force = _widget_inputs(spec, include_force_input=True)
    if len(with_force) != len(widgets):
        count = sum(1 + _control_widget_count(n, s) for n, s in with_force)
        if count == len(values):
            widgets = with_force
    mapped: dict[str, Any] = {}
    i = 0
    for name, input_spec in widgets:
        if i >= len(values):
            break
        mapped[name] = values[i]
        i += 1
        extra = _control_widget_count(name, input_spec)
        if extra and i < len(values) and isinstance(values[i], str) and values[i] in CONTROL_VALUES:
            i += 1
            if extra == 2 and i < len(values) and isinstance(values[i], str):
                i += 1
    if i < len(values):
        log.debug("%s: %d trailing widget value(s) ignored: %r", node_label, len(values) - i, values[i:])
    return mapped


# ----------------------------------------------------------------------------------------------------------------
# Graph


def _normalise_links(links: Iterable) -> dict:
    out = {}
    for link in links or []:
        if isinstance(link, dict):
            lid = link.get("id")
            entry = (link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                     link.get("target_slot"), link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            lid = link[0]
            entry = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
        else:
            raise WorkflowConversionError(f"unreadable link entry {link!r}")
        if lid is not None:
            out[lid] = entry
    return out


def _is_valid_connection(a: Any, b: Any) -> bool:
    """LiteGraph.isValidConnection for type strings."""
    if not a or not b or a == "*" or b == "*" or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if a == b:
        return True
    if "," not in a and "," not in b:
        return False
    return bool(set(a.split(",")) & set(b.split(",")))


class _Graph:
    def __init__(self, workflow: dict):
        self.nodes = {str(n["id"]): n for n in workflow["nodes"]}
        self.links = _normalise_links(workflow.get("links"))

    def link(self, link_id: Any):
        return self.links.get(link_id)

    def resolve_input(self, node: dict, slot: int, wanted_type: Any = None, visited: set | None = None):
        """(origin node id, origin slot) feeding ``node.inputs[slot]``, or None."""
        visited = set() if visited is None else visited
        key = f"{node['id']}[I]{slot}"
        if key in visited:
            raise WorkflowConversionError(f"circular link through node {node['id']}")
        visited.add(key)
        inputs = node.get("inputs") or []
        if slot >= len(inputs):
            return None
        inp = inputs[slot]
        link_id = inp.get("link")
        if link_id is None:
            return None
        link = self.link(link_id)
        if link is None:
            log.warning("node %s input %r refers to missing link %s; dropped", node["id"], inp.get("name"), link_id)
            return None
        origin = self.nodes.get(str(link[0]))
        if origin is None:
            return None
        return self.resolve_output(origin, int(link[1]), wanted_type or inp.get("type"), visited)

    def resolve_output(self, node: dict, slot: int, wanted_type: Any, visited: set):
        key = f"{node['id']}[O]{slot}"
        if key in visited:
            raise WorkflowConversionError(f"circular link through node {node['id']}")
        visited.add(key)
        if node.get("mode") == MODE_BYPASS:
            index = self._bypass_slot_index(node, slot, wanted_type)
            if index == -1:
                return None
            return self.resolve_input(node, index, None, visited)
        if node.get("type") in VIRTUAL_NODE_TYPES:
            if slot < len(node.get("inputs") or []):
                return self.resolve_input(node, slot, wanted_type, visited)
            return None  # PrimitiveNode: its value is applied to the target widget instead
        return (str(node["id"]), slot)

    @staticmethod
    def _bypass_slot_index(node: dict, slot: int, wanted_type: Any) -> int:
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        output_type = outputs[slot].get("type") if slot < len(outputs) else None
        if wanted_type in ("*", "", None):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        if slot < len(inputs):
            opposite = inputs[slot].get("type")
            if _is_valid_connection(opposite, output_type) and _is_valid_connection(opposite, wanted_type):
                return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == wanted_type:
                return i
        for i, inp in enumerate(inputs):
            if _is_valid_connection(inp.get("type"), output_type) and _is_valid_connection(inp.get("type"), wanted_type):
                return i
        return -1

    def primitive_overrides(self) -> dict:
        """node id -> {widget name: value} written by PrimitiveNodes (frontend applyToGraph)."""
        overrides: dict[str, dict] = {}
        for node in self.nodes.values():
            if node.get("type") != "PrimitiveNode":
                continue
            values = node.get("widgets_values") or []
            if not values:
                continue
            value = values[0]
            for out in node.get("outputs") or []:
                for link_id in out.get("links") or []:
                    link = self.link(link_id)
                    if link is None:
                        continue
                    target = self.nodes.get(str(link[2]))
                    if target is None:
                        continue
                    inp = next((i for i in target.get("inputs") or [] if i.get("link") == link_id), None)
                    if inp is None:
                        continue
                    widget = inp.get("widget") or {}
                    name = widget.get("name") or inp.get("name")
                    overrides.setdefault(str(target["id"]), {})[name] = value
        return overrides


def ui_to_api(workflow: dict, node_class_mappings: dict | None = None, *, object_info: dict | None = None,
              include_meta: bool = False) -> dict:
    """Convert a UI-format workflow to an API-format prompt.

    ``node_class_mappings`` defaults to the booted host's ``nodes.NODE_CLASS_MAPPINGS``; alternatively pass the
    server's ``/object_info`` as ``object_info``. An API-format dict is returned unchanged (deep-copied).
    """
    if is_api_prompt(workflow) and not is_ui_workflow(workflow):
        return json.loads(json.dumps(workflow))
    if not is_ui_workflow(workflow):
        raise WorkflowConversionError("not a UI-format workflow (no 'nodes' list)")
    subgraph_ids = {str(sg.get("id")) for sg in (workflow.get("definitions") or {}).get("subgraphs") or []}
    get_spec = _spec_getter(node_class_mappings, object_info)
    graph = _Graph(workflow)
    overrides = graph.primitive_overrides()

    output: dict[str, dict] = {}
    for node_id, node in graph.nodes.items():
        node_type = node.get("type")
        mode = node.get("mode", MODE_ALWAYS)
        if node_type in VIRTUAL_NODE_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        if str(node_type) in subgraph_ids:
            raise WorkflowConversionError(
                f"node {node_id} is a subgraph instance; subgraphs are not supported by ui_to_api "
                "(unpack the subgraph in the editor, or export the API format)")
        if isinstance(node_type, str) and (node_type.startswith("workflow/") or node_type.startswith("workflow>")):
            raise WorkflowConversionError(
                f"node {node_id} is a group node ({node_type}); convert it to nodes or export the API format")
        spec = get_spec(node_type)
        if spec is None:
            raise MissingNodeTypeError(node_type, node_id)

        inputs = map_widget_values(spec, node.get("widgets_values"), f"node {node_id} ({node_type})")
        inputs.update(overrides.get(node_id, {}))
        for slot, inp in enumerate(node.get("inputs") or []):
            if inp.get("link") is None:
                continue
            resolved = graph.resolve_input(node, slot)
            if resolved is not None:
                inputs[inp["name"]] = [resolved[0], int(resolved[1])]
        entry: dict[str, Any] = {"inputs": inputs, "class_type": node_type}
        if include_meta:
            entry["_meta"] = {"title": node.get("title") or node_type}
        output[node_id] = entry

    for entry in output.values():  # remove inputs connected to removed (muted) nodes
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in output:
                del entry["inputs"][name]
    return output


def load_api_prompt(path_or_dict: str | Path | dict, node_class_mappings: dict | None = None, **kw) -> dict:
    """A workflow file/dict in either format, as an API prompt."""
    data = load_workflow(path_or_dict) if not isinstance(path_or_dict, dict) else path_or_dict
    return ui_to_api(data, node_class_mappings, **kw)

"""Node help pages: ``web/docs/<NodeId>.md`` for every node of the pack, in step with the node definitions.

ComfyUI's node-help panel (frontend >= 1.2x, ``NodeHelpService.fetchCustomNodeHelp``) takes the pack name from the
node's ``python_module`` (``custom_nodes.<folder>``) and fetches ``/extensions/<folder>/docs/<NodeId>.md``
(after ``/extensions/<folder>/docs/<NodeId>/<locale>.md``). The host serves ``/extensions/<name>/`` for every
entry of ``nodes.EXTENSION_WEB_DIRS``, which the pack's ``WEB_DIRECTORY`` fills under the folder name.

Input and output names are read from the classes the booted host registered (``INPUT_TYPES()`` and
``RETURN_NAMES``; V3 ``io.ComfyNode`` classes expose both through ComfyUI's compatibility layer), so the pages
cannot drift from the nodes: every socket and widget is documented, and no page documents one the node lacks.
"""
from __future__ import annotations

import re
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

DOCS_DIR = Path(__file__).resolve().parents[1] / "web" / "docs"

# A table row whose first cell is a backticked name: "| `name` | TYPE | ... |".
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|")


def _inputs(cls) -> list[str]:
    spec = cls.INPUT_TYPES()
    return [name for section in ("required", "optional") for name in (spec.get(section) or {})]


def _outputs(cls) -> list[str]:
    names = getattr(cls, "RETURN_NAMES", None)
    return list(names) if names else list(cls.RETURN_TYPES)


def _section_names(text: str, heading: str) -> list[str]:
    """The backticked first-column names of the table under ``## <heading>`` (up to the next ``## ``)."""
    match = re.search(rf"^## {heading}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return [m.group(1) for line in match.group(1).splitlines() if (m := _ROW.match(line.strip()))]


def _page(node_id: str) -> str:
    """The page's text, or "" when it is missing (test_every_node_has_a_page reports that)."""
    path = DOCS_DIR / f"{node_id}.md"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def test_every_node_has_a_page(host):
    assert host.pack_node_ids
    missing = [i for i in host.pack_node_ids if not (DOCS_DIR / f"{i}.md").is_file()]
    assert not missing, f"nodes without web/docs/<id>.md: {missing}"


def test_no_page_without_a_node(host):
    pages = {p.stem for p in DOCS_DIR.glob("*.md")}
    assert pages <= set(host.pack_node_ids), f"help pages for unknown nodes: {sorted(pages - set(host.pack_node_ids))}"


def test_pages_document_every_input_and_output(host):
    problems = []
    for node_id in host.pack_node_ids:
        text, cls = _page(node_id), host.node_class(node_id)
        if not text:
            continue
        table_inputs, table_outputs = _section_names(text, "Inputs"), _section_names(text, "Outputs")
        for name in _inputs(cls):
            if name not in table_inputs:
                problems.append(f"{node_id}: input `{name}` is not in the Inputs table")
        for name in _outputs(cls):
            if name not in table_outputs:
                problems.append(f"{node_id}: output `{name}` is not in the Outputs table")
    assert not problems, "\n".join(problems)


def test_pages_name_no_input_or_output_the_node_lacks(host):
    problems = []
    for node_id in host.pack_node_ids:
        text, cls = _page(node_id), host.node_class(node_id)
        if not text:
            continue
        inputs, outputs = set(_inputs(cls)), set(_outputs(cls))
        for name in _section_names(text, "Inputs"):
            if name not in inputs:
                problems.append(f"{node_id}: the page documents input `{name}`, the node has {sorted(inputs)}")
        for name in _section_names(text, "Outputs"):
            if name not in outputs:
                problems.append(f"{node_id}: the page documents output `{name}`, the node has {sorted(outputs)}")
        table = _section_names(text, "Inputs")
        if len(table) != len(set(table)):
            problems.append(f"{node_id}: an input is documented twice")
    assert not problems, "\n".join(problems)


def _table_cells(text: str, heading: str) -> dict[str, list[str]]:
    match = re.search(rf"^## {heading}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    rows = {}
    for line in (match.group(1).splitlines() if match else []):
        if _ROW.match(line.strip()):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _same_default(documented: str, spec: dict) -> bool:
    text = documented.strip("`")
    if "default" not in spec:
        return text == "–"
    value = spec["default"]
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return text == (value if value != "" else "(empty)")


def test_pages_show_the_nodes_types_and_defaults(host):
    """The Type and Default columns match the node's INPUT_TYPES (so a changed default shows up here)."""
    problems = []
    for node_id in host.pack_node_ids:
        text, cls = _page(node_id), host.node_class(node_id)
        if not text:
            continue
        rows, spec = _table_cells(text, "Inputs"), cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in (spec.get(section) or {}).items():
                if name not in rows:
                    continue  # reported by test_pages_document_every_input_and_output
                kind = entry[0] if isinstance(entry[0], str) else "COMBO"
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                doc_type, doc_default = rows[name][0], rows[name][1]
                if doc_type != kind:
                    problems.append(f"{node_id}.{name}: type {doc_type!r} on the page, {kind!r} in the node")
                if not _same_default(doc_default, options):
                    problems.append(f"{node_id}.{name}: default {doc_default!r} on the page, "
                                    f"{options.get('default', '(none)')!r} in the node")
    assert not problems, "\n".join(problems)


def test_pages_have_the_sections_the_panel_shows():
    for path in sorted(DOCS_DIR.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        assert text.startswith("# "), f"{path.name}: starts without a '# <display name>' title"
        for heading in ("How to wire it", "Inputs", "Outputs"):
            assert re.search(rf"^## {heading}\s*$", text, re.M), f"{path.name}: no '## {heading}' section"
        for arxiv in re.findall(r"arXiv[: ]+(\S+?)[).,;]?(?:\s|$)", text):
            assert re.fullmatch(r"\d{4}\.\d{5}", arxiv), f"{path.name}: malformed arXiv id {arxiv!r}"


def test_web_directory_is_registered_once_under_the_folder_name(host):
    """The host's loader registered ``web/`` under the pack's folder name (what the help panel fetches), and only
    there: a second registration (e.g. ``[tool.comfy] web`` in pyproject.toml, served under the project name) would
    make the frontend import every ``.js`` under ``web/`` twice ("Extension named ... already registered")."""
    web_dir = (DOCS_DIR.parent).resolve()
    names = [name for name, d in host.nodes.EXTENSION_WEB_DIRS.items() if Path(d).resolve() == web_dir]
    folder = Path(host.pack_module.__file__).parent.name
    assert names == [folder], f"web/ registered as {names}; expected only the folder name {folder!r}"


def _help_url_prefix(python_module: str) -> str:
    """The frontend's ``extractCustomNodeName``: ``custom_nodes.<pack>[@version]`` -> ``<pack>``."""
    parts = python_module.split(".")
    assert len(parts) >= 2 and parts[0] == "custom_nodes", f"not a custom node module: {python_module!r}"
    return parts[1].split("@")[0]


@pytest.mark.server
def test_pages_are_served_where_the_help_panel_fetches_them(host, comfy_server):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for node_id in host.pack_node_ids:
        info = comfy_server.object_info(node_id)[node_id]
        prefix = _help_url_prefix(info["python_module"])
        url = f"{comfy_server.base_url}/extensions/{urllib.parse.quote(prefix)}/docs/{urllib.parse.quote(node_id)}.md"
        with opener.open(url, timeout=30) as resp:
            assert resp.status == 200, url
            body = resp.read().decode("utf-8")
        assert body and body == _page(node_id), f"{url} served something else than web/docs/{node_id}.md"

"""Measure every node of the shipped workflows in the real ComfyUI frontend; write scripts/node_sizes.json.

For each (node type, title) that ``scripts/build_workflows.py`` uses, a fresh node is added to the graph in headless
Chromium and its ``computeSize()`` is read: the smallest size that shows every input, output and widget (a node's
width also follows its title). Both frontends of the browser test are measured (the one the host pins and
``harness.frontend.NEWEST_FRONTEND``); the table keeps the larger value of each, so a layout built from it fits both.

    COMFYUI_PATH=... .venv/bin/python scripts/measure_node_sizes.py     # then scripts/build_workflows.py

Needs Chromium and Playwright (``make frontends`` installs both and the newest frontend). Rerun it after a node's
inputs change or a title is added; build_workflows.py refuses a node the table does not have.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)
sys.path.insert(0, str(ROOT / "scripts"))

TABLE = ROOT / "scripts" / "node_sizes.json"
log = logging.getLogger("measure_node_sizes")


def pairs_in_use() -> list[tuple[str, str | None]]:
    """Every (type, title) of build_workflows' graphs, the untitled form of each type, and the note node."""
    import build_workflows
    pairs = {(t, None) for t in build_workflows.node_types_in_use()} | {("Note", None)}
    pairs |= set(build_workflows.titled_nodes_in_use())
    return sorted(pairs, key=lambda p: (p[0], p[1] or ""))


def measure(version: str, pairs, host) -> dict:
    from playwright.sync_api import sync_playwright

    from harness import frontend as fe
    from harness.server import ComfyServer

    static = fe.frontend_static_dir(version)
    server = ComfyServer(host.path, custom_nodes_dir=host.custom_nodes_dir, models_dir=host.models_dir,
                         output_dir=host.output_dir, input_dir=host.input_dir, extra_args=fe.server_args(static))
    with server, sync_playwright() as pw:
        browser, page = fe.launch(pw)
        try:
            info = fe.open_app(page, server)
            if info["version"] not in (None, version):
                raise RuntimeError(f"asked for frontend {version}, the page runs {info['version']}")
            sizes = fe.measure_nodes(page, pairs)
        finally:
            browser.close()
    missing = [p[0] for p, s in zip(pairs, sizes) if s is None]
    if missing:
        raise RuntimeError(f"frontend {version} does not know node types {sorted(set(missing))}")
    return {p: s["size"] for p, s in zip(pairs, sizes)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TABLE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from harness import frontend as fe
    from harness.host import boot_scratch

    host = boot_scratch("measure_node_sizes_")
    versions = [fe.pinned_frontend_version(host.path), fe.NEWEST_FRONTEND]
    pairs = pairs_in_use()
    measured = {v: measure(v, pairs, host) for v in versions}
    nodes: dict = {}
    for pair in pairs:
        w = max(measured[v][pair][0] for v in versions)
        h = max(measured[v][pair][1] for v in versions)
        nodes.setdefault(pair[0], {})[pair[1] or ""] = [math.ceil(w), math.ceil(h)]
    table = {
        "about": "computeSize() [width, height] of a fresh node per type and title (\"\" = the default title) in "
                 "headless Chromium, the larger of the frontends listed; written by scripts/measure_node_sizes.py, "
                 "read by scripts/build_workflows.py",
        "frontends": versions,
        "nodes": nodes,
    }
    text = re.sub(r"\[\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2]", json.dumps(table, indent=1)) + "\n"
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=".node_sizes_")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, args.out)
    log.info("wrote %s: %d node types, frontends %s", args.out, len(nodes), ", ".join(versions))


if __name__ == "__main__":
    main()

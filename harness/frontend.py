"""The real ComfyUI frontend in a real headless browser: Debian's Chromium driven by Python Playwright.

Used by ``tests/test_frontend.py`` (load every shipped workflow, check its layout, queue it) and by
``scripts/measure_node_sizes.py`` (each node type's ``computeSize()`` for ``scripts/build_workflows.py``).

* Frontends: the one the host pins (``comfyui-frontend-package==X`` in the host's ``requirements.txt``, installed in
  the venv) and the newest one on PyPI (:data:`NEWEST_FRONTEND`, installed by ``make frontends`` with
  ``pip install --no-deps --target .cache/frontends/comfyui-frontend-package-<version>``). The server is pointed at a
  frontend's ``static`` folder with ComfyUI's ``--front-end-root``.
* Browser: ``$PERSONALIZE_CHROMIUM`` or ``/usr/bin/chromium`` (``apt-get install chromium``); Playwright's own
  browser downloads are never used.

Nothing here imports Playwright at import time; :func:`require_browser` names what is missing.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path

from . import REPO_ROOT

log = logging.getLogger(__name__)

NEWEST_FRONTEND = "1.58.1"  # newest comfyui-frontend-package on PyPI when the browser test was written
FRONTENDS_DIR = REPO_ROOT / ".cache" / "frontends"
PACKAGE = "comfyui-frontend-package"


class FrontendUnavailable(RuntimeError):
    """A frontend build, Playwright or Chromium is missing; the message says how to install it."""


def pinned_frontend_version(comfyui_path: str | os.PathLike) -> str:
    """The ``comfyui-frontend-package==X`` pin in the host tree's requirements.txt."""
    req = Path(comfyui_path) / "requirements.txt"
    match = re.search(r"^comfyui-frontend-package==([0-9][0-9.]*)\s*$", req.read_text(encoding="utf-8"), re.M)
    if not match:
        raise FrontendUnavailable(f"{req} pins no {PACKAGE} version")
    return match.group(1)


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def frontend_static_dir(version: str) -> Path:
    """The ``static`` folder of ``comfyui-frontend-package==version``: the venv's copy when that is the version
    installed there, else ``.cache/frontends/comfyui-frontend-package-<version>`` (``make frontends``)."""
    if _installed_version() == version:
        spec = importlib.util.find_spec("comfyui_frontend_package")
        if spec is not None and spec.origin:
            static = Path(spec.origin).parent / "static"
            if (static / "index.html").is_file():
                return static
    base = Path(os.environ.get("PERSONALIZE_FRONTENDS_DIR") or FRONTENDS_DIR)
    static = base / f"{PACKAGE}-{version}" / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        raise FrontendUnavailable(
            f"{PACKAGE}=={version} is not installed: run `make frontends` (or `pip install --no-deps --target "
            f"{base / f'{PACKAGE}-{version}'} {PACKAGE}=={version}`)")
    return static


def chromium_path() -> str:
    path = os.environ.get("PERSONALIZE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        raise FrontendUnavailable("Chromium is not installed: `apt-get install -y chromium` (Debian's package; "
                                  "set PERSONALIZE_CHROMIUM to use another build)")
    return path


def require_browser() -> str:
    """Chromium's path, once Playwright and Chromium are both there; else FrontendUnavailable saying how."""
    if importlib.util.find_spec("playwright") is None:
        raise FrontendUnavailable("Python Playwright is not installed: `pip install playwright` into the venv "
                                  "(make venv does; never `playwright install`, Chromium comes from apt)")
    return chromium_path()


def launch(playwright, *, width: int = 1600, height: int = 1000):
    """A headless Chromium browser and a page of the given viewport."""
    browser = playwright.chromium.launch(executable_path=require_browser(), headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
    page = browser.new_page(viewport={"width": width, "height": height})
    return browser, page


# Settings of the browser session: open on the graph (no template browser on first run), no minimap over the graph,
# text drawn at every zoom level (screenshots of a whole workflow are zoomed out), and a reloaded page opens empty (no
# workflow restored from the previous load, whose warnings would show again).
FIRST_RUN_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                      "LiteGraph.Canvas.MinFontSizeForLOD": 1, "Comfy.Workflow.Persist": False}


def server_args(static_dir: Path) -> list[str]:
    return ["--front-end-root", str(static_dir)]


# -- the app in the page ------------------------------------------------------------------------------------------

_APP_READY = """(probe) => !!(window.app && window.app.graph && window.LiteGraph
    && window.LiteGraph.registered_node_types && window.LiteGraph.registered_node_types[probe])"""


def open_app(page, server, probe_node: str = "PersonalizeLoadSubjectImages", timeout_s: float = 120) -> dict:
    """Load the frontend from the server and wait until the pack's nodes are registered; return the page's
    console errors list (appended to as the page runs) and the frontend's version."""
    errors: list[str] = []
    for key, value in FIRST_RUN_SETTINGS.items():
        server.set_setting(key, value)
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.base_url + "/", wait_until="domcontentloaded")
    page.wait_for_function(_APP_READY, arg=probe_node, timeout=timeout_s * 1000)
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
    page.keyboard.press("Escape")  # any dialog the first start opens
    return {"errors": errors, "version": version}


# Node facts after a load: what the test asserts on and what the size table stores. Nodes are read after two
# animation frames, so the frontend has drawn (and computed widget layouts) once.
INSPECT_JS = """async (workflow) => {
  const app = window.app, LG = window.LiteGraph;
  if (workflow !== null) await app.loadGraphData(workflow, true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  app.graph.setDirtyCanvas(true, true);
  app.canvas.draw(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const title_h = LG.NODE_TITLE_HEIGHT;
  return {
    title_height: title_h,
    groups: (app.graph._groups || app.graph.groups || []).map(g => ({title: g.title,
        bounding: Array.from(g._bounding || g.bounding)})),
    nodes: app.graph._nodes.map(n => ({
      id: n.id, type: n.type, title: n.title,
      registered: !!LG.registered_node_types[n.type],
      has_errors: !!n.has_errors,
      pos: Array.from(n.pos), size: Array.from(n.size),
      compute_size: Array.from(n.computeSize()),
      collapsed: !!(n.flags && n.flags.collapsed),
      widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, hidden: !!w.hidden,
          y: (w.y ?? w.last_y ?? null), computed_height: w.computedHeight ?? null})),
    })),
  };
}"""

# A fresh node of each (type, title) pair, as the node library adds it: its computeSize(). A node's width follows
# its title's width, so titled nodes are measured with their title.
MEASURE_JS = """async (pairs) => {
  const LG = window.LiteGraph, out = [];
  for (const [type, title] of pairs) {
    const node = LG.createNode(type);
    if (!node) { out.push(null); continue; }
    if (title) node.title = title;
    window.app.graph.add(node);
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    out.push({size: Array.from(node.computeSize()), widgets: (node.widgets || []).length,
              inputs: (node.inputs || []).length, outputs: (node.outputs || []).length});
    window.app.graph.remove(node);
  }
  return out;
}"""


FIT_VIEW_JS = """(margin) => {
  const app = window.app, LG = window.LiteGraph, th = LG.NODE_TITLE_HEIGHT;
  const boxes = app.graph._nodes.map(n => [n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th])
      .concat((app.graph._groups || []).map(g => Array.from(g._bounding || g.bounding)));
  const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
  const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
  const el = app.canvas.canvas, rect = el.getBoundingClientRect();
  const w = rect.width - 2 * margin, h = rect.height - 2 * margin - 60;
  const scale = Math.min(1.2, w / (x1 - x0), h / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [margin / scale - x0, (margin + 60) / scale - y0];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return scale;
}"""


def fit_view(page, margin: int = 60) -> float:
    """Zoom and pan the canvas so that every node and group is in view; returns the scale."""
    scale = page.evaluate(FIT_VIEW_JS, margin)
    page.wait_for_timeout(300)
    return scale


def inspect_workflow(page, workflow: dict | None) -> dict:
    """Load ``workflow`` (a UI-format dict; None: inspect what is loaded) and return :data:`INSPECT_JS`'s facts."""
    return page.evaluate(INSPECT_JS, json.loads(json.dumps(workflow)) if workflow is not None else None)


def measure_nodes(page, pairs: list[tuple[str, str | None]]) -> list[dict | None]:
    """computeSize() and socket/widget counts of a fresh node per ``(type, title)``; None for an unknown type."""
    page.evaluate("() => window.app.graph.clear()")
    return page.evaluate(MEASURE_JS, [list(p) for p in pairs])


def overlaps(a: dict, b: dict, title_height: float) -> bool:
    """Whether two nodes' boxes (title bar included: ``pos`` is the body's top-left corner) intersect."""
    ax, ay, aw, ah = a["pos"][0], a["pos"][1] - title_height, a["size"][0], a["size"][1] + title_height
    bx, by, bw, bh = b["pos"][0], b["pos"][1] - title_height, b["size"][0], b["size"][1] + title_height
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


# -- what a user sees on opening a workflow: the missing-model warning -----------------------------------------------
# Frontend <= 1.3x: a "Missing Models" dialog listing "<directory> / <file>" rows, each with Download and Copy URL
# (models named in a node's ``properties.models`` whose file the server lacks). Frontend 1.58: a toast ("<file> is
# missing", View details) opening the right-side panel's Issues tab: one error group per kind of problem
# (``data-testid="error-group-missing-model"``, ...), a row per model with a Copy URL button. Copy URL is how both
# expose the download URL (1.58 copies the Hugging Face page, ``/blob/`` for ``/resolve/``); the page's clipboard is
# replaced by a recorder to read it.

_RECORD_CLIPBOARD_JS = """() => { window.__personalizeCopied = [];
  navigator.clipboard.writeText = t => { window.__personalizeCopied.push(t); return Promise.resolve(); }; }"""


def _copied_text(page, button) -> str:
    page.evaluate(_RECORD_CLIPBOARD_JS)
    button.click()
    page.wait_for_function("() => window.__personalizeCopied.length > 0", timeout=10_000)
    return page.evaluate("() => window.__personalizeCopied[0]")


def missing_model_warning(page, timeout_s: float = 10) -> dict | None:
    """The missing-model warning the frontend shows after a workflow was loaded, or None when it shows none within
    ``timeout_s``: ``{"ui": "dialog" | "panel", "models": [{"directory", "name", "url"}], "issues": [...]}`` where
    ``issues`` names every kind of problem the panel lists (frontend 1.58; the dialog's is ``["missing-model"]``)."""
    dialog = page.locator("[role=dialog]").filter(has_text="Missing Models")
    details = page.get_by_text("View details", exact=True)
    try:
        page.wait_for_function(
            """() => Array.from(document.querySelectorAll('[role=dialog], button')).some(e =>
                 (e.getAttribute('role') === 'dialog' && e.innerText.includes('Missing Models'))
                 || e.innerText.trim() === 'View details')""", timeout=timeout_s * 1000)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: nothing shown
        return None
    if dialog.count():
        box = dialog.first
        rows = [line.split(" / ", 1) for line in box.inner_text().splitlines() if " / " in line]
        buttons = box.get_by_text("Copy URL", exact=True)
        models = [{"directory": d.strip(), "name": n.strip(), "url": _copied_text(page, buttons.nth(i))}
                  for i, (d, n) in enumerate(rows)]
        return {"ui": "dialog", "models": models, "issues": ["missing-model"]}
    details.first.click()
    page.wait_for_selector("[data-testid^=error-group-]", timeout=10_000)
    groups = page.locator("[data-testid^=error-group-]")
    issues = sorted({groups.nth(i).get_attribute("data-testid").removeprefix("error-group-")
                     for i in range(groups.count())} - {"display-message"})
    rows = page.locator("[data-testid=missing-model-importable-rows] > div")
    models = []
    for i in range(rows.count()):
        row = rows.nth(i)
        name = row.locator("button[title]:not([aria-label])").first.get_attribute("title")
        directory = row.locator("xpath=.//button[@title and not(@aria-label)]/parent::span/following-sibling::span[1]")
        models.append({"directory": directory.first.inner_text().strip() if directory.count() else None, "name": name,
                       "url": _copied_text(page, row.locator("button[aria-label='Copy URL']").first)})
    return {"ui": "panel", "models": models, "issues": issues}

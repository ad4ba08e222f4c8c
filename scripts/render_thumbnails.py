"""Render workflows/<name>.jpg for every workflows/<name>.json from the workflow's own output.

ComfyUI's template browser lists a pack's ``workflows/*.json`` (``GET /api/workflow_templates``) and shows
``/api/workflow_templates/<pack>/<name>.jpg`` as each one's picture (the frontend asks for ``.jpg`` for custom-node
templates). This script runs each workflow on a real ComfyUI server (``harness.server``) with empty scratch folders,
as on a fresh install (the mini workflows need only what the pack ships: its mini model and subjects), and tiles the
images of its main Save Image node (up to four) into a 512 x 512 JPEG.

An ``_sd15`` workflow's thumbnail comes from the same graph run on the shipped mini model: its Load Checkpoint
(v1-5-pruned-emaonly-fp16.safetensors, which never reaches this machine) swapped for Load Mini Model and its images at
64 px instead of 512, every other setting (steps, learning rates, samplers) the file's own
(``harness.workflow_variants.on_mini_model``). So it shows the graph's output on the mini world, not SD1.5's.

    COMFYUI_PATH=... .venv/bin/python scripts/render_thumbnails.py [name ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)

WORKFLOWS = ROOT / "workflows"
SIDE = 512
# The Save Image node whose images stand for the workflow, by filename_prefix (default: personalize/<name>).
MAIN_OUTPUT: dict[str, str] = {}
log = logging.getLogger("render_thumbnails")


def main_output_node(name: str, workflow: dict) -> str:
    prefix = MAIN_OUTPUT.get(name, f"personalize/{name}")
    for node in workflow["nodes"]:
        if node["type"] == "SaveImage" and node["widgets_values"][0] == prefix:
            return str(node["id"])
    raise ValueError(f"{name}: no Save Image node with filename_prefix {prefix!r} (see MAIN_OUTPUT)")


def tile(paths: list[Path]):
    """Up to four images on a SIDE x SIDE canvas (1: whole; 2: side by side; 3-4: a 2 x 2 grid)."""
    from PIL import Image
    images = [Image.open(p).convert("RGB") for p in paths[:4]]
    canvas = Image.new("RGB", (SIDE, SIDE), (24, 24, 24))
    if len(images) == 1:
        canvas.paste(images[0].resize((SIDE, SIDE), Image.Resampling.BICUBIC))
        return canvas
    cell = SIDE // 2
    top = (SIDE - cell) // 2 if len(images) == 2 else 0
    for k, img in enumerate(images):
        canvas.paste(img.resize((cell, cell), Image.Resampling.BICUBIC), ((k % 2) * cell, top + (k // 2) * cell))
    return canvas


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from harness.host import boot_scratch
    from harness.server import ComfyServer
    from harness.ui_convert import ui_to_api
    from harness.workflow_variants import on_mini_model

    host = boot_scratch("render_thumbnails_")

    names = args.names or sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    with ComfyServer(host.path, custom_nodes_dir=host.custom_nodes_dir, models_dir=host.models_dir,
                     output_dir=host.output_dir, input_dir=host.input_dir) as server:
        for name in names:
            workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
            workflow = on_mini_model(name, workflow, host.nodes.NODE_CLASS_MAPPINGS)  # _sd15: see the docstring
            node = main_output_node(name, workflow)
            entry = server.run(ui_to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS),
                               extra_data={"extra_pnginfo": {"workflow": workflow}}, timeout=1800)
            images = [host.output_dir / img.get("subfolder", "") / img["filename"]
                      for img in entry["outputs"][node]["images"]]
            target = WORKFLOWS / f"{name}.jpg"
            fd, tmp = tempfile.mkstemp(dir=WORKFLOWS, prefix=f".{name}.", suffix=".jpg")
            os.close(fd)
            tile(images).save(tmp, "JPEG", quality=88)
            os.replace(tmp, target)
            log.info("wrote %s from node %s's %d image(s)%s", target.relative_to(ROOT), node, len(images),
                     " (the graph on the mini model, 64 px)" if name.endswith("_sd15") else "")


if __name__ == "__main__":
    main()

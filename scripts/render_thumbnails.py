"""Render workflows/<name>.jpg for every workflows/<name>.json from the workflow's own output.

ComfyUI's template browser lists a pack's ``workflows/*.json`` (``GET /api/workflow_templates``) and shows
``/api/workflow_templates/<pack>/<name>.jpg`` as each one's picture (the frontend asks for ``.jpg`` for custom-node
templates). This script runs each workflow on a real ComfyUI server (``harness.server``) with scratch folders, the
test checkpoint and subject folders the files name put in place as ``tests/test_frontend.py`` does, and tiles the
images of its main Save Image node (up to four) into a 512 x 512 JPEG.

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
MAIN_OUTPUT = {"invert_image": "personalize/invert_image_reconstruction"}
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

    from harness.fixtures import default_cache_dir, ensure_checkpoint
    from harness.host import boot_scratch
    from harness.server import ComfyServer
    from harness.subjects import write_heldout_subject_folder, write_subject_folder
    from harness.ui_convert import ui_to_api

    host = boot_scratch("render_thumbnails_")
    link = host.model_folder("checkpoints") / "personalize_test_sd15.safetensors"  # the name the files use
    link.symlink_to(Path(ensure_checkpoint("sd15", default_cache_dir())).resolve())
    mini = ROOT / "models" / "mini_world.safetensors"
    (host.model_folder("personalize_mini") / mini.name).symlink_to(mini)
    write_subject_folder(host.input_dir)
    write_heldout_subject_folder(host.input_dir)

    names = args.names or sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    with ComfyServer(host.path, custom_nodes_dir=host.custom_nodes_dir, models_dir=host.models_dir,
                     output_dir=host.output_dir, input_dir=host.input_dir) as server:
        for name in names:
            workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
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
            log.info("wrote %s from node %s's %d image(s)", target.relative_to(ROOT), node, len(images))


if __name__ == "__main__":
    main()

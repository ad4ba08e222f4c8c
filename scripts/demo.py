"""`make demo`: personalise a held-out mini-world subject with the pack's nodes and write a PNG grid.

Runs the demo workflows in workflows/ (``extra.personalize.demo``) through ComfyUI's own executor on the shipped
mini-world model (models/mini_world.safetensors), with empty input and model folders as on a fresh install:

* mini_world_demo.json: Load Mini Model -> Load Subject Images (the held-out subject's four reference views the pack
  ships in subjects/striped_red_star) -> HiFi Subject Tune -> HiFi Subject Conditioning -> one KSampler per new scene;
* mini_world_demo_profusion.json: ONE of those views -> PromptNet Encode (the shipped mini PromptNet, no tuning)
  -> one Fusion Sampler in SamplerCustom per new scene.

Then writes ``output/personalize_demo_grid.png``: per demo, its references in one row and the subject in new scenes
in the row below, and logs where it is.

The same workflow runs on a real SD1.x checkpoint with Load Mini Model swapped for the stock Load Checkpoint
(CheckpointLoaderSimple) and your own photos in the subject folder; workflows/<method>_sd15.json are set up that way.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)

log = logging.getLogger("personalize.demo")


def save_grid(rows: list, path: Path, scale: int = 3) -> Path:
    """Rows of IMAGE tensors ``[n_i, H, W, 3]`` as one PNG (each row left-aligned, white gaps), upscaled ``scale``x
    with nearest-neighbour so 64 px images stay crisp."""
    import torch
    import torch.nn.functional as F
    from harness.subjects import save_png
    width = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1:3]
    gap = 4
    canvas = torch.ones(len(rows) * (h + gap) - gap, width * (w + gap) - gap, 3)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = img[..., :3]
    big = F.interpolate(canvas.movedim(-1, 0)[None], scale_factor=scale, mode="nearest")[0].movedim(0, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    save_png(big, tmp)
    tmp.replace(path)
    return path


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import numpy as np
    import torch
    from PIL import Image
    from harness.executor import run_api_prompt
    from harness.host import boot
    from harness.subjects import MINI_DEMO_SUBJECT
    from harness.ui_convert import ui_to_api

    out = ROOT / "output"
    work = out / ".demo-work"
    host = boot(os.environ.get("COMFYUI_PATH") or None, models_dir=work / "models", output_dir=out,
                input_dir=work / "input", temp_dir=work / "temp")
    host.refresh_model_lists()

    t_start = time.perf_counter()
    rows = []
    for path in sorted((ROOT / "workflows").glob("*.json")):
        wf = json.loads(path.read_text())
        if not wf.get("extra", {}).get("personalize", {}).get("demo"):
            continue
        t0 = time.perf_counter()
        result = run_api_prompt(ui_to_api(wf, host.nodes.NODE_CLASS_MAPPINGS), extra_pnginfo={"workflow": wf})
        if not result.success:
            log.error("%s failed: %s", path.name, result.error_message)
            return 1
        files = result.files()
        log.info("%s: %d images in %.0f s", path.name, len(files), time.perf_counter() - t0)
        load = lambda p: torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255)  # noqa: E731
        refs = [p for p in files if "references" in p.name]
        gens = [p for p in files if "references" not in p.name]
        rows += [torch.stack([load(p) for p in sorted(refs)]), torch.stack([load(p) for p in sorted(gens)])]
    grid = save_grid(rows, out / "personalize_demo_grid.png")
    log.info("demo (%s; %s) finished in %.0f s", MINI_DEMO_SUBJECT,
             ", ".join(f"{r.shape[0]} reference view(s)" for r in rows[::2]), time.perf_counter() - t_start)
    log.info("demo grid (per demo: a row of its references, then the subject in new scenes): %s", grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())

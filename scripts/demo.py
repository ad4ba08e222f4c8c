"""`make demo`: run the demo workflows in workflows/ through ComfyUI's own executor and write PNGs under output/.

The default model is the generated SD1.5-shaped fixture (random weights) until the mini-world model lands; the
workflows are the same ones a user runs on a real checkpoint (change the Load Checkpoint node).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("personalize.demo")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from harness import fixtures
    from harness.executor import run_api_prompt
    from harness.host import boot
    from harness.subjects import write_subject_folder
    from harness.ui_convert import ui_to_api

    out = ROOT / "output"
    work = out / ".demo-work"
    (work / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    host = boot(os.environ.get("COMFYUI_PATH") or None, models_dir=work / "models", output_dir=out,
                input_dir=work / "input", temp_dir=work / "temp")
    ckpt = fixtures.ensure_checkpoint("sd15", ROOT / ".cache" / "fixtures")
    link = work / "models" / "checkpoints" / "personalize_test_sd15.safetensors"
    if not link.exists():
        link.symlink_to(ckpt)
    host.refresh_model_lists()
    write_subject_folder(host.input_dir)

    written = []
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
        written += files
        log.info("%s: %d images in %.0f s", path.name, len(files), time.perf_counter() - t0)
    log.info("demo images:\n%s", "\n".join(f"  {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

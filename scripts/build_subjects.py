"""Write the subject folders the pack ships in subjects/ (what Load Subject Images finds on a fresh install).

* ``subjects/striped_red_star/``: the four reference views (``subject_<i>.png`` + ``subject_<i>_mask.png``) of the
  held-out mini-world subject "striped red star" that ``make demo`` personalises; the mini model never saw it in
  pre-training. Rendered at the world's native 64 px (``miniworld/world.py`` draws its scenes, noise fields and poses
  on a 64 px grid); Load Subject Images' ``size`` resizes them (512 for the SD1.5 workflows).
* ``subjects/blue_circle_photo/``: ``photo.png`` + ``photo_mask.png``, another subject on the grass, for HiFi Subject
  Replace.

Deterministic (the world's seeds only); ``tests/test_workflows.py`` checks that the committed files match.

    .venv/bin/python scripts/build_subjects.py
"""
from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)
SUBJECTS = ROOT / "subjects"
log = logging.getLogger("build_subjects")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from harness.subjects import write_shipped_subjects
    SUBJECTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=SUBJECTS, prefix=".build_") as tmp:  # each folder replaced whole
        for folder in write_shipped_subjects(Path(tmp)):
            target = SUBJECTS / folder.name
            if target.exists():
                shutil.rmtree(target)
            folder.rename(target)
            log.info("wrote %s: %s", target.relative_to(ROOT), ", ".join(sorted(p.name for p in target.iterdir())))


if __name__ == "__main__":
    main()

"""Test/demo/bench harness for ComfyUI Personalize.

This package is *not* part of the node pack that ComfyUI loads. It boots a real ComfyUI tree in-process
(``harness.host``), runs API-format prompts through ComfyUI's own executor (``harness.executor``), converts
UI-format workflows to API format (``harness.ui_convert``) and drives a real ComfyUI server over HTTP
(``harness.server``). Import it with the repository root on ``sys.path``.

Nothing here imports ComfyUI at import time; call :func:`harness.host.boot` first.
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOST_PATH = REPO_ROOT / ".hosts" / "comfyui-v0.3.75"

__all__ = ["REPO_ROOT", "DEFAULT_HOST_PATH"]

"""Test/demo/bench harness for ComfyUI Personalize.

This package is *not* part of the node pack that ComfyUI loads. It boots a real ComfyUI tree in-process
(``harness.host``), runs API-format prompts through ComfyUI's own executor (``harness.executor``), converts
UI-format workflows to API format (``harness.ui_convert``) and drives a real ComfyUI server over HTTP
(``harness.server``).

Import path: the repository root is never put on ``sys.path`` (its folders ``kernels/``, ``nodes/``, ``core/`` ...
would become top-level modules and shadow Hugging Face's ``kernels`` and ComfyUI's ``nodes.py``). ``.pythonpath/``
holds only a ``harness`` link to this folder; pytest (``pytest.ini``), ``scripts/`` and ``bench/`` put that directory
on ``sys.path``. The pack itself is reached as a package, never through its folder names:

* with the host booted: ``Host.pack("core.deltas")``, the submodule ComfyUI's loader imported from
  ``custom_nodes/comfyui_personalize/__init__.py``;
* without ComfyUI (the mini world's renderer and evaluators): :func:`pack_package` registers the pack as the
  package :data:`PACK_PACKAGE` without running its ``__init__.py``, so ``comfyui_personalize.miniworld`` imports.

Nothing here imports ComfyUI at import time; call :func:`harness.host.boot` first.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOST_PATH = REPO_ROOT / ".hosts" / "comfyui-v0.3.75"
#: The directory scripts put on ``sys.path`` for ``import harness`` (it holds only the ``harness`` link).
IMPORT_ROOT = REPO_ROOT / ".pythonpath"
#: The name under which code that runs without ComfyUI imports the pack (the folder name a user installs it as).
PACK_PACKAGE = "comfyui_personalize"
#: The pack's top-level folders: never importable as top-level modules (tests/test_imports.py checks it).
PACK_FOLDERS = ("core", "methods", "nodes", "kernels", "miniworld", "networks", "scripts", "bench")

__all__ = ["REPO_ROOT", "DEFAULT_HOST_PATH", "IMPORT_ROOT", "PACK_PACKAGE", "PACK_FOLDERS", "pack_package",
           "drop_repo_root_from_sys_path"]


def pack_package() -> types.ModuleType:
    """The pack as the package ``comfyui_personalize`` for code that runs without ComfyUI (idempotent).

    A bare package whose ``__path__`` is the repository: ``comfyui_personalize.miniworld`` imports ``miniworld/``
    with its relative imports working; the pack's own ``__init__.py`` (which needs ComfyUI) is not executed, so
    only submodules that do not import ComfyUI can be used this way. With a booted host use ``Host.pack`` instead.
    """
    module = sys.modules.get(PACK_PACKAGE)
    if module is not None:
        paths = [Path(p).resolve() for p in getattr(module, "__path__", None) or []]
        if REPO_ROOT not in paths:
            raise ImportError(f"a module {PACK_PACKAGE!r} from {paths or module} is already imported; "
                              f"it is not this checkout ({REPO_ROOT})")
        return module
    spec = importlib.machinery.ModuleSpec(PACK_PACKAGE, loader=None, is_package=True)
    spec.submodule_search_locations = [str(REPO_ROOT)]
    module = types.ModuleType(PACK_PACKAGE, "ComfyUI Personalize outside ComfyUI (bare package; see harness)")
    module.__spec__ = spec
    module.__path__ = [str(REPO_ROOT)]
    module.__package__ = PACK_PACKAGE
    sys.modules[PACK_PACKAGE] = module
    return module


def drop_repo_root_from_sys_path() -> list[str]:
    """Remove ``sys.path`` entries that name the repository root (``python -m pytest`` and ``python -c`` run from
    the root add ``''`` / the cwd); returns the removed entries."""
    removed = []
    for entry in list(sys.path):
        try:
            same = Path(entry or ".").resolve() == REPO_ROOT
        except OSError:  # pragma: no cover - unreadable cwd
            same = False
        if same:
            sys.path.remove(entry)
            removed.append(entry)
    return removed

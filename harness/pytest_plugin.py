"""pytest plugin loaded by ``pytest.ini`` (``-p harness.pytest_plugin``), before any conftest is imported.

``pytest.ini`` puts ``.pythonpath/`` (only a ``harness`` link) on ``sys.path``, never the repository root: the pack's
folders (``kernels/``, ``nodes/``, ``core/`` ...) must not become top-level modules (``kernels`` would shadow Hugging
Face's package that transformers >= 5 imports, ``nodes`` ComfyUI's ``nodes.py``). This plugin

* removes the repository root from ``sys.path`` where the interpreter put it (``python -m pytest`` run from the
  root adds the working directory);
* registers the pack as the bare package ``comfyui_personalize`` (:func:`harness.pack_package`), for tests of code
  that runs without ComfyUI (the mini world); tests of everything else use the host-loaded pack (``Host.pack``);
* keeps pytest from executing the pack's root ``__init__.py`` outside ComfyUI: pytest >= 8 builds its collection
  tree from the rootdir down and makes every directory with an ``__init__.py`` a ``Package`` node, whose setup
  imports that ``__init__.py``. :func:`pytest_collect_directory` collects the repository root as a plain ``Dir``.
"""
from __future__ import annotations

import pytest

from . import REPO_ROOT, drop_repo_root_from_sys_path, pack_package


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    drop_repo_root_from_sys_path()
    pack_package()


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path, parent):
    if path == REPO_ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None

"""pytest plugin loaded by ``pytest.ini`` (``-p harness.pytest_plugin``), before any conftest is imported.

The repository root is a ComfyUI custom-node pack: its ``__init__.py`` may only run inside ComfyUI (it imports
``comfy``); the pack itself is imported only by ComfyUI's loader (``harness.host.boot``). pytest would import it
anyway, outside ComfyUI, in two ways:

* pytest >= 8 builds its collection tree from the rootdir down and makes every directory with an ``__init__.py`` a
  ``Package`` node, whose setup imports that ``__init__.py``. :func:`pytest_collect_directory` collects the
  repository root as a plain ``Dir`` instead.
* If ``tests/`` is a package (it currently is not), test modules are named after the outermost directory with an
  ``__init__.py`` (``<root>.tests.test_x``) and the root ``__init__.py`` is imported first.
  :func:`install_repo_package_stub` then registers a bare package module for the root (``__path__`` only; the
  pack's ``__init__.py`` is never executed), so ``<root>.tests.*`` and relative imports inside ``tests/`` work.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from . import REPO_ROOT


def install_repo_package_stub() -> str | None:
    """Register the bare package for the repository root; returns its module name (None when not needed)."""
    name = REPO_ROOT.name
    if not (REPO_ROOT / "tests" / "__init__.py").is_file():
        return None  # tests/ is not a package: pytest imports test modules as top-level modules
    if not name.isidentifier() or not (REPO_ROOT / "__init__.py").is_file():
        return None  # pytest does not treat the root as a package then
    if name in sys.modules:
        return name
    spec = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    spec.submodule_search_locations = [str(REPO_ROOT)]
    module = types.ModuleType(name, "Repository root of ComfyUI Personalize (bare package; see harness.pytest_plugin)")
    module.__spec__ = spec
    module.__path__ = [str(REPO_ROOT)]
    module.__package__ = name
    sys.modules[name] = module
    return name


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    install_repo_package_stub()


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path, parent):
    if path == REPO_ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None

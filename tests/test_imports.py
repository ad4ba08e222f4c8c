"""The pack's folders are never top-level modules (issue #25 §6): with the host booted, ``nodes`` is the host's
``nodes.py``, ``comfy`` the host's package, ``kernels`` Hugging Face's package or nothing, and no module that names a
file of the repository is importable at top level; the scripts' and benchmarks' own import setup keeps it so."""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from harness import PACK_FOLDERS, PACK_PACKAGE, REPO_ROOT

TESTS_DIR = Path(__file__).resolve().parent


def _locations(module) -> list[Path]:
    spec = getattr(module, "__spec__", None)
    raw = [getattr(module, "__file__", None), getattr(spec, "origin", None)]
    raw += list(getattr(module, "__path__", None) or [])
    # (only existing paths: some generated modules carry placeholder file names, e.g. torch's "torch-git")
    return [Path(p).resolve() for p in raw if p and p not in ("built-in", "frozen") and Path(p).exists()]


def _in_repo(path: Path) -> bool:
    """A path of the pack's own files: under the repository, but not in a hidden folder there (the default host
    tree .hosts/, venvs and caches such as .cache/venv-latest) nor in an installed library (site-packages)."""
    if path == REPO_ROOT:
        return True
    if not path.is_relative_to(REPO_ROOT):
        return False
    parts = path.relative_to(REPO_ROOT).parts
    return not parts[0].startswith(".") and "site-packages" not in parts


def test_repository_root_is_not_on_sys_path(host):
    entries = [Path(p or ".").resolve() for p in sys.path]
    assert REPO_ROOT not in entries, sys.path


def test_host_names_resolve_to_the_host(host):
    import comfy
    import nodes

    assert Path(nodes.__file__).resolve() == (host.path / "nodes.py").resolve()
    assert nodes is host.nodes
    assert [Path(p).resolve() for p in comfy.__path__] == [(host.path / "comfy").resolve()]
    assert importlib.util.find_spec("nodes").origin == nodes.__file__


def test_kernels_is_the_library_or_absent(host):
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        return  # Hugging Face's kernels is not installed: nothing named kernels is importable, as it should be
    locations = [Path(spec.origin).resolve()] if spec.origin else []
    locations += [Path(p).resolve() for p in spec.submodule_search_locations or []]
    assert locations and not any(_in_repo(p) for p in locations), f"`import kernels` resolves to {locations}"
    kernels = importlib.import_module("kernels")  # what transformers >= 5 does when the package is installed
    assert not any(_in_repo(p) for p in _locations(kernels))


def test_no_pack_folder_is_a_top_level_module(host):
    for name in PACK_FOLDERS:
        module = sys.modules.get(name)
        if module is not None:
            assert not any(_in_repo(p) for p in _locations(module)), f"{name} is imported from the repository"
        spec = importlib.util.find_spec(name)
        assert spec is None or not any(_in_repo(Path(p).resolve()) for p in
                                       [spec.origin, *(spec.submodule_search_locations or [])] if p), name
    # Only the harness (through .pythonpath/), the tests' own modules (pytest puts tests/ on sys.path), scripts
    # imported as modules from their folder (tests import scripts/train_evaluators.py) and the pack under a package
    # name may live in the repository.
    allowed = {"harness", PACK_PACKAGE}
    script_dirs = {TESTS_DIR, REPO_ROOT / "scripts", REPO_ROOT / "bench"}
    offenders = {}
    for name, module in list(sys.modules.items()):
        if "." in name or name in allowed or name.startswith("/"):  # "/tmp/.../comfyui_personalize": the loader's
            continue
        locations = [p for p in _locations(module) if _in_repo(p) and p.parent not in script_dirs]
        if locations:
            offenders[name] = locations
    assert not offenders, f"top-level modules imported from the repository: {offenders}"


def test_pack_is_reached_as_a_package(host):
    deltas = host.pack("core.deltas")
    assert deltas.__name__ == f"{host.pack_module_name}.core.deltas"
    assert Path(deltas.__file__).resolve() == REPO_ROOT / "core" / "deltas.py"
    assert "core" not in sys.modules and "core.deltas" not in sys.modules


def test_scripts_and_benchmarks_do_not_expose_the_repository():
    """Run every script's and benchmark's module top level (its own sys.path setup and imports, not main())
    in a fresh interpreter started from the repository root, then check what `kernels`, `nodes`, `core` are."""
    files = sorted(str(p.relative_to(REPO_ROOT)) for d in ("scripts", "bench") for p in (REPO_ROOT / d).glob("*.py"))
    probe = f"""
import importlib.util, runpy, sys
from pathlib import Path
root = Path({str(REPO_ROOT)!r})
def in_repo(p):
    p = Path(p).resolve()
    if p == root:
        return True
    return p.is_relative_to(root) and not p.relative_to(root).parts[0].startswith(".") \
        and "site-packages" not in p.parts
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != root]  # like `python scripts/x.py`
bad = []
for rel in {files!r}:
    folder = str(root / Path(rel).parent)
    sys.path.insert(0, folder)  # python puts the script's folder first
    runpy.run_path(str(root / rel), run_name="probe")
    sys.path.remove(folder)
    for name in {PACK_FOLDERS!r}:
        spec = importlib.util.find_spec(name)
        where = [spec.origin, *(spec.submodule_search_locations or [])] if spec else []
        if any(p and in_repo(p) for p in where):
            bad.append((rel, name, where))
    if any(Path(p or '.').resolve() == root for p in sys.path):
        bad.append((rel, "sys.path", str(root)))
print("BAD", bad)
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=str(REPO_ROOT.parent), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BAD []" in result.stdout, result.stdout[-3000:]


def test_no_script_puts_the_repository_or_a_pack_folder_on_the_import_path():
    """A static check of what the probe above cannot run (code inside main()): no script, benchmark or test puts the
    repository root on sys.path or imports a pack folder as a top-level module (``import nodes`` after the host
    is booted is ComfyUI's nodes.py, so it is allowed)."""
    import re

    root_on_path = re.compile(r"sys\.path\.(insert|append)\([^#\n]*str\((ROOT|REPO|REPO_ROOT)\)\)")
    folders = "|".join(name for name in PACK_FOLDERS if name != "nodes")
    folder_import = re.compile(rf"^\s*(from|import)\s+({folders})(\.|\s|$)", re.M)
    found = []
    for folder in ("scripts", "bench", "tests", "harness"):
        for path in sorted((REPO_ROOT / folder).glob("*.py")):
            text = path.read_text(encoding="utf-8")
            found += [f"{path.relative_to(REPO_ROOT)}: {m.group(0).strip()}" for m in root_on_path.finditer(text)]
            found += [f"{path.relative_to(REPO_ROOT)}: {m.group(0).strip()}" for m in folder_import.finditer(text)]
    assert not found, "use harness.pack_package() / Host.pack() instead:\n" + "\n".join(found)

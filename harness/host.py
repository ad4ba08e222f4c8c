"""Boot a real ComfyUI tree in-process and load this pack through ComfyUI's own custom-node loader.

Follows docs/comfyui-host.md section 9.2 (verified on v0.3.75, the default host, and on v0.3.64):

1. ``comfy.cli_args.args.cpu = True`` and ``fp32_text_enc = True`` before anything imports
   ``comfy.model_management`` (unless ``PERSONALIZE_DEVICE=auto``: then ComfyUI picks the device, see
   :func:`host_device`).
2. Model folders, output/input/temp directories and a fresh ``custom_nodes`` directory are registered with
   ``folder_paths``. The custom_nodes directory holds one symlink, ``comfyui_personalize`` -> the repository root,
   so the pack is imported exactly like a user install (``custom_nodes/<folder>/__init__.py``).
3. ``import utils.extra_config`` before ``import nodes`` (nodes.py puts comfy/ first on sys.path, shadowing utils/).
4. ``await nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)`` loads the built-in extra nodes and
   the pack. Where the supported hosts differ, behaviour is chosen by feature detection, never by version strings.

The host tree goes first on ``sys.path``; the repository root is never on it (``harness/__init__.py``), so
``nodes``, ``comfy`` and ``kernels`` resolve to ComfyUI and the libraries, and the pack is reached only as the
package ComfyUI loaded (:meth:`Host.pack`).

One host per process: :func:`boot` is idempotent and returns the same :class:`Host` on later calls.
"""
from __future__ import annotations

import asyncio
import atexit
import importlib
import inspect
import logging
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import DEFAULT_HOST_PATH, REPO_ROOT

log = logging.getLogger(__name__)

#: Name of the symlink under the temporary custom_nodes directory (the folder name a user installs the pack as).
PACK_LINK_NAME = "comfyui_personalize"
#: Model folders that always exist under ``models_dir`` (created empty if missing).
STANDARD_MODEL_FOLDERS = ("checkpoints", "loras", "embeddings", "vae", "clip_vision", "personalize_subjects")
#: Files and folders every ComfyUI tree has; used to validate ``comfyui_path``.
_REQUIRED_HOST_ENTRIES = ("main.py", "nodes.py", "execution.py", "folder_paths.py", "comfy")


class HostBootError(RuntimeError):
    """The ComfyUI tree could not be booted."""


class PackImportError(HostBootError):
    """ComfyUI's loader failed to import the pack (the message carries the logged traceback)."""


def resolve_host_path(comfyui_path: str | os.PathLike | None = None) -> Path:
    """``comfyui_path``, else ``$COMFYUI_PATH``, else ``<repo>/.hosts/comfyui-v0.3.75``; validated."""
    raw = comfyui_path or os.environ.get("COMFYUI_PATH") or DEFAULT_HOST_PATH
    path = Path(raw).expanduser().resolve()
    missing = [name for name in _REQUIRED_HOST_ENTRIES if not (path / name).exists()]
    if missing:
        raise HostBootError(
            f"{path} is not a ComfyUI tree (missing {', '.join(missing)}). "
            "Run `make host` to build the default host, or point COMFYUI_PATH at a ComfyUI checkout."
        )
    return path


class _LogCapture(logging.Handler):
    """Collects formatted log records (the loader reports import failures only through ``logging``)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # pragma: no cover - a broken record must not break the boot
            self.messages.append(str(record.msg))


@dataclass(repr=False)
class Host:
    """A booted ComfyUI tree. Module attributes are the host's own modules."""

    path: Path
    nodes: ModuleType
    execution: ModuleType
    folder_paths: ModuleType
    comfy: ModuleType
    pack_module: ModuleType
    pack_module_name: str
    custom_nodes_dir: Path
    models_dir: Path
    output_dir: Path
    input_dir: Path
    temp_dir: Path
    version: str
    extras_import_failed: list = field(default_factory=list)
    boot_log: list = field(default_factory=list)
    boot_seconds: float = 0.0
    pack_classes: dict = field(default_factory=dict)  # node id -> class, as the pack declares them

    def __repr__(self) -> str:
        return (f"Host(path={str(self.path)!r}, version={self.version!r}, pack={self.pack_module_name!r}, "
                f"nodes={len(self.pack_node_ids)})")

    @property
    def pack_node_ids(self) -> list[str]:
        return sorted(self.pack_classes)

    @property
    def node_class_mappings(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS

    def pack(self, name: str) -> ModuleType:
        """A submodule of the pack as ComfyUI loaded it, e.g. ``host.pack("miniworld.benchmark")``."""
        return importlib.import_module(f"{self.pack_module_name}.{name}")

    def node_class(self, class_type: str) -> Any:
        try:
            return self.nodes.NODE_CLASS_MAPPINGS[class_type]
        except KeyError:
            raise KeyError(f"missing node type {class_type!r} in the booted host {self.path}") from None

    def model_folder(self, folder_name: str) -> Path:
        """``models_dir/<folder_name>``, created and registered with ``folder_paths`` if new."""
        folder = self.models_dir / folder_name
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
        try:
            registered = self.folder_paths.get_folder_paths(folder_name)
        except KeyError:
            registered = []
        if str(folder) not in registered:
            self.folder_paths.add_model_folder_path(folder_name, str(folder), is_default=True)
        self.refresh_model_lists()
        return folder

    def refresh_model_lists(self) -> None:
        """Forget ``folder_paths``' cached file lists (new files are also noticed through directory mtimes)."""
        cache = getattr(self.folder_paths, "filename_list_cache", None)
        if isinstance(cache, dict):
            cache.clear()

    def filename_list(self, folder_name: str) -> list[str]:
        return list(self.folder_paths.get_filename_list(folder_name))

    def ui_file_path(self, item: dict) -> Path:
        """Path of a file from a UI output entry ``{"filename", "subfolder", "type"}`` (SaveImage etc.)."""
        base = self.folder_paths.get_directory_by_type(item.get("type", "output"))
        if base is None:
            raise ValueError(f"unknown output type in {item!r}")
        return Path(base) / item.get("subfolder", "") / item["filename"]


_lock = threading.Lock()
_HOST: Host | None = None


def current_host() -> Host | None:
    """The host booted in this process, or None."""
    return _HOST


def boot(
    comfyui_path: str | os.PathLike | None,
    *,
    models_dir: Path,
    output_dir: Path,
    input_dir: Path | None = None,
    temp_dir: Path | None = None,
    isolate_custom_nodes: bool = True,
) -> Host:
    """Boot ComfyUI from ``comfyui_path`` (see :func:`resolve_host_path`) and load the pack.

    Idempotent: a second call with the same tree returns the first :class:`Host` (its directories win);
    a different tree raises, because ComfyUI's modules are process-global.

    ``isolate_custom_nodes`` (default) makes the temporary directory holding the pack the only custom_nodes
    directory, so whatever else is installed in the tree's own ``custom_nodes/`` cannot interfere.
    """
    global _HOST
    path = resolve_host_path(comfyui_path)
    with _lock:
        if _HOST is not None:
            if _HOST.path != path:
                raise HostBootError(f"this process already booted {_HOST.path}; cannot also boot {path}")
            if Path(models_dir).resolve() != _HOST.models_dir or Path(output_dir).resolve() != _HOST.output_dir:
                log.warning("boot() called again with other directories; keeping %s / %s",
                            _HOST.models_dir, _HOST.output_dir)
            return _HOST
        _HOST = _boot(path, Path(models_dir), Path(output_dir), input_dir, temp_dir, isolate_custom_nodes)
        return _HOST


def boot_scratch(prefix: str = "personalize_") -> Host:
    """Boot the host named by ``COMFYUI_PATH`` (else the default tree) with its models, output, input and temp
    folders in a fresh temporary directory, for scripts that must not touch a user's folders."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    return boot(os.environ.get("COMFYUI_PATH") or None, models_dir=work / "models", output_dir=work / "out",
                input_dir=work / "in", temp_dir=work / "temp")


def replace_numeric(config, items: list[str]):
    """``dataclasses.replace(config, ...)`` from ``FIELD=VALUE`` strings (a script's ``--set``): int and float
    fields, and tuples of whole numbers written comma-separated (``vae_ch_mult=1,2,4,4``). Raises ValueError
    naming the allowed fields."""
    import dataclasses
    kinds = {f.name: type(getattr(config, f.name)) for f in dataclasses.fields(config)}
    allowed = [k for k, t in kinds.items() if t in (int, float, tuple)]
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in allowed:
            raise ValueError(f"--set {item}: not a numeric field; one of {', '.join(allowed)}")
        try:
            numbers = [float(v) for v in value.split(",")] if kinds[key] is tuple else [float(value)]
        except ValueError:
            raise ValueError(f"--set {item}: {value!r} is not a number"
                             + (" or a comma-separated list of them" if kinds[key] is tuple else "")) from None
        if kinds[key] in (int, tuple) and not all(n.is_integer() for n in numbers):
            raise ValueError(f"--set {item}: {key} takes whole numbers")
        if kinds[key] is tuple:
            changes[key] = tuple(int(n) for n in numbers)
        else:
            changes[key] = int(numbers[0]) if kinds[key] is int else numbers[0]
    return dataclasses.replace(config, **changes)


def _check_clean_process(path: Path) -> None:
    """Refuse to boot when ComfyUI modules from elsewhere (or the pack's ``nodes`` package) are imported."""
    for name in ("nodes", "execution", "folder_paths", "comfy"):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        locations = [getattr(mod, "__file__", None)] + list(getattr(mod, "__path__", None) or [])
        locations = [loc for loc in locations if loc]
        if not any(Path(loc).resolve().is_relative_to(path) for loc in locations):
            raise HostBootError(
                f"module {name!r} is already imported from {locations or '?'}, not from {path}. "
                "Boot the host before importing ComfyUI modules, and never put the repository root on sys.path "
                "(the pack's nodes/ would shadow nodes.py; use Host.pack for the pack's modules)."
            )
    if "comfy.model_management" in sys.modules:
        raise HostBootError("comfy.model_management was imported before boot(); args.cpu cannot be applied")


def host_device() -> str:
    """``$PERSONALIZE_DEVICE``: ``cpu`` (the default: ComfyUI's ``--cpu`` and ``--fp32-text-enc``, what CI and the
    demo run) or ``auto`` (ComfyUI's own choice with its default dtypes, i.e. the GPU and fp16 weights where one
    exists: how users run it; used to check the GPU paths on a GPU machine)."""
    value = (os.environ.get("PERSONALIZE_DEVICE") or "cpu").strip().lower()
    if value not in ("cpu", "auto"):
        raise HostBootError(f"PERSONALIZE_DEVICE={value!r}: expected 'cpu' (default) or 'auto'")
    return value


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _read_version(path: Path) -> str:
    version_file = path / "comfyui_version.py"
    if version_file.is_file():
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text(encoding="utf-8"))
        if match:
            return match.group(1)
    return "unknown"


def _make_custom_nodes_dir() -> Path:
    custom_nodes = Path(tempfile.mkdtemp(prefix="personalize_custom_nodes_"))
    (custom_nodes / PACK_LINK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    atexit.register(_remove_custom_nodes_dir, custom_nodes)
    return custom_nodes


def _remove_custom_nodes_dir(custom_nodes: Path) -> None:
    link = custom_nodes / PACK_LINK_NAME
    try:
        if link.is_symlink():
            link.unlink()  # never follow the link into the repository
        pycache = custom_nodes / "__pycache__"
        if pycache.is_dir() and not pycache.is_symlink():
            for f in pycache.iterdir():
                f.unlink()
            pycache.rmdir()
        custom_nodes.rmdir()
    except OSError:  # pragma: no cover - best effort at exit
        pass


def _pack_failure_message(messages: list[str], module_path: str) -> str | None:
    """The loader's traceback for ``module_path`` (the loader logs the traceback, then 'Cannot import ...')."""
    for i, message in enumerate(messages):
        if module_path in message and (message.startswith("Cannot import") or message.startswith("Skip ")
                                       or "comfy_entrypoint" in message):
            traceback_text = messages[i - 1] if i > 0 and "Traceback" in messages[i - 1] else ""
            return f"{traceback_text}\n{message}".strip()
    return None


def _pack_classes(pack_module: ModuleType, pack_name: str) -> dict:
    """``{node id: class}`` as the pack declares them: its V3 ``comfy_entrypoint()`` extension's node list (each
    class's ``GET_SCHEMA().node_id``), or a V1 ``NODE_CLASS_MAPPINGS`` (which ComfyUI's loader prefers)."""
    mappings = getattr(pack_module, "NODE_CLASS_MAPPINGS", None)
    if mappings is not None:
        return dict(mappings)
    entrypoint = getattr(pack_module, "comfy_entrypoint", None)
    if entrypoint is None:
        raise PackImportError(f"pack module {pack_name} has neither comfy_entrypoint nor NODE_CLASS_MAPPINGS")

    async def node_list():
        extension = entrypoint()
        if inspect.isawaitable(extension):
            extension = await extension
        return await extension.get_node_list()

    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(node_list())}


def _boot(path: Path, models_dir: Path, output_dir: Path, input_dir: Path | None, temp_dir: Path | None,
          isolate_custom_nodes: bool) -> Host:
    started = time.perf_counter()
    _check_clean_process(path)

    models_dir = models_dir.resolve()
    output_dir = output_dir.resolve()
    input_dir = Path(input_dir).resolve() if input_dir else Path(tempfile.mkdtemp(prefix="personalize_input_"))
    temp_dir = Path(temp_dir).resolve() if temp_dir else Path(tempfile.mkdtemp(prefix="personalize_temp_"))
    for directory in (models_dir, output_dir, input_dir, temp_dir):
        directory.mkdir(parents=True, exist_ok=True)
    for name in STANDARD_MODEL_FOLDERS:
        (models_dir / name).mkdir(exist_ok=True)

    # The host tree comes first, ahead of anything else that could provide `nodes` / `comfy` / `utils`.
    host_entry = str(path)
    while host_entry in sys.path:
        sys.path.remove(host_entry)
    sys.path.insert(0, host_entry)

    import comfy.cli_args  # noqa: E402  (argument parsing is off when ComfyUI is imported as a library)

    args = comfy.cli_args.args
    if host_device() == "cpu":
        args.cpu = True
        args.fp32_text_enc = True
    args.disable_api_nodes = True

    import torch

    torch.set_num_threads(_cpu_count())
    torch.set_flush_denormal(True)

    # Must precede `import nodes` (nodes.py puts comfy/ first on sys.path, shadowing utils/).
    importlib.import_module("utils.extra_config")

    import folder_paths

    for sub in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        # first in its list, so files nodes write (LoRAs, embeddings) land here, never in the tree's own models/
        folder_paths.add_model_folder_path(sub.name, str(sub), is_default=True)
    folder_paths.set_output_directory(str(output_dir))
    folder_paths.set_input_directory(str(input_dir))
    folder_paths.set_temp_directory(str(temp_dir))

    custom_nodes_dir = _make_custom_nodes_dir()
    entry = folder_paths.folder_names_and_paths.get("custom_nodes")
    if isolate_custom_nodes and entry is not None:
        entry[0][:] = []
    folder_paths.add_model_folder_path("custom_nodes", str(custom_nodes_dir))

    capture = _LogCapture()
    root_logger = logging.getLogger()
    root_logger.addHandler(capture)
    try:
        import nodes
        import execution

        if Path(nodes.__file__).resolve().parent != path:
            raise HostBootError(f"`import nodes` resolved to {nodes.__file__}, not to {path}/nodes.py")
        result = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        root_logger.removeHandler(capture)
    extras_failed = list(result) if isinstance(result, (list, tuple)) else []
    if extras_failed:
        log.warning("host built-in extra nodes that failed to import (missing optional deps): %s", extras_failed)

    module_path = os.path.join(str(custom_nodes_dir), PACK_LINK_NAME)
    failure = _pack_failure_message(capture.messages, module_path)
    if failure:
        raise PackImportError(f"ComfyUI failed to load the pack from {module_path}:\n{failure}")

    pack_init = (REPO_ROOT / "__init__.py").resolve()
    pack_name, pack_module = None, None
    for name, module in list(sys.modules.items()):
        module_file = getattr(module, "__file__", None)
        if module_file and module_file.startswith(module_path) and Path(module_file).resolve() == pack_init:
            pack_name, pack_module = name, module
            break
    if pack_module is None:
        tail = "\n".join(capture.messages[-30:])
        raise PackImportError(f"the pack was not imported from {module_path}; loader log tail:\n{tail}")

    pack_mappings = _pack_classes(pack_module, pack_name)
    wrong = {key: ("absent" if key not in nodes.NODE_CLASS_MAPPINGS else "shadowed by another class")
             for key in pack_mappings if nodes.NODE_CLASS_MAPPINGS.get(key) is not pack_mappings[key]}
    if wrong:
        details = ", ".join(f"{k} ({v})" for k, v in sorted(wrong.items()))
        raise PackImportError(
            f"pack nodes missing from nodes.NODE_CLASS_MAPPINGS: {details}. Built-in node ids cannot be "
            "overridden by custom nodes; every pack id must be unique (ids start with 'Personalize')."
        )

    host = Host(
        path=path,
        nodes=nodes,
        execution=execution,
        folder_paths=folder_paths,
        comfy=sys.modules["comfy"],
        pack_module=pack_module,
        pack_module_name=pack_name,
        custom_nodes_dir=custom_nodes_dir,
        models_dir=models_dir,
        output_dir=output_dir,
        input_dir=input_dir,
        temp_dir=temp_dir,
        version=_read_version(path),
        extras_import_failed=extras_failed,
        boot_log=list(capture.messages),
        boot_seconds=time.perf_counter() - started,
        pack_classes=dict(pack_mappings),
    )
    log.info("booted ComfyUI %s from %s in %.1fs; pack module %s with %d nodes", host.version, path,
             host.boot_seconds, pack_name, len(pack_mappings))
    return host

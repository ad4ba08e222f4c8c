"""Artefact files: safetensors with metadata, written atomically, never silently overwritten."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path


from .host import PersonalizeError

log = logging.getLogger("comfyui_personalize")

METADATA_PREFIX = "personalize."
FORMAT_VERSION = "1"


def model_dir(folder_name: str) -> Path:
    """First registered directory of a ComfyUI model folder ('loras', 'embeddings', ...)."""
    import folder_paths
    paths = folder_paths.get_folder_paths(folder_name)
    if not paths:
        raise PersonalizeError(f"ComfyUI has no '{folder_name}' model folder configured.")
    return Path(paths[0])


def target_path(folder_name: str, name: str, suffix: str = ".safetensors") -> Path:
    """Resolve a user-typed file name inside a model folder; subfolders allowed, escaping the folder is not."""
    name = name.strip()
    if not name:
        raise PersonalizeError(f"Give the {folder_name} file a name.")
    base = model_dir(folder_name).resolve()
    rel = name if name.endswith(suffix) else name + suffix
    path = (base / rel).resolve()
    if base != path.parent and base not in path.parents:
        raise PersonalizeError(f"'{name}' points outside the {folder_name} folder; use a plain file name.")
    return path


def check_writable(path: Path, overwrite: bool) -> None:
    """Fail before any work if the file exists and overwriting was not asked for."""
    if path.exists() and not overwrite:
        raise PersonalizeError(
            f"{path.name} already exists in {path.parent}. Choose another name, or enable 'overwrite'.")


def give_plain_mode(path) -> None:
    """Give a freshly written file the mode a plain ``open()`` would (0666 minus the umask): mkstemp, and
    safetensors' writer, create files readable by their owner only, which another user's ComfyUI cannot load."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_safetensors(tensors: dict, path: Path, metadata: dict, overwrite: bool = False) -> Path:
    """Write ``tensors`` with string metadata to ``path`` via a temporary file and an atomic rename."""
    from safetensors.torch import save_file
    check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {METADATA_PREFIX + "format": FORMAT_VERSION}
    for k, v in metadata.items():
        key = k if ("." in k or k.startswith("ss_")) else METADATA_PREFIX + k  # kohya's ss_* kept as is
        meta[key] = v if isinstance(v, str) else json.dumps(v)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        give_plain_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s (%d tensors, %.1f KB)", path, len(tensors), path.stat().st_size / 1024)
    return path


def load_safetensors(path: Path) -> tuple[dict, dict]:
    """Read tensors and metadata; a missing or corrupt file gives an error that says what to do."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise PersonalizeError(f"File not found: {path}. Check the name, or train/save the file first.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise PersonalizeError(f"{path.name} is not a readable safetensors file ({e}). Re-save or re-download it.") from e
    return tensors, meta


def read_metadata(meta: dict, key: str, default=None):
    raw = meta.get(METADATA_PREFIX + key)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return raw


__all__ = ["target_path", "check_writable", "save_safetensors", "load_safetensors", "read_metadata"]

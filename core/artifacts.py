"""Artefact files: safetensors with metadata, written atomically, never silently overwritten.

Every model file the pack writes follows one pattern, :class:`ArtifactKind`: a safetensors file whose metadata says
what it is (``personalize.kind``), which base-model family it belongs to, the widths it was built with, its format
version and a checksum of its tensors; a model folder registered in ``folder_paths`` in one way (the pack's own
shipped files, then ``models/<subdir>`` or an ``extra_model_paths.yaml`` entry); a loader node generated from the kind
(:func:`comfyui_personalize.nodes.artifacts.loader_node`); and one refusal, naming the fix, for a file of the wrong
kind, the wrong family, a newer format or damaged tensors. Files that stock nodes read (Textual Inversion
embeddings, kohya LoRAs) carry the same metadata and live in the stock folders.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .host import FAMILY_NAMES, PersonalizeError

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


def save_safetensors(tensors: dict, path: Path, metadata: dict, overwrite: bool = False,
                     version: int | str = FORMAT_VERSION) -> Path:
    """Write ``tensors`` with string metadata to ``path`` via a temporary file and an atomic rename."""
    from safetensors.torch import save_file
    check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {METADATA_PREFIX + "format": str(version)}
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


def write_file_checksum(path) -> str:
    """Write ``<file>.sha256`` (``sha256sum`` format) beside a shipped file, atomically; returns the digest."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sha = path.with_name(path.name + ".sha256")
    tmp = sha.with_name(sha.name + ".tmp")
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, sha)
    return digest


def check_file_checksum(path, remake: str) -> None:
    """Where a ``<file>.sha256`` sits beside ``path`` (the pack's shipped files), refuse a file that does not match
    it, naming the fix (``remake``: the command that re-creates the pair)."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    if path.is_file() and sidecar.is_file():
        if hashlib.sha256(path.read_bytes()).hexdigest() != sidecar.read_text().split()[0]:
            raise PersonalizeError(f"{path.name} does not match its checksum ({sidecar.name}): the file is damaged or "
                                   f"was replaced. Restore it with `git checkout -- models/`, or re-create both with "
                                   f"{remake}.")


def read_metadata(meta: dict, key: str, default=None):
    raw = meta.get(METADATA_PREFIX + key)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def tensor_checksum(tensors: dict) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, bytes): the same tensors give the same checksum
    whatever order or file layout they were saved in."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def family_name(family) -> str:
    return FAMILY_NAMES.get(family, str(family))


@dataclass
class Artifact:
    """A loaded pack file: its tensors and what its metadata says about them."""
    kind: "ArtifactKind"
    path: Path
    tensors: dict
    family: str | None
    widths: dict
    version: int
    metadata: dict = field(default_factory=dict)  # the remaining personalize.* fields, decoded


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of pack model file (HiFi subject, PromptNet, hypernetwork, ...): where it lives, how it is saved and
    loaded, and the one refusal for a file that is not one.

    ``folder`` is the ``folder_paths`` name; ``subdir`` its default place under ComfyUI's ``models/``; ``shipped``
    a folder of the pack's own files listed first (read-only, e.g. files pre-trained on the mini world);
    ``made_by`` names the node or script that writes it (said in errors); ``version`` the newest format this code
    reads and the one it writes; ``legacy_method`` the ``personalize.method`` of files written before
    ``personalize.kind`` existed. ``stock`` kinds live in a folder ComfyUI already has (embeddings, loras): the pack
    never registers those."""
    kind: str
    title: str
    folder: str
    made_by: str
    subdir: tuple[str, ...] = ()
    shipped: Path | None = None
    version: int = 1
    legacy_method: str | None = None
    stock: bool = False

    # -- the folder --------------------------------------------------------------------------------------------
    def register(self) -> None:
        """The ``folder_paths`` entry, through its public ``add_model_folder_path`` (no file system work): a new
        entry lists the pack's shipped folder, then ``models/<subdir>``; an entry registered earlier
        (``extra_model_paths.yaml``) keeps its folders first and gets the shipped folder appended. The entry's
        extension set, empty when made this way, is narrowed to ``.safetensors`` so that the loader lists only model
        files (the one private detail: ``folder_names_and_paths[name][1]``)."""
        if self.stock:
            return
        import folder_paths
        if self.folder not in folder_paths.folder_names_and_paths:
            paths = ([str(self.shipped)] if self.shipped else []) + [
                os.path.join(folder_paths.models_dir, *self.subdir)]
        else:
            paths = [str(self.shipped)] if self.shipped else []
        for path in paths:
            folder_paths.add_model_folder_path(self.folder, path)  # appends; a folder already listed stays put
        extensions = folder_paths.folder_names_and_paths[self.folder][1]
        if isinstance(extensions, set) and not extensions:
            extensions.add(".safetensors")

    def write_dir(self) -> Path:
        """Where new files go: the first registered folder that is not the pack's shipped one."""
        import folder_paths
        self.register()
        paths = [p for p in folder_paths.get_folder_paths(self.folder)
                 if not (self.shipped and Path(p).resolve() == Path(self.shipped).resolve())]
        if not paths:
            raise PersonalizeError(f"ComfyUI has no '{self.folder}' model folder configured.")
        return Path(paths[0])

    def target(self, name: str) -> Path:
        """Path for writing a file named by the user (subfolders allowed, leaving the folder is not)."""
        name = name.strip()
        if not name:
            raise PersonalizeError(f"Give the {self.title} file a name.")
        base = self.write_dir().resolve()
        rel = name if name.endswith(".safetensors") else name + ".safetensors"
        path = (base / rel).resolve()
        if base != path.parent and base not in path.parents:
            raise PersonalizeError(f"'{name}' points outside the {self.folder} folder; use a plain file name.")
        return path

    def filenames(self) -> list[str]:
        import folder_paths
        self.register()
        return folder_paths.get_filename_list(self.folder)

    def resolve(self, name_or_path) -> Path:
        """The file to read: an absolute path as is, else the name looked up in the registered folders (falling back
        to where it would be written, so a missing file is reported with its full path)."""
        p = Path(name_or_path)
        if p.is_absolute():
            return p
        import folder_paths
        self.register()
        full = folder_paths.get_full_path(self.folder, str(name_or_path))
        return Path(full) if full else self.target(str(name_or_path))

    def check_name(self, name: str) -> str | bool:
        """For a loader's ``validate_inputs``: True, or why the name cannot be a file of this kind. Existence is
        checked when the node runs (a file written earlier in the same run must validate)."""
        try:
            self.resolve(name)
        except PersonalizeError as e:
            return str(e)
        return True

    def fingerprint(self, name: str) -> str:
        """For a loader's ``fingerprint_inputs``: changes when the file does."""
        try:
            st = self.resolve(name).stat()
            return f"{st.st_mtime_ns}:{st.st_size}"
        except (OSError, PersonalizeError):
            return ""

    # -- the file ----------------------------------------------------------------------------------------------
    def save(self, tensors: dict, path, *, family: str | None, widths: dict | None = None,
             metadata: dict | None = None, overwrite: bool = False) -> Path:
        """Write ``tensors`` with the typed metadata of this kind (atomic; refuses to overwrite unless asked)."""
        meta = dict(metadata or {})
        meta.update({"kind": self.kind, "family": family or "", "widths": dict(widths or {}),
                     "checksum": tensor_checksum(tensors)})
        return save_safetensors(tensors, Path(path), meta, overwrite=overwrite, version=self.version)

    def load(self, name_or_path, family: str | None = None) -> Artifact:
        """Read a file of this kind; refuse, naming the fix, a file of another kind, another family (when ``family``
        is given), a newer format or tensors that do not match their checksum."""
        path = self.resolve(name_or_path)
        tensors, raw = load_safetensors(path)
        meta = {k[len(METADATA_PREFIX):]: read_metadata(raw, k[len(METADATA_PREFIX):])
                for k in raw if k.startswith(METADATA_PREFIX)}
        kind = meta.pop("kind", None)
        if kind is None and self.legacy_method and meta.get("method") == self.legacy_method:
            kind = self.kind
        if kind != self.kind:
            other = KINDS.get(kind)
            what = (f"a {other.title} file (written by {other.made_by})" if other
                    else f"a '{kind}' file" if kind else "a file without Personalize metadata")
            raise PersonalizeError(f"{path.name} is not a {self.title} file: it is {what}. Load a file written by "
                                   f"{self.made_by}.")
        version = int(meta.pop("format", 1) or 1)
        if version > self.version:
            raise PersonalizeError(f"{path.name} is a {self.title} file of format {version}; this version of the "
                                   f"pack reads up to format {self.version}. Update ComfyUI Personalize.")
        checksum = meta.pop("checksum", None)
        if checksum and checksum != tensor_checksum(tensors):
            raise PersonalizeError(f"{path.name} is damaged (its tensors do not match the checksum it was saved "
                                   f"with). Re-download it, or write it again with {self.made_by}.")
        file_family = meta.pop("family", None) or None
        if family is not None and file_family is not None and file_family != family:
            raise PersonalizeError(wrong_family(f"{path.name}", file_family, family, self.made_by))
        widths = meta.pop("widths", None) or {}
        return Artifact(self, path, tensors, file_family, widths, version, meta)


def wrong_family(what: str, file_family, family, made_by: str) -> str:
    """The one message for a file (or object) trained on another base-model family than the one it is used with."""
    return (f"{what} was trained on {family_name(file_family)} but is used with {family_name(family)}. Use one "
            f"trained on this checkpoint's family (retrain it with {made_by} on this model), or switch to a "
            f"{family_name(file_family)} checkpoint.")


#: every kind, by ``kind`` (filled by :func:`kind`): lets an error name what a wrong file is.
KINDS: dict[str, ArtifactKind] = {}


def kind(**fields) -> ArtifactKind:
    """Declare a kind of pack file (once per ``kind`` name)."""
    k = ArtifactKind(**fields)
    if k.kind in KINDS and KINDS[k.kind] != k:
        raise ValueError(f"artefact kind {k.kind!r} is declared twice")
    KINDS[k.kind] = k
    return k


def registered_kinds() -> tuple[ArtifactKind, ...]:
    return tuple(KINDS.values())


__all__ = ["target_path", "check_writable", "save_safetensors", "load_safetensors", "read_metadata", "ArtifactKind",
           "Artifact", "kind", "tensor_checksum", "wrong_family", "write_file_checksum", "check_file_checksum"]

"""Loading a subject's reference photos (and masks) from a folder of ComfyUI's input directory, or of the pack's
shipped subjects."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from comfy_api.v0_0_2 import io

from ..core.host import PersonalizeError
from ..core.inputs import check_file_name
from . import sockets as S

NODE = "Load Subject Images"

_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PACK_SUBJECTS = str(Path(__file__).resolve().parents[1] / "subjects")
"""Subject folders the pack ships (``scripts/build_subjects.py``): found when ComfyUI's input directory has no folder
of that name, so the example workflows run on a fresh install."""


def _square(img, size: int):
    from PIL import Image
    if size <= 0:
        return img
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.LANCZOS)


def _inside(base: str, folder: str) -> str | None:
    """``<base>/<folder>`` when it is a directory inside ``base`` (no escape through ``..`` or links), else None."""
    base = os.path.realpath(base)
    path = os.path.realpath(os.path.join(base, folder))
    return path if path.startswith(base + os.sep) and os.path.isdir(path) else None


def find_subject_folder(folder: str) -> str | None:
    """The subject folder's path: ``<ComfyUI input>/<folder>`` first, then the pack's shipped ``subjects/<folder>``;
    None when neither has it."""
    import folder_paths
    return _inside(folder_paths.get_input_directory(), folder) or _inside(PACK_SUBJECTS, folder)


def load_subject_folder(folder: str, size: int):
    """Read the subject folder (:func:`find_subject_folder`): photos, plus a mask per photo from
    ``<name>_mask.<ext>`` (white = subject) or from the photo's alpha channel (opaque = subject, as
    background-removal tools write); else all ones."""
    import folder_paths
    from PIL import Image, ImageOps
    check_file_name(NODE, "folder", folder, suffix="")
    path = find_subject_folder(folder)
    if path is None:
        shipped = sorted(f for f in os.listdir(PACK_SUBJECTS)
                         if os.path.isdir(os.path.join(PACK_SUBJECTS, f))) if os.path.isdir(PACK_SUBJECTS) else []
        raise PersonalizeError(
            f"{NODE}: no folder '{folder}' in ComfyUI's input directory "
            f"({os.path.realpath(folder_paths.get_input_directory())}) nor among the subjects the pack ships "
            f"({PACK_SUBJECTS}: {', '.join(shipped) or 'none'}). Put the subject photos in "
            f"input/{folder}/, or type the name of a folder that exists.")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(_EXTS) and "_mask." not in f.lower())
    if not files:
        raise PersonalizeError(f"The folder '{folder}' has no images ({', '.join(_EXTS)}).")

    def read(file_path: str):
        try:
            img = Image.open(file_path)
            img.load()
            return ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise PersonalizeError(
                f"{NODE}: {os.path.basename(file_path)} in '{folder}' is not a readable image ({type(e).__name__}: "
                f"{e}). Replace or remove that file.") from None

    images, masks = [], []
    for f in files:
        img = read(os.path.join(path, f))
        stem, _ = os.path.splitext(f)
        mask_file = next((os.path.join(path, stem + "_mask" + e) for e in _EXTS
                          if os.path.exists(os.path.join(path, stem + "_mask" + e))), None)
        if mask_file:
            mask = read(mask_file).convert("L")
        elif "A" in img.getbands():
            mask = img.getchannel("A")
        else:
            mask = Image.new("L", img.size, 255)
        if mask.size != img.size:
            raise PersonalizeError(f"{os.path.basename(mask_file)} is {mask.size} but {f} is {img.size}; masks must match their photo.")
        img, mask = _square(img.convert("RGB"), size), _square(mask, size)
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
        masks.append(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0))
    if len({tuple(i.shape) for i in images}) != 1:
        raise PersonalizeError(f"The photos in '{folder}' have different sizes; set size > 0 to crop them all to one square size.")
    return torch.stack(images), torch.stack(masks)


class LoadSubjectImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return S.schema(
            node_id="PersonalizeLoadSubjectImages",
            display_name="Load Subject Images (folder)",
            category=S.CATEGORY + "/utils",
            description=("Loads all photos of a subject from a folder in ComfyUI's input directory (or, when that has "
                         "no such folder, from the subjects the pack ships), centre-cropped to squares, with masks "
                         "from <name>_mask.png files or the photos' alpha channel."),
            search_aliases=["subject photos", "load image folder", "reference images"],
            inputs=[
                io.String.Input("folder", default="subject",
                                tooltip="Folder inside ComfyUI's input directory; when that has none of this name, "
                                        "the pack's own subjects/ folder (the example subjects it ships) is "
                                        "searched."),
                io.Int.Input("size", default=512, min=0, max=4096, step=8,
                             tooltip="Square size to crop and resize to (0 = keep the photos' own size)."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Mask.Output(display_name="masks")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, size):
        try:
            path = find_subject_folder(folder)
            if path is None:
                return ""
            return ";".join(f"{f}:{os.path.getmtime(os.path.join(path, f))}" for f in sorted(os.listdir(path)))
        except OSError:  # e.g. a name too long: execute() says so
            return ""

    @classmethod
    def execute(cls, folder, size) -> io.NodeOutput:
        return io.NodeOutput(*load_subject_folder(folder, size))


NODES = [LoadSubjectImages]

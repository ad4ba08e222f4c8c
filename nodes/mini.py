"""Loader of the mini model family (core/mini_family.py): the small SD1-architecture model trained on the mini world
(`make mini-world`), as ComfyUI MODEL, CLIP and VAE."""
from __future__ import annotations

import os

from ..core import mini_family
from ..core.host import PersonalizeError
from . import sockets as S

FOLDER = "personalize_mini"  # <pack>/models (the committed weights) and models/personalize/mini
PACK_MODELS = str(mini_family.PACK_MODELS)


def register_folder() -> None:
    """A ``folder_paths`` entry only (no file system work): the pack's own models/ first, then ComfyUI's
    models/personalize/mini."""
    import folder_paths
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = (
            [PACK_MODELS, os.path.join(folder_paths.models_dir, "personalize", "mini")], {".safetensors"})


register_folder()


class LoadMiniModel:
    DESCRIPTION = ("Loads a mini-world checkpoint: a small Stable-Diffusion-1-architecture model (UNet, CLIP text "
                   "encoder, VAE built from ComfyUI's own classes) trained on the pack's procedural 64x64 world. Every "
                   "node treats it as SD1.x. For a real model, use Load Checkpoint instead - the rest of a workflow "
                   "stays the same.")
    CATEGORY = S.CATEGORY + "/mini_world"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"ckpt_name": (folder_paths.get_filename_list(FOLDER),
                                           {"tooltip": "A file in the pack's models/ or models/personalize/mini."})}}

    def load(self, ckpt_name):
        import folder_paths
        path = folder_paths.get_full_path(FOLDER, ckpt_name)
        if path is None:
            raise PersonalizeError(f"Load Mini Model: {ckpt_name} is not in the mini model folders "
                                   f"({', '.join(folder_paths.get_folder_paths(FOLDER))}). Run `make mini-world`.")
        return mini_family.load_checkpoint(path, embedding_directory=folder_paths.get_folder_paths("embeddings"))


NODE_CLASS_MAPPINGS = {"PersonalizeLoadMiniModel": LoadMiniModel}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeLoadMiniModel": "Load Mini Model (mini world)"}

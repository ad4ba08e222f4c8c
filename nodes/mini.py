"""Loader of the mini model family (core/mini_family.py): the small SD1-architecture model trained on the mini world
(`make mini-world`), as ComfyUI MODEL, CLIP and VAE."""
from __future__ import annotations

import os

from ..core import mini_family
from ..core.host import PersonalizeError
from comfy_api.v0_0_2 import io

from . import sockets as S

FOLDER = "personalize_mini"  # <pack>/models (the committed weights) and models/personalize/mini
PACK_MODELS = str(mini_family.PACK_MODELS)


def register_folder() -> None:
    """A ``folder_paths`` entry only (no file system work): the pack's own models/ first, then ComfyUI's
    models/personalize/mini. When the folder is registered already (an ``extra_model_paths.yaml`` entry), that entry
    is kept and the pack's models/ is added at its end, so the shipped mini_world.safetensors is always listed; an
    entry registered without extensions is narrowed to ``.safetensors``."""
    import folder_paths
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[FOLDER] = (
            [PACK_MODELS, os.path.join(folder_paths.models_dir, "personalize", "mini")], {".safetensors"})
        return
    paths, extensions = entry
    if not any(os.path.normcase(os.path.abspath(p)) == os.path.normcase(PACK_MODELS) for p in paths):
        paths.append(PACK_MODELS)
    if isinstance(extensions, set) and not extensions:
        extensions.add(".safetensors")


class LoadMiniModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths
        register_folder()
        return S.schema(
            node_id="PersonalizeLoadMiniModel",
            display_name="Load Mini Model (mini world)",
            category=S.CATEGORY + "/mini_world",
            description=("Loads a mini-world checkpoint: a small Stable-Diffusion-1-architecture model (UNet, CLIP "
                         "text encoder, VAE built from ComfyUI's own classes) trained on the pack's procedural 64x64 "
                         "world. Every node treats it as SD1.x. For a real model, use Load Checkpoint instead - the "
                         "rest of a workflow stays the same."),
            search_aliases=["mini world", "tiny model", "demo checkpoint"],
            inputs=[io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A file in the pack's models/ or models/personalize/mini.")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        import folder_paths
        path = folder_paths.get_full_path(FOLDER, ckpt_name)
        if path is None:
            raise PersonalizeError(f"Load Mini Model: {ckpt_name} is not in the mini model folders "
                                   f"({', '.join(folder_paths.get_folder_paths(FOLDER))}). Run `make mini-world`.")
        return io.NodeOutput(*mini_family.load_checkpoint(
            path, embedding_directory=folder_paths.get_folder_paths("embeddings")))


NODES = [LoadMiniModel]

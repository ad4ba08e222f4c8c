"""Loaders of the mini model family (core/mini_family.py): the small SD1-architecture model trained on the mini world
(`make mini-world`), as ComfyUI MODEL, CLIP and VAE, and its CLIP vision tower (networks/mini_clip.py) as a
CLIP_VISION."""
from __future__ import annotations

import os

from ..core import artifacts, mini_family
from ..core.host import PersonalizeError
from ..networks import mini_clip  # declares the CLIP vision file kind, so register_folders registers its folder
from comfy_api.v0_0_2 import io

from . import sockets as S
from .artifacts import loader_node

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


def _inside(path: str, folder: str) -> bool:
    """Whether the file ``path`` lies in ``folder`` or below (linked folders resolved; a linked file is judged by
    where its link is)."""
    path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    path, folder = os.path.normcase(path), os.path.normcase(os.path.realpath(folder))
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives (Windows)
        return False


def checkpoint_names() -> list[str]:
    """The files Load Mini Model lists: the folder's files (ComfyUI lists its subfolders recursively), less those in
    another pack file kind's shipped folder under one of its roots (e.g. ``clip_vision/mini_world_clip_vision
    .safetensors`` in the pack's models/, which is no checkpoint). A kind whose shipped folder is a root itself
    excludes nothing."""
    import folder_paths
    roots = folder_paths.get_folder_paths(FOLDER)
    others = [str(k.shipped) for k in artifacts.registered_kinds() if k.shipped is not None
              and not any(os.path.normcase(os.path.realpath(k.shipped)) == os.path.normcase(os.path.realpath(r))
                          for r in roots)]
    names = folder_paths.get_filename_list(FOLDER)
    if not others:
        return names
    kept = []
    for name in names:
        path = folder_paths.get_full_path(FOLDER, name)
        if path is None or not any(_inside(path, other) for other in others):
            kept.append(name)
    return kept


class LoadMiniModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
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
            inputs=[io.Combo.Input("ckpt_name", options=checkpoint_names(),
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


LoadMiniCLIPVision = loader_node(
    mini_clip.CLIP_VISION_FILE, node_id="PersonalizeLoadMiniCLIPVision", class_name="LoadMiniCLIPVision",
    display_name="Load Mini CLIP Vision (mini world)", category=S.CATEGORY + "/mini_world",
    description=("Loads the mini world's CLIP vision tower: ComfyUI's own CLIP vision model (the ViT that Load CLIP "
                 "Vision builds for ViT-L/14 or ViT-H/14) at a small size - 64x64 input, 8x8 patches (65 tokens), "
                 "4 layers of width 128, 128-d image embeddings - pre-trained contrastively on the mini world's "
                 "captions. CLIP Vision Encode and every node that takes a CLIP_VISION treat it as a real one. For a "
                 "real model, use Load CLIP Vision instead."),
    search_aliases=["mini world", "clip vision", "image encoder"], input_name="clip_name",
    output=io.ClipVision.Output(), load=mini_clip.load_clip_vision)


NODES = [LoadMiniModel, LoadMiniCLIPVision]

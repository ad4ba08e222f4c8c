"""The engine's frozen host networks (core/pretrain.host_networks): loaded through ComfyUI as the stock loaders load
them (a checkpoint Load Checkpoint reads, the mini family, a mini CLIP vision file), frozen, and a bad path refused
before any work."""
from __future__ import annotations

import pytest
import torch

from helpers import pack_module


@pytest.fixture(scope="module")
def pretrain(host):
    return pack_module(host, "core.pretrain")


@pytest.fixture(scope="module")
def mini_clip_file(host, tmp_path_factory):
    mc = pack_module(host, "networks.mini_clip")
    return mc.save_vision(mc.ContrastiveCLIP(seed=3), tmp_path_factory.mktemp("cv") / "cv.safetensors")


def _all_frozen(nets) -> bool:
    mods = [nets.model.model, nets.clip.patcher.model, nets.vae.patcher.model]
    if nets.clip_vision is not None:
        mods.append(nets.clip_vision.patcher.model)
    return all(not p.requires_grad for m in mods for p in m.parameters())


def test_stock_checkpoint_and_mini_clip_vision(host, pretrain, ckpt_sd15, mini_clip_file):
    path = host.model_folder("checkpoints") / ckpt_sd15
    nets = pretrain.host_networks(path, mini_clip_file)
    assert pack_module(host, "core.host").model_family(nets.model) == "sd1"
    assert _all_frozen(nets)
    out = nets.clip_vision.encode_image(torch.rand(2, 64, 64, 3))
    assert tuple(out["last_hidden_state"].shape) == (2, 65, 128)


def test_default_is_the_shipped_mini_family(host, pretrain):
    nets = pretrain.host_networks()
    assert type(nets.model.model.model_config).__name__ == "SD15Mini"
    assert nets.clip_vision is None and _all_frozen(nets)


def test_bad_paths_are_refused(host, pretrain, tmp_path, mini_clip_file):
    err = pack_module(host, "core.host").PersonalizeError
    with pytest.raises(err, match="does not exist"):
        pretrain.host_networks(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(err, match="cannot be loaded as a checkpoint"):
        pretrain.host_networks(junk)
    with pytest.raises(err, match="CLIP vision"):
        pretrain.host_networks(None, junk)

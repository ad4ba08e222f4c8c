"""The mini model family (core/mini_family.py): real ComfyUI MODEL/CLIP/VAE objects with small widths, saved and
loaded by the pack's loader node, run by stock nodes and by the pack's training nodes as an SD1.x model."""
import os
import stat

import pytest
import torch

from helpers import call_node, pack_module


@pytest.fixture(scope="module")
def mf(host):
    return pack_module(host, "core.mini_family")


@pytest.fixture(scope="module")
def mini_file(host, mf, ckpt_mini):
    """The session's freshly initialised mini file and, rebuilt with the same seed, the objects it was made from."""
    tf = pack_module(host, "miniworld.train_family")
    model, clip, vae = mf.build(seed=0)
    return host.model_folder("personalize_mini") / ckpt_mini, (model, clip, vae), tf.token_ids_of_world(clip)


def test_file_round_trip_and_size(mf, mini_file):
    path, (model, clip, vae), ids = mini_file
    assert path.stat().st_size < 40e6
    m2, c2, v2 = call_node("PersonalizeLoadMiniModel", ckpt_name=path.name)
    assert type(m2.model.model_config).__name__ == "SD15Mini"
    assert m2.model.latent_format.scale_factor == 0.5
    assert path.with_name(path.name + ".sha256").read_text().split()[1] == path.name
    sd1 = model.model.diffusion_model.state_dict()
    for k, v in m2.model.diffusion_model.state_dict().items():
        torch.testing.assert_close(v, sd1[k].half().float())
    emb = c2.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight
    ref = clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight
    torch.testing.assert_close(emb[ids], ref[ids].half().float())
    torch.testing.assert_close(emb, ref, atol=1e-4, rtol=1e-3)  # other rows: the same seeded table


def test_stock_nodes_sample_with_it(host, mini_file):
    path = mini_file[0]
    model, clip, vae = call_node("PersonalizeLoadMiniModel", ckpt_name=path.name)
    assert pack_module(host, "core.host").model_family(model) == "sd1"
    pos = call_node("CLIPTextEncode", clip=clip, text="a photo of a star on the beach")[0]
    assert pos[0][0].shape == (1, 77, 128)
    latent = call_node("EmptyLatentImage", width=64, height=64, batch_size=2)[0]
    out = call_node("KSampler", model=model, seed=1, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                    positive=pos, negative=pos, latent_image=latent, denoise=1.0)[0]
    image = call_node("VAEDecode", samples=out, vae=vae)[0]
    assert image.shape == (2, 64, 64, 3) and torch.isfinite(image).all()
    enc = call_node("VAEEncode", pixels=image, vae=vae)[0]["samples"]
    assert enc.shape == (2, 4, 8, 8)


def test_loader_rejects_other_files(host, mf, tmp_path):
    from safetensors.torch import save_file
    err = pack_module(host, "core.host").PersonalizeError
    bad = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(bad), metadata={"format": "other"})
    with pytest.raises(err, match="not a mini-world checkpoint"):
        mf.load_checkpoint(bad)
    bad.write_bytes(b"garbage")
    with pytest.raises(err, match="cannot be read"):
        mf.load_checkpoint(bad)


@pytest.mark.parametrize("variant", [(64, 2, (1, 1, 2, 2)), (32, 1, (1, 2, 4, 4))], ids=["wide", "wide-low-res"])
def test_wider_vae_round_trips_and_other_configs_are_refused(host, mf, tmp_path, variant):
    """A family built with a wider VAE (``vae_config(64, 2)``, or wider only at the low resolutions,
    ``ch_mult=(1, 2, 4, 4)``) records it in the file, loads back with that VAE (same weights, same decode), and a
    file declaring any other change to the VAE is refused before loading."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    err = pack_module(host, "core.host").PersonalizeError
    tf = pack_module(host, "miniworld.train_family")
    wide = mf.vae_config(*variant)
    dd = wide["ddconfig"]
    assert (dd["ch"], dd["num_res_blocks"], tuple(dd["ch_mult"])) == variant
    assert mf.vae_config() == mf.MINI_VAE_CONFIG
    with pytest.raises(ValueError, match="multiple|32, 64"):
        mf.vae_config(48)  # GroupNorm's 32 groups
    for bad_mult in ((1, 2, 4), (1, 2, 4, 9), (1, 2, 2.5, 4)):
        with pytest.raises(ValueError, match="ch_mult"):
            mf.vae_config(32, 1, bad_mult)
    model, clip, vae = mf.build(seed=1, vae_cfg=wide)
    assert vae.first_stage_model.encoder.down[2].block[0].conv1.out_channels == dd["ch"] * dd["ch_mult"][2]
    path = tmp_path / "wide.safetensors"
    mf.save_checkpoint(path, model, clip, vae, tf.token_ids_of_world(clip), 0.5)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # readable as a plain open() would make it
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["vae_config"]) == wide
    _m, _c, vae2 = mf.load_checkpoint(path)
    assert vae2.mini_vae_config == wide
    for k, v in vae.first_stage_model.state_dict().items():
        torch.testing.assert_close(vae2.first_stage_model.state_dict()[k].float(), v.half().float(), msg=k)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vae2.decode(z), _roundtrip_decode(vae, z), rtol=1e-2, atol=1e-2)
    for change in ({"ch_mult": [1, 2, 2]}, {"ch_mult": [1, 2, 2, 9]}, {"ch": 48}, {"z_channels": 8}):
        other = json.loads(meta["vae_config"])
        other["ddconfig"].update(change)
        bad = tmp_path / "other.safetensors"
        save_file(load_file(str(path)), str(bad), metadata={**meta, "vae_config": json.dumps(other)})
        with pytest.raises(err, match="another mini-family configuration \\(vae_config\\)"):
            mf.load_checkpoint(bad)


def _roundtrip_decode(vae, z):
    """``vae.decode`` with the weights rounded to fp16 as the file stores them."""
    import copy
    v = copy.copy(vae)
    v.first_stage_model = copy.deepcopy(vae.first_stage_model)
    with torch.no_grad():
        for p in v.first_stage_model.parameters():
            p.copy_(p.half().float())
    return v.decode(z)


@pytest.fixture
def fresh_filename_lists():
    import folder_paths
    folder_paths.filename_list_cache.clear()
    yield
    folder_paths.filename_list_cache.clear()


def test_shipped_mini_model_is_listed_when_the_folder_is_registered_already(host, tmp_path, monkeypatch,
                                                                            fresh_filename_lists):
    """A user's extra_model_paths.yaml entry for personalize_mini is kept, and the pack's models/ is added to it."""
    import folder_paths
    mini = pack_module(host, "nodes.mini")
    user = tmp_path / "my_mini_models"
    user.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, mini.FOLDER, ([str(user)], set()))
    mini.register_folder()
    mini.register_folder()  # idempotent
    paths, extensions = folder_paths.folder_names_and_paths[mini.FOLDER]
    assert paths == [str(user), mini.PACK_MODELS] and extensions == {".safetensors"}
    assert "mini_world.safetensors" in folder_paths.get_filename_list(mini.FOLDER)


def test_mini_folder_registered_fresh(host, monkeypatch, fresh_filename_lists):
    import folder_paths
    mini = pack_module(host, "nodes.mini")
    monkeypatch.delitem(folder_paths.folder_names_and_paths, mini.FOLDER)
    mini.register_folder()
    paths, extensions = folder_paths.folder_names_and_paths[mini.FOLDER]
    assert paths[0] == mini.PACK_MODELS and extensions == {".safetensors"}
    assert "mini_world.safetensors" in folder_paths.get_filename_list(mini.FOLDER)

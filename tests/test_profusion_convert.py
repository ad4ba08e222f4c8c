"""The converter from the ProFusion authors' released pipeline folder to the pack's PromptNet file
(networks/promptnet_convert.py, scripts/convert_profusion.py): the converted file gives the S* of an independent
re-implementation of the official ``PromptNetModel`` forward (tests/profusion_official.py, official tensor names) on
the same inputs, every official tensor but the unused residual projections is used, ``.safetensors`` and ``.bin``
both read, bad folders and configs are refused with the fix, and the UNet config written is the one ComfyUI detects
for the matching checkpoint (the converted file fits an SD2-shaped MODEL, not an SD1 one)."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from helpers import pack_module
from profusion_official import OfficialPromptNet, make_official_folder, randomise, tiny_config

REPO = Path(__file__).resolve().parents[1]
VISION = 48
CA, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
#: SD1-shaped: a fixed number of heads (head widths 32 and 64), 1×1-convolution projections; region kernel 4 → 2×2
#: tokens for 64×64 latents (the token order is checked too)
SD1_LIKE = tiny_config(attention_head_dim=2, use_linear_projection=False, region_kernel_size=4)


@pytest.fixture(scope="module")
def conv(host):
    return pack_module(host, "networks.promptnet_convert")


@pytest.fixture(scope="module")
def pn(host):
    return pack_module(host, "networks.promptnet")


@pytest.fixture(scope="module")
def err(host):
    return pack_module(host, "core.host").PersonalizeError


@pytest.fixture(scope="module")
def script(host):
    spec = importlib.util.spec_from_file_location("convert_profusion", REPO / "scripts" / "convert_profusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(batch=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([17.0, 803.0])[:batch],
            torch.randn(batch, 5, VISION, generator=g), torch.randn(batch, 4, size, size, generator=g))


@pytest.mark.parametrize("variant", ["sd2", "sd1"])
def test_converted_file_gives_the_official_s_star(variant, script, pn, tmp_path, caplog):
    config = tiny_config() if variant == "sd2" else SD1_LIKE
    folder, official = make_official_folder(tmp_path, config, vision_width=VISION, seed=3)
    out = tmp_path / "converted.safetensors"
    with caplog.at_level(logging.INFO, logger="comfyui_personalize"):
        assert script.main(["--pipeline", str(folder), "--out", str(out), "--dtype", "fp32"]) == 0
    assert "dropped" in caplog.text and "residual" in caplog.text
    net = pn.load_promptnet(out)
    assert net.family == variant and net.vision_width == VISION and net.text_width == 24
    assert net.unet_config["use_linear_in_transformer"] is (variant == "sd2")
    assert (net.unet_config["num_heads"], net.unet_config["num_head_channels"]) == \
        ((-1, 64) if variant == "sd2" else (2, -1))
    ref, t, tokens, x = _inputs()
    with torch.no_grad():
        ours = net(ref, t, tokens, x)
        theirs = official(ref, t, tokens, x)[0]
    assert theirs.shape == (2, 1 if variant == "sd2" else 4, 24) and ours.shape == theirs.shape
    scale = float(theirs.abs().max())
    assert scale > 0.1
    assert float((ours - theirs).abs().max()) <= 1e-4 * scale
    # the S* differs across the batch and with x_t: the comparison is not between constants
    assert float((theirs[0] - theirs[1]).abs().max()) > 1e-2 * scale


def test_every_official_tensor_is_used_where_it_belongs(conv, pn, tmp_path):
    """Official name → our name for every tensor but the residual projections, one to one onto our state dict."""
    config = tiny_config()
    official = randomise(OfficialPromptNet(config, VISION), 5)
    state = official.state_dict()
    net = conv.convert_official(state, config)
    ours = net.state_dict()
    unet_map = conv.unet_key_map(net.unet_config, net.encoder.state_dict().keys())
    residual = [k for k in state if "residual_projection" in k]
    # residual_projections (weight, bias) and residual_projections_2 (weight): after conv_in, each resnet and each
    # downsampler (1 + 3 + 3 + 3 + 2); the middle block's pair (3 tensors)
    assert len(residual) == 3 * (1 + 3 * 3 + 2) + 3
    used = {}
    for key, value in state.items():
        if key in residual:
            continue
        target = unet_map.get(key) or conv.head_key(key, 4)
        assert target is not None, key
        assert torch.equal(ours[target], value), key
        used[target] = key
    assert sorted(used) == sorted(ours)  # one to one: every tensor of ours filled, none twice
    assert used["prompt_projections.5.weight"] == "mid_prompt_projection.weight"
    assert used["encoder.input_blocks.0.0.weight"] == "conv_in.weight"
    assert used["encoder.time_embed.2.weight"] == "time_embedding.linear_2.weight"
    assert used["encoder.middle_block.2.out_layers.3.weight"] == "mid_block.resnets.1.conv2.weight"


def test_bin_and_safetensors_give_the_same_network(conv, tmp_path):
    config = tiny_config()
    official = randomise(OfficialPromptNet(config, VISION), 7)
    a, _ = make_official_folder(tmp_path / "st", config, model=official)
    b, _ = make_official_folder(tmp_path / "bin", config, model=official, fmt="bin")
    assert (b / "promptnet" / "diffusion_pytorch_model.bin").is_file()
    net_a, net_b = conv.convert_folder(a), conv.convert_folder(b)
    sa, sb = net_a.state_dict(), net_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the promptnet folder itself is accepted too
    assert conv.convert_folder(a / "promptnet").config == net_a.config


def test_script_writes_fp16_by_default_and_never_overwrites_unasked(script, pn, host, tmp_path):
    from safetensors import safe_open
    folder, _ = make_official_folder(tmp_path, tiny_config(), vision_width=VISION)
    name = "converted_profusion_test"
    assert script.main(["--pipeline", str(folder), "--out", name]) == 0
    path = pn.PROMPTNET_FILE.write_dir() / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("prompt_out.weight").dtype == torch.float16
    before = path.stat().st_mtime_ns
    assert script.main(["--pipeline", str(folder), "--out", name]) == 2  # exists: refused, untouched
    assert path.stat().st_mtime_ns == before
    assert script.main(["--pipeline", str(folder), "--out", name, "--overwrite", "--dtype", "fp32"]) == 0
    assert pn.load_promptnet(name).family == "sd2"
    assert not list(path.parent.glob(f".{name}*"))  # no temporary file left
    path.unlink()


def test_bad_folders_are_refused_with_the_fix(conv, tmp_path, err):
    with pytest.raises(err, match="is not a folder"):
        conv.convert_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(err, match="no promptnet/ folder.*unpack"):
        conv.convert_folder(tmp_path / "empty")
    folder, _ = make_official_folder(tmp_path / "a", tiny_config(), vision_width=VISION)
    weights = folder / "promptnet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1000])
    with pytest.raises(err, match="could not be read.*Download the pipeline again"):
        conv.convert_folder(folder)
    weights.unlink()
    with pytest.raises(err, match="has no weights"):
        conv.convert_folder(folder)
    weights.write_bytes(data)
    (folder / "promptnet" / "config.json").unlink()
    with pytest.raises(err, match="has no config.json"):
        conv.convert_folder(folder)


def test_foreign_tensors_and_shapes_are_refused(conv, err):
    config = tiny_config()
    state = OfficialPromptNet(config, VISION).state_dict()
    with pytest.raises(err, match="unknown tensors: extra_head.weight"):
        conv.convert_official({**state, "extra_head.weight": torch.zeros(1)}, config)
    missing = {k: v for k, v in state.items() if k != "mid_block.attentions.0.proj_in.weight"}
    with pytest.raises(err, match="missing tensors: encoder.middle_block.1.proj_in.weight"):
        conv.convert_official(missing, config)
    wrong = dict(state, **{"down_prompt_projections.1.weight": torch.zeros(16, 128, 3, 3)})
    with pytest.raises(err, match="wrong shapes: down_prompt_projections.1.weight"):
        conv.convert_official(wrong, config)
    with pytest.raises(err, match=r"wrong shapes: .*proj_in.weight.*Download a model pre-trained on FFHQ"):
        conv.convert_official(state, dict(config, use_linear_projection=False))  # 1×1 convolutions expected


@pytest.mark.parametrize("change, message", [
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"norm_num_groups": 16}, "norm_num_groups"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D", CA, CA, DOWN]}, "not supported"),
    ({"attention_head_dim": [1, 3, 2, 2]}, "not divisible"),
    ({"attention_head_dim": [2, 1, 4, 4]}, "neither a fixed number of heads nor a fixed head width"),
    ({"block_out_channels": [64, 96, 128, 128]}, "not multiples of the first"),
    ({"only_cross_attention": True}, "only_cross_attention"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
])
def test_configs_ours_cannot_express_are_refused(conv, err, change, message):
    with pytest.raises(err, match=message):
        conv.unet_config_from_official(tiny_config(**change))


def _detected(host, unet):
    """ComfyUI's own model detection of a UNet of this config (built on the meta device: shapes only)."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    full = dict(unet, image_size=32, out_channels=unet["in_channels"], use_spatial_transformer=True, legacy=False,
                transformer_depth_output=[d for level in range(len(unet["channel_mult"]))
                                          for d in [unet["transformer_depth"][level * unet["num_res_blocks"][0]]]
                                          * (unet["num_res_blocks"][level] + 1)])
    model = UNetModel(**full, device="meta", operations=comfy.ops.disable_weight_init)
    sd = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    return comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")


@pytest.mark.parametrize("which", ["sd2", "sd1"])
def test_real_configs_give_what_comfyui_detects(conv, pn, host, which):
    """The released model's UNet shape (SD-2-base: 4 levels 320/640/1280/1280, heads 5/10/20/20, linear
    projections, context 1024) and SD1.5's (8 heads, convolutions, context 768) give the unet config ComfyUI's
    detection gives for such a checkpoint (its SD20 / SD15 model config)."""
    config = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
              "down_block_types": [CA, CA, CA, DOWN], "mid_block_type": "UNetMidBlock2DCrossAttn",
              **({"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True}
                 if which == "sd2" else
                 {"attention_head_dim": 8, "cross_attention_dim": 768, "use_linear_projection": False})}
    unet = conv.unet_config_from_official(config)
    assert conv.family_of(unet) == which
    detected = _detected(host, unet)
    assert type(detected).__name__ == ("SD20" if which == "sd2" else "SD15")
    assert pn.encoder_config(detected.unet_config) == unet
    assert unet["transformer_depth"] == [1, 1, 1, 1, 1, 1, 0, 0]


def test_converted_file_fits_the_sd2_model_not_sd1(conv, pn, sd2, sd15, err, tmp_path):
    """An official PromptNet of the SD2 test checkpoint's shape (320 channels ×4 levels, attention on the first two,
    heads of 64, context 1024), converted and written, passes check_model for that MODEL and is refused for SD1."""
    config = tiny_config(block_out_channels=[320] * 4, res_block_out_channels=[32] * 4,
                         down_block_types=[CA, CA, DOWN, DOWN], attention_head_dim=[5] * 4, cross_attention_dim=1024,
                         prompt_channel=1024)
    net = conv.convert_official(OfficialPromptNet(config, 1280).state_dict(), config)
    path = net.save(tmp_path / "sd2.safetensors")
    loaded = pn.load_promptnet(path)
    assert loaded.family == "sd2" and loaded.vision_width == 1280 and loaded.text_width == 1024
    loaded.check_model(sd2[0])
    with pytest.raises(err, match="does not fit this MODEL"):
        loaded.check_model(sd15[0])

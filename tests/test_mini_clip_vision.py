"""Load Mini CLIP Vision (nodes/mini.py, networks/mini_clip.py): the mini family's CLIP vision tower as a real
CLIP_VISION. The stock CLIP Vision Encode node takes it through ComfyUI's executor, its output carries the fields
and shapes of a ViT with the tower's settings, and the values are those of an independent forward pass of the
file's weights. Bad files are refused with what to do, and Load Mini Model does not list the tower's file.

The tests write their own tower file (random weights, every code path the real one); the shipped, trained file
(``models/clip_vision/mini_world_clip_vision.safetensors``) is checked too when it is there."""
from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import pack_module, save_png

LOAD = "PersonalizeLoadMiniCLIPVision"
FOLDER = "personalize_clip_vision"
B, TOKENS, WIDTH, EMBED = 2, 65, 128, 128  # VISION_CONFIG: (64 / 8)² patches + the class token, width, projection


@pytest.fixture(scope="module")
def mc(host):
    return pack_module(host, "networks.mini_clip")


@pytest.fixture(scope="module")
def err(host):
    return pack_module(host, "core.host").PersonalizeError


@pytest.fixture(scope="module")
def loader(host):
    return host.node_class(LOAD)


@pytest.fixture(scope="module")
def vision_file(host, mc):
    """A tower with random weights (seed 0) written by the pack's writer into the session's CLIP vision folder."""
    folder = host.model_folder(FOLDER)  # the session's models dir, first in the folder's list
    path = mc.save_vision(mc.build_vision(seed=0), folder / f"test_clip_vision_{uuid.uuid4().hex[:8]}.safetensors")
    host.refresh_model_lists()
    return path


@pytest.fixture(scope="module")
def photos(host):
    """Two different 80×96 (non-square: the encoder resizes and centre-crops) photos in the input folder."""
    names = []
    for i in range(B):
        g = torch.Generator().manual_seed(100 + i)
        img = torch.nn.functional.interpolate(torch.rand(1, 3, 10, 12, generator=g), size=(80, 96), mode="bilinear")
        name = f"clip_vision_photo_{i}.png"
        save_png(img[0].permute(1, 2, 0), host.input_dir / name)
        names.append(name)
    return names


class _Probe:
    """A test-only output node that keeps what CLIP Vision Encode gave it (and the images it encoded)."""
    seen: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_vision_output": ("CLIP_VISION_OUTPUT",), "image": ("IMAGE",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, clip_vision_output, image):
        _Probe.seen = {"output": clip_vision_output, "image": image}
        return {"ui": {"shapes": [list(clip_vision_output[k].shape) for k in
                                  ("image_embeds", "last_hidden_state", "penultimate_hidden_states")]}}


def _encode_prompt(host, clip_name: str, photos: list[str]) -> dict:
    """Load Mini CLIP Vision → CLIP Vision Encode (crop: centre, where the host's node has the input) of two photos
    batched by the stock ImageBatch → the probe."""
    encode = {"clip_vision": ["1", 0], "image": ["4", 0]}
    if "crop" in host.node_class("CLIPVisionEncode").INPUT_TYPES()["required"]:
        encode["crop"] = "center"
    return {
        "1": {"class_type": LOAD, "inputs": {"clip_name": clip_name}},
        "2": {"class_type": "LoadImage", "inputs": {"image": photos[0]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": photos[1]}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
        "5": {"class_type": "CLIPVisionEncode", "inputs": encode},
        "6": {"class_type": "MiniCLIPVisionTestProbe", "inputs": {"clip_vision_output": ["5", 0], "image": ["4", 0]}},
    }


@pytest.fixture
def probe(host, monkeypatch):
    monkeypatch.setitem(host.nodes.NODE_CLASS_MAPPINGS, "MiniCLIPVisionTestProbe", _Probe)
    _Probe.seen = {}
    return _Probe


@pytest.fixture(scope="module")
def encoded(host, vision_file, photos):
    """The workflow run once through ComfyUI's executor: (run result, CLIP_VISION_OUTPUT, encoded images)."""
    from harness.executor import run_api_prompt
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(host.nodes.NODE_CLASS_MAPPINGS, "MiniCLIPVisionTestProbe", _Probe)
        _Probe.seen = {}
        result = run_api_prompt(_encode_prompt(host, vision_file.name, photos))
    assert result.success, result.error_message()
    return result, _Probe.seen["output"], _Probe.seen["image"]


# ---------------------------------------------------------------------------------------------------------
# The stock CLIP Vision Encode takes it


def test_stock_clip_vision_encode_takes_it_through_the_executor(host, encoded):
    """The executor validated CLIP_VISION → CLIP Vision Encode and ran it: the output has the fields a real CLIP
    vision model gives, with the shapes of a 64×64, patch-8, width-128, 4-layer ViT with a 128-d projection."""
    result, out, images = encoded
    assert images.shape == (B, 80, 96, 3)
    assert result.outputs["6"]["shapes"] == [[B, EMBED], [B, TOKENS, WIDTH], [B, TOKENS, WIDTH]]
    for key in ("image_embeds", "last_hidden_state", "penultimate_hidden_states"):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all(), key
    # two different photos, two different embeddings; the last layer is not the penultimate one
    assert not torch.allclose(out["image_embeds"][0], out["image_embeds"][1], atol=1e-3)
    assert not torch.allclose(out["last_hidden_state"], out["penultimate_hidden_states"], atol=1e-3)


def test_loader_output_is_comfyuis_clip_vision_model(host, loader, vision_file):
    import comfy.clip_vision
    assert [str(t) for t in loader.RETURN_TYPES] == ["CLIP_VISION"]
    assert loader.CATEGORY == "personalize/mini_world"
    clip_vision = loader.execute(clip_name=vision_file.name).result[0]
    assert isinstance(clip_vision, comfy.clip_vision.ClipVisionModel)
    assert clip_vision.image_size == 64 and clip_vision.path == vision_file


def _reference_config(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["personalize.widths"])


def _written_out_vit(sd: dict, pixels: torch.Tensor, cfg: dict) -> tuple:
    """CLIP's ViT written out in plain torch (Radford et al. 2021; HF CLIPVisionModel's layout): patch embedding,
    class token, position embedding, pre-LayerNorm, pre-norm blocks of multi-head attention and a quick-GELU MLP,
    post-LayerNorm of the class token, linear projection. Returns (last, penultimate, embeds)."""
    f = torch.nn.functional
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    p = "vision_model."
    ln = lambda x, name: f.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)  # noqa: E731
    lin = lambda x, name: x @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    x = f.conv2d(pixels, sd[p + "embeddings.patch_embedding.weight"], stride=cfg["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    cls = sd[p + "embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd[p + "embeddings.position_embedding.weight"]
    x = ln(x, p + "pre_layrnorm")
    states = []
    for i in range(cfg["num_hidden_layers"]):
        q = p + f"encoder.layers.{i}."
        h = ln(x, q + "layer_norm1")
        n, t, d = h.shape
        split = lambda y: y.view(n, t, heads, d // heads).transpose(1, 2)  # noqa: E731
        qh, kh, vh = (split(lin(h, q + f"self_attn.{w}_proj")) for w in "qkv")
        a = torch.softmax(qh @ kh.transpose(-1, -2) / (d // heads) ** 0.5, -1) @ vh
        x = x + lin(a.transpose(1, 2).reshape(n, t, d), q + "self_attn.out_proj")
        h = lin(ln(x, q + "layer_norm2"), q + "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), q + "mlp.fc2")
        states.append(x)
    embeds = ln(x[:, 0], p + "post_layernorm") @ sd["visual_projection.weight"].T
    return states[-1], states[-2], embeds


def test_encode_equals_an_independent_forward_of_the_file(host, encoded, vision_file):
    """The encode equals the file's fp16 weights (as fp32) run (a) through ``comfy.clip_model``'s
    CLIPVisionModelProjection built here from the file's own widths and (b) through a ViT written out in plain
    torch, on the host's ``clip_preprocess`` of the same images (resize + centre crop to 64, CLIP's mean/std)."""
    import comfy.clip_model
    import comfy.clip_vision
    import comfy.ops
    _, out, images = encoded
    cfg = _reference_config(vision_file)
    assert (cfg["image_size"], cfg["patch_size"], cfg["hidden_size"], cfg["num_hidden_layers"],
            cfg["projection_dim"]) == (64, 8, WIDTH, 4, EMBED)
    sd = {k: v.float() for k, v in load_file(str(vision_file)).items()}
    assert all(v.dtype == torch.float16 for v in load_file(str(vision_file)).values())
    pixels = comfy.clip_vision.clip_preprocess(images.float(), size=cfg["image_size"], crop=True).float()
    assert pixels.shape == (B, 3, 64, 64)
    with torch.inference_mode():
        tower = comfy.clip_model.CLIPVisionModelProjection(cfg, torch.float32, "cpu", comfy.ops.disable_weight_init)
        missing, unexpected = tower.load_state_dict(sd, strict=True)
        assert not missing and not unexpected
        last, penultimate, embeds, _ = tower(pixel_values=pixels, intermediate_output=-2)
        w_last, w_penultimate, w_embeds = _written_out_vit(sd, pixels, cfg)
    tol = dict(rtol=1e-4, atol=1e-4)
    for got, ref, ref2 in ((out["image_embeds"], embeds, w_embeds), (out["last_hidden_state"], last, w_last),
                           (out["penultimate_hidden_states"], penultimate, w_penultimate)):
        torch.testing.assert_close(got.cpu().float(), ref, **tol)
        torch.testing.assert_close(got.cpu().float(), ref2, **tol)


# ---------------------------------------------------------------------------------------------------------
# Bad input


def _flip_a_tensor_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # the end of the file is tensor data (the header comes first)
    path.write_bytes(bytes(data))


def test_a_damaged_file_is_refused_with_the_fix(host, loader, vision_file, photos, err, probe):
    folder = vision_file.parent
    damaged = folder / f"damaged_{uuid.uuid4().hex[:6]}.safetensors"
    shutil.copy(vision_file, damaged)
    # the sha256 sidecar of the original bytes beside it, then one tensor byte flipped
    damaged.with_name(damaged.name + ".sha256").write_text(
        vision_file.with_name(vision_file.name + ".sha256").read_text().replace(vision_file.name, damaged.name))
    _flip_a_tensor_byte(damaged)
    host.refresh_model_lists()
    with pytest.raises(err, match="does not match its checksum.*make mini-world"):
        loader.execute(clip_name=damaged.name)
    # without a sidecar, the checksum of the tensors in the file's metadata catches it
    damaged.with_name(damaged.name + ".sha256").unlink()
    with pytest.raises(err, match="is damaged.*pretrain_clip_vision.py"):
        loader.execute(clip_name=damaged.name)
    # and through the executor, the user sees the same message on the loader node
    from harness.executor import run_api_prompt
    result = run_api_prompt(_encode_prompt(host, damaged.name, photos))
    assert not result.success and result.error["node_id"] == "1"
    assert "PersonalizeError" in result.error["exception_type"] and "is damaged" in result.error_message()


def test_a_file_of_another_kind_is_refused_with_the_fix(host, loader, err):
    folder = host.model_folder(FOLDER)
    hifi = pack_module(host, "methods.hifi_tuner")
    subject = folder / f"a_subject_{uuid.uuid4().hex[:6]}.safetensors"
    hifi.SUBJECT_FILE.save({"rows": torch.zeros(1, 5, 8)}, subject, family="sd1")
    plain = folder / f"plain_{uuid.uuid4().hex[:6]}.safetensors"
    save_file({"vision_model.post_layernorm.weight": torch.ones(128)}, str(plain))
    host.refresh_model_lists()
    try:
        with pytest.raises(err, match="not a mini CLIP vision file: it is a HiFi.*Load a file written by "
                                      "scripts/pretrain_clip_vision.py"):
            loader.execute(clip_name=subject.name)
        with pytest.raises(err, match="not a mini CLIP vision file: it is a file without Personalize metadata"):
            loader.execute(clip_name=plain.name)
        with pytest.raises(err, match="File not found"):
            loader.execute(clip_name="no_such_tower.safetensors")
        assert loader.validate_inputs(clip_name="../escape.safetensors") is not True
    finally:  # the host outlives this test: leave no foreign file in the list other tests read
        subject.unlink(missing_ok=True)
        plain.unlink(missing_ok=True)
        host.refresh_model_lists()


def test_a_tower_file_with_wrong_widths_is_refused(host, loader, mc, vision_file, err):
    folder = vision_file.parent
    tensors = load_file(str(vision_file))
    not_vision = folder / f"not_vision_{uuid.uuid4().hex[:6]}.safetensors"
    mc.CLIP_VISION_FILE.save(tensors, not_vision, family=None, widths={"width": 128})
    other = folder / f"other_widths_{uuid.uuid4().hex[:6]}.safetensors"
    mc.CLIP_VISION_FILE.save(tensors, other, family=None, widths={**mc.VISION_CONFIG, "num_hidden_layers": 5})
    host.refresh_model_lists()
    with pytest.raises(err, match="does not describe a CLIP vision tower.*pretrain_clip_vision.py"):
        loader.execute(clip_name=not_vision.name)
    with pytest.raises(err, match="does not fit the CLIP vision tower its widths describe"):
        loader.execute(clip_name=other.name)


# ---------------------------------------------------------------------------------------------------------
# The lists


@pytest.fixture
def fresh_filename_lists(host):
    host.refresh_model_lists()
    yield
    host.refresh_model_lists()


def _options(node_class, name: str) -> list:
    spec = node_class.INPUT_TYPES()["required"][name]
    return list(spec[0] if isinstance(spec[0], (list, tuple)) else spec[1]["options"])


def test_the_loader_lists_the_folder_and_load_mini_model_does_not(host, loader, vision_file, fresh_filename_lists):
    assert host.folder_paths.get_folder_paths(FOLDER)[-2:] == [
        str(pack_module(host, "networks.mini_clip").PACK_MODELS / "clip_vision"),
        os.path.join(host.folder_paths.models_dir, "personalize", "clip_vision")]
    options = _options(loader, "clip_name")
    assert vision_file.name in options
    assert not any(o.endswith(".sha256") for o in options)
    assert vision_file.name not in _options(host.node_class("PersonalizeLoadMiniModel"), "ckpt_name")


def test_load_mini_model_leaves_out_other_kinds_shipped_files(host, tmp_path, monkeypatch, fresh_filename_lists):
    """The mini folder lists subfolders; a file in another kind's shipped folder below one of its roots is not a
    checkpoint and is left out (any kind: here a test kind shipped in <root>/test_kind/), the rest is kept."""
    import folder_paths
    art = pack_module(host, "core.artifacts")
    mini = pack_module(host, "nodes.mini")
    root, user = tmp_path / "pack_models", tmp_path / "user_models"
    for folder in (root / "test_kind", root / "sub", user / "test_kind"):
        folder.mkdir(parents=True)
    for f in (root / "mini_a.safetensors", root / "sub" / "mini_b.safetensors", root / "test_kind" / "net.safetensors",
              user / "test_kind" / "mine.safetensors"):
        f.write_bytes(b"")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, mini.FOLDER, ([str(root), str(user)], {".safetensors"}))
    mini.register_folder()  # as the node does: the pack's own models/ is appended
    host.refresh_model_lists()
    ours = ["mini_a.safetensors", "sub/mini_b.safetensors", "test_kind/mine.safetensors", "test_kind/net.safetensors"]
    all_files = sorted(folder_paths.get_filename_list(mini.FOLDER))
    assert set(ours) <= set(all_files) and "mini_world.safetensors" in all_files
    # the real kinds' shipped files in the pack's models/ (the CLIP vision tower, the mini PromptNet)
    pack_others = [n for n in all_files if n.replace("\\", "/").startswith(("clip_vision/", "promptnet/"))]
    name = f"test_shipped_{uuid.uuid4().hex[:6]}"
    monkeypatch.setitem(art.KINDS, name, art.ArtifactKind(kind=name, title="test", folder=name, made_by="test",
                                                          shipped=root / "test_kind"))
    listed = sorted(_options(host.node_class("PersonalizeLoadMiniModel"), "ckpt_name"))
    # the user's own test_kind/ folder is not the shipped one: kept
    assert listed == [n for n in all_files if n != "test_kind/net.safetensors" and n not in pack_others]
    # a kind shipped in a root itself hides nothing
    monkeypatch.setitem(art.KINDS, name, art.ArtifactKind(kind=name, title="test", folder=name, made_by="test",
                                                          shipped=root))
    listed = sorted(_options(host.node_class("PersonalizeLoadMiniModel"), "ckpt_name"))
    assert listed == [n for n in all_files if n not in pack_others]


def test_the_real_layout_is_covered(host, mc, fresh_filename_lists):
    """The CLIP vision kind ships under the pack's models/, the mini folder's first root, so the rule above applies
    to it; its shipped file, when present, is listed by its loader and not by Load Mini Model."""
    mini = pack_module(host, "nodes.mini")
    assert mc.CLIP_VISION_FILE.shipped.parent.resolve() == mc.PACK_MODELS.resolve()
    assert mini.PACK_MODELS in host.folder_paths.get_folder_paths(mini.FOLDER)
    mini_list = _options(host.node_class("PersonalizeLoadMiniModel"), "ckpt_name")
    assert not any(n.replace("\\", "/").startswith("clip_vision/") for n in mini_list)
    if (mc.CLIP_VISION_FILE.shipped / mc.SHIPPED_NAME).is_file():
        assert mc.SHIPPED_NAME in _options(host.node_class(LOAD), "clip_name")
        assert "clip_vision/" + mc.SHIPPED_NAME in host.folder_paths.get_filename_list(mini.FOLDER)


@pytest.mark.skipif(not os.path.isfile(os.path.join(os.path.dirname(__file__), "..", "models", "clip_vision",
                                                    "mini_world_clip_vision.safetensors")),
                    reason="the trained tower is not committed yet (make mini-world writes it)")
def test_the_shipped_tower_encodes(host, photos, probe):
    from harness.executor import run_api_prompt
    result = run_api_prompt(_encode_prompt(host, "mini_world_clip_vision.safetensors", photos))
    assert result.success, result.error_message()
    assert result.outputs["6"]["shapes"] == [[B, EMBED], [B, TOKENS, WIDTH], [B, TOKENS, WIDTH]]

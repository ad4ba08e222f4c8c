"""SD2 (v-prediction, CLIP-H) and SDXL (CLIP-L + CLIP-G, ADM) fixtures through both training nodes."""
import pytest
import torch
from safetensors.torch import load_file

from helpers import call_node, encode, train_embedding, train_lora

pytestmark = pytest.mark.slow


def _ti(models, images, name):
    return train_embedding(models, images, name, learning_rate=5e-2)


def _lora(models, images, name):
    return train_lora(models, images, name, rank=2, train_text_encoder=True)


def _check(host, models, images, name, widths):
    model, clip, vae = models
    out_clip, ref, loss, _ = _ti(models, images, name)
    assert all(torch.isfinite(torch.tensor(loss["loss"])))
    emb = load_file(host.folder_paths.get_full_path("embeddings", name + ".safetensors"))
    assert {k: tuple(v.shape) for k, v in emb.items()} == widths
    torch.testing.assert_close(encode(out_clip, "a photo of sks"), encode(clip, f"a photo of {ref}"),
                               rtol=1e-5, atol=1e-5)
    out_model, out_clip2, lora_file, loss2, _ = _lora(models, images, name + "_lora")
    assert all(torch.isfinite(torch.tensor(loss2["loss"])))
    stock_model, stock_clip = call_node("LoraLoader", model=model, clip=clip, lora_name=lora_file,
                                        strength_model=1.0, strength_clip=1.0)
    sd = load_file(host.folder_paths.get_full_path("loras", lora_file))
    n_unet = len({k.rsplit(".", 2)[0] for k in sd if k.startswith("lora_unet_") and k.endswith("down.weight")})
    assert len(stock_model.patches) == n_unet > 0
    n_te = len({k.rsplit(".", 2)[0] for k in sd if k.startswith("lora_te") and k.endswith("down.weight")})
    assert len(stock_clip.patcher.patches) == n_te > 0
    return sd


def test_sd2_v_prediction(host, sd2, subject, unique_name):
    assert type(sd2[0].model.model_sampling).__name__ != "" and sd2[0].model.model_type.name == "V_PREDICTION"
    sd = _check(host, sd2, subject[0], unique_name("sd2"), {"emb_params": (1, 1024)})
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in sd)


def test_sdxl(host, sdxl, subject, unique_name):
    sd = _check(host, sdxl, subject[0], unique_name("sdxl"), {"clip_l": (1, 768), "clip_g": (1, 1280)})
    assert any(k.startswith("lora_te1_") for k in sd) and any(k.startswith("lora_te2_") for k in sd)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_special_tokens_from_the_empty_prompt_match_the_tokenizers(host, request, family):
    # core.textual reads start/end/padding from clip.tokenize(""); the tokenizer attributes are the reference here
    from helpers import pack_module
    textual = pack_module(host, "core.textual")
    clip = request.getfixturevalue(family)[1]
    specials = textual.special_tokens(clip)
    assert set(specials) == set(textual.encoder_keys(clip)) and specials
    for key, (start, end, pad) in specials.items():
        sub = getattr(clip.tokenizer, f"clip_{key}")
        assert (start, end) == (sub.start_token, sub.end_token)
        assert pad == (sub.end_token if getattr(sub, "pad_with_end", True) else 0)

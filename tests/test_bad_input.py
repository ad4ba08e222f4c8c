"""Bad input gets a clear error before work starts; faults leave nothing on disk and no patch behind."""
import types

import pytest
import torch

from helpers import call_node, encode, module_forward_is_clean, pack_module, train_embedding, train_lora, unet_output

TI = "PersonalizeTrainSubjectEmbedding"


def _ti(model, clip, vae, images, name, **kw):
    return train_embedding((model, clip, vae), images, name, **kw)


def _lora(model, clip, vae, images, name, **kw):
    return train_lora((model, clip, vae), images, name, **{"rank": 2, "learning_rate": 1e-3, **kw})


@pytest.fixture
def err(host):
    return pack_module(host, "core.host").PersonalizeError


def _no_file(host, folder, name):
    return host.folder_paths.get_full_path(folder, name + ".safetensors") is None


def test_unsupported_family(host, sd15, subject, err, unique_name):
    model, clip, vae = sd15
    flux = types.SimpleNamespace(model=types.SimpleNamespace(model_config=type("Flux", (), {})()))
    with pytest.raises(err, match="does not support.*Load an SD1.x, SD2.x or SDXL checkpoint"):
        _ti(flux, clip, vae, subject[0], unique_name())
    sd2_clip = types.SimpleNamespace(cond_stage_model=types.SimpleNamespace(clip_h=object()))
    with pytest.raises(err, match="MODEL is SD1.x but the CLIP is SD2.x"):
        _lora(model, sd2_clip, vae, subject[0], unique_name())


@pytest.mark.parametrize("case", ["count", "aspect", "empty"])
def test_mask_errors(host, sd15, subject, err, unique_name, case):
    model, clip, vae = sd15
    images, masks = subject
    if case == "count":
        bad, match = masks[:2], "2 masks for 3 images"
    elif case == "aspect":
        bad, match = torch.ones(3, 64, 32), "another aspect ratio"
    else:
        bad = masks.clone()
        bad[1] = 0
        match = "mask of image 2 is empty"
    name = unique_name()
    with pytest.raises(err, match=match):
        _ti(model, clip, vae, images, name, mask=bad)
    assert _no_file(host, "embeddings", name)


def test_mask_resized_when_same_aspect(host, sd15, subject, unique_name):
    model, clip, vae = sd15
    images, masks = subject
    big = torch.nn.functional.interpolate(masks[:, None], size=(128, 128), mode="nearest")[:, 0]
    _ti(model, clip, vae, images, unique_name(), mask=big, steps=1)


def test_placeholder_errors(host, sd15, subject, err, unique_name):
    model, clip, vae = sd15
    with pytest.raises(err, match="one word without spaces"):
        _ti(model, clip, vae, subject[0], unique_name(), placeholder="my dog")
    with pytest.raises(err, match="must be exactly one"):
        _ti(model, clip, vae, subject[0], unique_name(), placeholder="qwzxplorkzzvb")


def test_zero_steps(host, err):
    tuning = pack_module(host, "core.tuning")
    with pytest.raises(err, match="steps must be at least 1"):
        tuning.TuningConfig(steps=0, learning_rate=1e-3).validate("X")


def test_zero_steps_rejected_by_host_validation(host, run_workflow, ckpt_sd15, subject_files):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_sd15}},
        "2": {"class_type": "LoadImage", "inputs": {"image": subject_files[0]}},
        "3": {"class_type": TI, "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
                                           "placeholder": "sks", "init_word": "dog", "steps": 0,
                                           "learning_rate": 5e-3, "batch_size": 1, "seed": 0,
                                           "embedding_name": "never", "overwrite": False}},
        "4": {"class_type": "PersonalizeLossGraph", "inputs": {"loss": ["3", 2], "width": 256, "height": 128}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    with pytest.raises(Exception, match="steps"):
        run_workflow(prompt)


def test_existing_file_is_not_overwritten(host, sd15, subject, err, unique_name):
    model, clip, vae = sd15
    name = unique_name()
    path = host.model_folder("embeddings") / f"{name}.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(err, match="already exists.*enable 'overwrite'"):
        _ti(model, clip, vae, subject[0], name)
    assert path.read_bytes() == b"precious"
    _ti(model, clip, vae, subject[0], name, overwrite=True, steps=1)
    assert path.read_bytes() != b"precious"


def test_nan_loss_stops_training_and_writes_nothing(host, sd15, subject, err, unique_name):
    """A diverging run (absurd learning rate: the LoRA deltas blow the UNet output up to inf/NaN) stops with a
    clear message and saves nothing."""
    model, clip, vae = sd15
    lora = pack_module(host, "methods.dreambooth_lora")
    tuning = pack_module(host, "core.tuning")
    name = unique_name()
    config = tuning.TuningConfig(steps=8, learning_rate=1e30)
    with torch.inference_mode(), pytest.raises(err, match=r"loss became (nan|inf).*Lower the learning rate"):
        lora.train_lora(model, clip, vae, subject[0], instance_prompt="a photo of sks dog", rank=2,
                        layers="attention", train_text_encoder=False, config=config, lora_name=name)
    assert _no_file(host, "loras", name)


def test_interrupt_leaves_no_file_and_no_patch(host, sd15, subject, unique_name):
    import comfy.model_management as mm
    import comfy.utils
    model, clip, vae = sd15
    images, _ = subject
    latents = call_node("VAEEncode", pixels=images, vae=vae)[0]["samples"]
    cond = encode(clip, "a photo of sks dog")
    clean_before = unet_output(model, latents, cond)
    calls = []

    def hook(value, total, preview, *args, **kwargs):
        calls.append(value)
        if value == 1:
            mm.interrupt_current_processing(True)

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    name = unique_name()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _lora(model, clip, vae, images, name, steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert calls == [1]
    assert _no_file(host, "loras", name)
    # the next workflow runs on an unpatched model
    assert module_forward_is_clean(model.model)
    torch.testing.assert_close(unet_output(model, latents, cond), clean_before, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Names and placeholders (issue #25 section 7)


@pytest.mark.parametrize("bad", ["my subject", ".", "..", "a.b", "sub/name", "..\\up", "", "emb(1)", "name:1.2"])
def test_embedding_name_that_embedding_syntax_cannot_load(host, sd15, subject, err, bad):
    """ComfyUI's ``embedding:<name>`` stops at a space and cannot name '.', '..' or a path: refused before work,
    naming the allowed characters."""
    model, clip, vae = sd15
    with pytest.raises(err, match=r"cannot be loaded with 'embedding:.*letters A-Z a-z, digits 0-9, '_' and '-'"):
        _ti(model, clip, vae, subject[0], bad)
    assert not list(host.model_folder("embeddings").glob("*subject*"))


def test_embedding_name_allowed_characters_load_in_clip_text_encode(host, sd15, subject, unique_name):
    """A name of the allowed set (with '-' and '_') is what ``embedding:`` loads in a stock CLIPTextEncode: the
    prompt with the node's own ``embedding`` output differs from the same prompt without it."""
    model, clip, vae = sd15
    name = unique_name("ok-name_1")
    out = _ti(model, clip, vae, subject[0], name, steps=1)
    assert out[1] == f"embedding:{name}"
    assert not torch.equal(encode(clip, f"a photo of {out[1]}"), encode(clip, "a photo of"))


@pytest.mark.parametrize("node,field", [(TI, "embedding_name"), ("PersonalizeTrainSubjectLoRA", "lora_name"),
                                        ("PersonalizeHiFiSubjectTune", "subject_name")])
def test_name_longer_than_file_system_limit(host, sd15, subject, err, node, field):
    model, clip, vae = sd15
    long = "x" * 300
    if node == TI:
        call = lambda: _ti(model, clip, vae, subject[0], long)  # noqa: E731
    elif field == "lora_name":
        call = lambda: _lora(model, clip, vae, subject[0], long)  # noqa: E731
    else:
        call = lambda: call_node(node, model=model, clip=clip, vae=vae, images=subject[0], caption="a photo of a dog",  # noqa: E731
                                 n_tokens=2, global_steps=1, steps_per_step=1, sampling_steps=2, learning_rate=1e-3,
                                 reg_weight=0.0, use_mask=False, use_regularisation=False, use_stepwise=False, seed=0,
                                 subject_name=long, overwrite=False)
    with pytest.raises(err, match=rf"{field} 'x+\.\.\.' is 312 bytes long; file names may be at most 255 bytes"):
        call()


def test_common_word_placeholder_is_refused(host, sd15, subject, err, unique_name):
    """'dog' is a word prompts use (token 1929 of CLIP's 49408, numbered by frequency): refused, naming 'sks'."""
    model, clip, vae = sd15
    name = unique_name()
    with pytest.raises(err, match=r"'dog' is a common word.*change every prompt that says 'dog'.*'sks'"):
        _ti(model, clip, vae, subject[0], name, placeholder="dog", init_word="animal")
    with pytest.raises(err, match=r"'dog' is the init word itself.*'sks'"):
        _ti(model, clip, vae, subject[0], name, placeholder="dog", init_word="dog")
    assert _no_file(host, "embeddings", name)


def test_placeholder_check_lives_in_core(host, sd15, err):
    """The rule is core's (the node only calls it): rare single tokens pass on every encoder, common words and
    multi-token words do not."""
    _model, clip, _vae = sd15
    textual = pack_module(host, "core.textual")
    for ok in ("sks", "ohwx"):
        ids = textual.check_placeholder("X", clip, ok, "dog")
        assert all(i >= 0.8 * 49408 for i in ids.values()), (ok, ids)
    for common in ("cat", "object", "person"):
        with pytest.raises(err, match="common word"):
            textual.check_placeholder("X", clip, common, "dog")
    with pytest.raises(err, match="must be exactly one"):
        textual.check_placeholder("X", clip, "qwzxplorkzzvb", "dog")


def test_corrupt_image_in_subject_folder(host, err):
    folder = host.input_dir / "personalize_corrupt_subject"
    folder.mkdir(exist_ok=True)
    from harness.subjects import save_png
    save_png(torch.rand(32, 32, 3), folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(err, match=r"Load Subject Images: b\.png in 'personalize_corrupt_subject' is not a readable "
                                  r"image.*Replace or remove that file"):
        call_node("PersonalizeLoadSubjectImages", folder=folder.name, size=32)
    # a truncated file (valid header, cut data) is named too
    data = (folder / "a.png").read_bytes()
    (folder / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(err, match=r"b\.png .* is not a readable image"):
        call_node("PersonalizeLoadSubjectImages", folder=folder.name, size=32)


def test_subject_folder_name_too_long(host, err):
    with pytest.raises(err, match=r"folder 'y+\.\.\.' is 300 bytes long; file names may be at most 255 bytes"):
        call_node("PersonalizeLoadSubjectImages", folder="y" * 300, size=32)


def test_error_dialog_shows_short_exception_type(host, run_workflow, ckpt_sd15, subject_files):
    """ComfyUI's error payload (what the UI dialog shows) names the pack's error 'personalize.PersonalizeError', not
    the loader's '/…/custom_nodes/<dir>.core.host.PersonalizeError', and carries the message that names the fix."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_sd15}},
        "2": {"class_type": "LoadImage", "inputs": {"image": subject_files[0]}},
        "3": {"class_type": TI, "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
                                           "placeholder": "sks", "init_word": "dog", "steps": 1,
                                           "learning_rate": 5e-3, "batch_size": 1, "seed": 0,
                                           "embedding_name": "my subject", "overwrite": False}},
        "4": {"class_type": "PersonalizeLossGraph", "inputs": {"loss": ["3", 2], "width": 256, "height": 128}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    result = run_workflow(prompt, expect_error=True)
    assert result.error["exception_type"] == "personalize.PersonalizeError", result.error["exception_type"]
    assert "cannot be loaded with 'embedding:my" in result.error["exception_message"]

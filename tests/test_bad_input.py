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

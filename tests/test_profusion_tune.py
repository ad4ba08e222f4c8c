"""ProFusion Tune (methods/profusion_tune.py, nodes/profusion_tune.py; methods.md §5.6) and the full-rank weight
deltas it returns (core/deltas.py: FullRankDeltas) on the shipped mini model: the node runs in ComfyUI's executor
and leaves its inputs unchanged; the output MODEL differs from the input exactly by weight patches on to_q/to_k/to_v
(checked against a UNet edited by hand); the loss on a fixed batch goes down; same seed, same result; refusals."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import call_node, pack_module

NODE = "PersonalizeProFusionTune"
QKV = (".to_q.weight", ".to_k.weight", ".to_v.weight")


@pytest.fixture(scope="module")
def pt(host):
    return pack_module(host, "methods.profusion_tune")


@pytest.fixture(scope="module")
def err(host):
    return pack_module(host, "core.host").PersonalizeError


@pytest.fixture(scope="module")
def mini(host):
    mf = pack_module(host, "core.mini_family")
    return mf.load_checkpoint(mf.shipped_checkpoint())


@pytest.fixture(scope="module")
def tower(host):
    mc = pack_module(host, "networks.mini_clip")
    return mc.load_clip_vision(mc.PACK_MODELS / "clip_vision" / mc.SHIPPED_NAME)


@pytest.fixture(scope="module")
def net(host, mini):
    pn = pack_module(host, "networks.promptnet")
    with torch.inference_mode():  # as a loader node makes it: inference tensors
        return pn.PromptNet.from_model(mini[0], family="sd1", vision_width=128, seed=1).requires_grad_(False)


@pytest.fixture(scope="module")
def image(subject):
    return subject[0][:1].clone()


def _config(pt, **kw):
    args = dict(steps=2, batch_size=2, augmented_copies=3, learning_rate=1e-4, seed=0)
    args.update(kw)
    return pt.ProFusionTuneConfig(**args)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _raw_unet(patcher, unet=None, seed=3):
    """The UNet's raw output on a fixed input, with the patcher loaded (its weight patches applied), or of
    ``unet`` (a module) if given."""
    import comfy.model_management as mm
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 128, generator=g)
    t = torch.tensor([250.0, 700.0])
    with torch.inference_mode():
        if unet is None:
            mm.load_models_gpu([patcher])
            unet = patcher.model.diffusion_model
        dev = next(unet.parameters()).device
        return unet(x.to(dev), t.to(dev), context=ctx.to(dev)).float().cpu()


def _loaded_weights(patcher) -> dict:
    import comfy.model_management as mm
    with torch.inference_mode():
        mm.load_models_gpu([patcher])
        return {k: v.detach().cpu().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Full-rank deltas (core/deltas.py)


def test_full_rank_patches_equal_a_hand_edited_unet_and_the_training_bypass(host, mini):
    """``FullRankDeltas.patched`` is a clone with ("diff", ΔW) weight patches on to_q/to_k/to_v only: loaded, its UNet
    computes what a copy of the UNet whose weights were edited by hand (W + ΔW) computes; the training path
    (bypass ``W x + ΔW x`` on a TrainingSession clone) computes the same; the input MODEL is untouched."""
    deltas_mod = pack_module(host, "core.deltas")
    tuning = pack_module(host, "core.tuning")
    model = mini[0]
    before_patches = {k: list(v) for k, v in model.patches.items()}
    base_out = _raw_unet(model)
    specs = deltas_mod.find_unet_targets(model, "qkv")
    n_attn = sum(1 for m in model.model.diffusion_model.modules() if type(m).__name__ == "CrossAttention")
    assert len(specs) == 3 * n_attn and n_attn > 0  # q, k, v of every self- and cross-attention
    deltas = deltas_mod.FullRankDeltas(specs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in deltas.delta.values():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    patched = deltas.patched(model)
    new_keys = set(patched.patches) - set(before_patches)
    assert new_keys == {s.weight_key for s in specs} and all(k.endswith(QKV) for k in new_keys)

    with torch.inference_mode():
        import comfy.model_management as mm
        mm.load_models_gpu([model])
        hand = copy.deepcopy(model.model.diffusion_model)
        sd = hand.state_dict()
        for name, spec in deltas.specs.items():
            w = sd[spec.weight_key.removeprefix("diffusion_model.")]
            w.copy_((w.float() + deltas.delta[name].detach().to(w.device)).to(w.dtype))
    expected = _raw_unet(None, hand)
    got = _raw_unet(patched)
    assert (expected - base_out).abs().max() > 1e-3, "the deltas change nothing; the comparison would be vacuous"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    with tuning.TrainingSession(model) as s:
        deltas.attach(s.model)
        s.load()
        with torch.no_grad():
            bypass = s.model.model.diffusion_model
            bypass_out = _raw_unet(None, bypass)
    # float32 (CPU): 1e-4; a half-precision UNet rounds W x + ΔW x and (W + ΔW) x differently (cf. test_lora)
    dtype = model.model.get_dtype()
    effect = float((expected - base_out).abs().max())
    tol = 1e-4 if dtype == torch.float32 else 16 * torch.finfo(dtype).eps * max(1.0, effect)
    torch.testing.assert_close(bypass_out, expected, rtol=tol, atol=tol)
    # the input MODEL: same patches, same output (its weights were restored when the clones unloaded)
    assert {k: list(v) for k, v in model.patches.items()} == before_patches
    torch.testing.assert_close(_raw_unet(model), base_out, rtol=0, atol=0)


def test_full_rank_deltas_refuse_another_model(host, mini, sd15):
    deltas_mod = pack_module(host, "core.deltas")
    err = pack_module(host, "core.host").PersonalizeError
    deltas = deltas_mod.FullRankDeltas(deltas_mod.find_unet_targets(mini[0], "qkv"))
    with pytest.raises(err, match="not in this MODEL"):
        deltas.patched(sd15[0])


# ---------------------------------------------------------------------------------------------------------
# The method


def test_augmented_copies_are_seeded_and_leave_the_global_rng_alone(pt, image):
    px = image[:, :64, :64]
    torch.manual_seed(123)
    a = pt.augment(px, 4, seed=5)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = pt.augment(px, 4, seed=5)
    assert torch.equal(a, b) and torch.equal(torch.rand(1), after)
    assert a.shape == (4, 64, 64, 3) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.equal(pt.augment(px, 4, seed=6), a)
    assert all((a[i] - px[0]).abs().mean() > 1e-3 for i in range(4))  # every copy is moved
    assert pt.augment(px, 0, seed=5).shape[0] == 0


def test_node_in_the_executor_leaves_its_inputs_unchanged(host, run_workflow, subject_files, monkeypatch):
    """Through ComfyUI's executor (Load Mini Model, Load Mini CLIP Vision, LoadImage → ProFusion Tune): the input
    PromptNet and MODEL are unchanged after; the tuned PromptNet differs; the output MODEL's weights differ from
    the input's only on to_q/to_k/to_v, by exactly its weight patches; one loss per step."""
    import nodes
    pn = pack_module(host, "networks.promptnet")
    seen: dict = {}

    class TestPromptNet:  # a PROMPTNET source for the test: a new PromptNet of the loaded MODEL
        CATEGORY, FUNCTION, RETURN_TYPES = "test", "make", ("PROMPTNET",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",)}}

        def make(self, model):
            return (pn.PromptNet.from_model(model, family="sd1", vision_width=128, seed=1),)

    class TestKeep:
        CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "test", "keep", (), True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"source": ("PROMPTNET",), "tuned": ("PROMPTNET",), "model_in": ("MODEL",),
                                 "model_out": ("MODEL",), "loss": ("LOSS_MAP",)}}

        def keep(self, **kw):
            seen.update(kw)
            return {}

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestPromptNet", TestPromptNet)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestKeep", TestKeep)
    clip_name = pack_module(host, "networks.mini_clip").SHIPPED_NAME  # the shipped tower, whatever else is listed
    prompt = {
        "1": {"class_type": "PersonalizeLoadMiniModel", "inputs": {"ckpt_name": "mini_world.safetensors"}},
        "2": {"class_type": "PersonalizeLoadMiniCLIPVision", "inputs": {"clip_name": clip_name}},
        "3": {"class_type": "LoadImage", "inputs": {"image": subject_files[0]}},
        "4": {"class_type": "TestPromptNet", "inputs": {"model": ["1", 0]}},
        "5": {"class_type": NODE, "inputs": {
            "promptnet": ["4", 0], "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "clip_vision": ["2", 0],
            "image": ["3", 0], "steps": 3, "learning_rate": 1e-3, "batch_size": 2, "augmented_copies": 3,
            "tune_unet_qkv": True, "seed": 0}},
        "6": {"class_type": "TestKeep", "inputs": {"source": ["4", 0], "tuned": ["5", 0], "model_in": ["1", 0],
                                                   "model_out": ["5", 1], "loss": ["5", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 3]}},
    }
    run_workflow(prompt)
    source, tuned, model_in, model_out = seen["source"], seen["tuned"], seen["model_in"], seen["model_out"]
    fresh = pn.PromptNet.from_model(model_in, family="sd1", vision_width=128, seed=1)  # the input as it was built
    assert _same_state(_state(source), _state(fresh)), "the input PromptNet changed"
    assert not _same_state(_state(tuned), _state(source)), "the PromptNet was not tuned"
    assert tuned is not source and not any(p.requires_grad for p in tuned.parameters())
    assert len(seen["loss"]["loss"]) == 3
    # MODEL: the input carries no patch; the output differs exactly by its q/k/v patches
    assert not model_in.patches
    assert set(model_out.patches) and all(k.endswith(QKV) for k in model_out.patches)
    w_in, w_out = _loaded_weights(model_in), _loaded_weights(model_out)
    w_in_again = _loaded_weights(model_in)
    assert _same_state(w_in, w_in_again), "loading the output MODEL changed the input MODEL"
    ckpt = host.folder_paths.get_full_path("personalize_mini", "mini_world.safetensors")
    from safetensors.torch import load_file
    stored = {k.removeprefix("model.diffusion_model."): v.float() for k, v in load_file(ckpt).items()
              if k.startswith("model.diffusion_model.")}
    for key, w in w_in.items():
        if key in stored:
            assert torch.equal(w, stored[key].to(w.dtype)), key  # the input UNet still holds the file's weights
    for key in w_in:
        patch = model_out.patches.get("diffusion_model." + key)
        if patch is None:
            assert torch.equal(w_out[key], w_in[key]), key
        else:
            delta = patch[0][1][1][0]
            assert delta.abs().max() > 0, key
            # the host adds ΔW to the weight in float32 and stores it in the weight's dtype
            assert torch.equal(w_out[key], (w_in[key].float() + delta.float()).to(w_in[key].dtype)), key
    assert len(model_out.patches) == sum(1 for k in w_in if k.endswith(QKV))


def test_loss_goes_down_on_a_fixed_batch(pt, mini, tower, net, image, host):
    """20 steps lower the objective (§5.5) on a fixed batch of the mini-dataset (fixed targets, references,
    timesteps and noise), evaluated with the tuned PromptNet and MODEL against the inputs."""
    import comfy.model_management as mm
    pf = pack_module(host, "methods.profusion")
    model, clip, vae = mini
    config = _config(pt, steps=20, batch_size=4, learning_rate=1e-3)
    data = pt.build_dataset(net, vae, tower, image, None, config)
    tuned, out_model, result = pt.tune(net, model, clip, vae, tower, image, None, config)
    assert len(result.losses) == 20
    prompt = pf.PlaceholderPrompt(clip, pt.PROMPT)
    g = torch.Generator().manual_seed(11)
    targets, refs = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 0, 1])
    ts = torch.tensor([150, 400, 650, 900])
    noise = torch.randn(4, 4, 8, 8, generator=g)

    def fixed_loss(promptnet, patcher) -> float:
        with torch.inference_mode():
            mm.load_models_gpu([patcher])
            base = patcher.model
            x0 = base.process_latent_in(data.latents)
            sigma = base.model_sampling.sigmas[ts].float()
            x = x0[targets] + sigma.view(-1, 1, 1, 1) * noise
            x_t = x / torch.sqrt(1 + sigma.view(-1, 1, 1, 1) ** 2)
            words = promptnet(x0[refs], ts.float(), data.tokens[refs], x_t)
            d = base.apply_model(x, sigma, c_crossattn=prompt.encode(words))
            return float(((x - d) / sigma.view(-1, 1, 1, 1) - noise).pow(2).mean())

    before, after = fixed_loss(net, model), fixed_loss(tuned, out_model)
    assert after < before * 0.95, (before, after)  # measured: 0.0866 -> 0.0739 (CPU)


def test_same_seed_same_result(pt, mini, tower, net, image):
    model, clip, vae = mini
    runs = [pt.tune(net, model, clip, vae, tower, image, None, _config(pt, seed=s)) for s in (7, 7, 8)]
    (n1, m1, r1), (n2, m2, r2), (n3, _, r3) = runs
    assert r1.losses == r2.losses and _same_state(_state(n1), _state(n2))
    assert set(m1.patches) == set(m2.patches)
    assert all(torch.equal(m1.patches[k][0][1][1][0], m2.patches[k][0][1][1][0]) for k in m1.patches)
    assert r3.losses != r1.losses and not _same_state(_state(n3), _state(n1))


def test_without_qkv_the_model_comes_back_unpatched(pt, mini, tower, net, image):
    model, clip, vae = mini
    before = _state(net)
    tuned, out_model, _ = pt.tune(net, model, clip, vae, tower, image, None, _config(pt, tune_unet_qkv=False))
    assert out_model is model and not model.patches
    assert not _same_state(_state(tuned), before) and _same_state(_state(net), before)


def test_gradient_checkpointing_same_result_and_restores_promptnet(pt, mini, tower, net, image):
    model, clip, vae = mini
    plain = pt.tune(net, model, clip, vae, tower, image, None, _config(pt))
    ckpt = pt.tune(net, model, clip, vae, tower, image, None, _config(pt, gradient_checkpointing=True))
    assert ckpt[2].losses == pytest.approx(plain[2].losses, rel=1e-5)
    assert not any("forward" in vars(m) for m in ckpt[0].modules())  # no checkpoint wrapper left on the output
    assert not any("forward" in vars(m) for m in net.modules())


def test_padding_fills_only_what_the_move_uncovers(pt, image):
    """The three paddings move the image alike (same seed, same flips and affine draws) and differ only where the
    move uncovers the frame: black for 'zeros', the image's own pixels otherwise."""
    px = image[:, :64, :64].clamp(0.1, 1.0)  # no black pixel of its own
    copies = {p: pt.augment(px, 4, seed=5, padding=p) for p in pt.PADDING}
    uncovered = (copies["zeros"] < 0.02).all(-1)
    assert uncovered.any() and not uncovered.all()
    inside = ~uncovered
    for p in ("reflection", "border"):
        assert float((copies[p][inside] - copies["zeros"][inside]).abs().mean()) < 0.02, p
        assert float(copies[p][uncovered].amin(-1).mean()) > 0.05, p  # filled, not black
    assert not torch.allclose(copies["reflection"][uncovered], copies["border"][uncovered])


def test_node_passes_its_padding(host, mini, tower, net, image, pt, monkeypatch):
    seen = []
    real = pt.augment
    monkeypatch.setattr(pt, "augment", lambda *a, **k: seen.append(a[3] if len(a) > 3 else k.get("padding"))
                        or real(*a, **k))
    model, clip, vae = mini
    for padding in ("border", None):  # None: the input left out (a workflow saved before it existed)
        call_node(NODE, promptnet=net, model=model, clip=clip, vae=vae, clip_vision=tower, image=image, steps=1,
                  learning_rate=2e-5, batch_size=1, augmented_copies=1, tune_unet_qkv=False, seed=0,
                  **({"padding": padding} if padding else {}))
    assert seen == ["border", "reflection"]


def test_mask_is_applied_with_black_padding(pt, mini, tower, net, subject):
    images, masks = subject
    config = _config(pt, augmented_copies=2)
    data = pt.build_dataset(net, mini[2], tower, images[:1], masks[:1], config)
    assert data.pixels.shape == (3, 64, 64, 3) and data.latents.shape[0] == 3 and data.tokens.shape[:2] == (3, 65)
    outside = masks[0] == 0
    assert float(data.pixels[0][outside].abs().max()) == 0  # the image times its mask
    corners = data.pixels[1:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert float(corners.max()) < 0.05  # the background and the padding stay black


def test_refusals_before_any_work(pt, mini, tower, net, image, host, err, monkeypatch, sd15):
    """Bad input is refused with a message naming the fix, before the dataset is built (nothing is encoded)."""
    pn = pack_module(host, "networks.promptnet")
    model, clip, vae = mini

    def no_work(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(pt, "build_dataset", no_work)
    cfg = _config(pt)
    with pytest.raises(err, match="one image.*batch of 2.*Image From Batch"):
        pt.tune(net, model, clip, vae, tower, image.expand(2, -1, -1, -1), None, cfg)
    with pytest.raises(err, match="mask is .* but the image"):
        pt.tune(net, model, clip, vae, tower, image, torch.ones(1, 32, 32), cfg)
    with pytest.raises(err, match="mask is empty"):
        pt.tune(net, model, clip, vae, tower, image, torch.zeros(1, 64, 64), cfg)
    with torch.inference_mode():
        other = pn.PromptNet.from_model(sd15[0], family="sd1", vision_width=128, seed=0)
    with pytest.raises(err, match="does not fit this MODEL"):
        pt.tune(other, model, clip, vae, tower, image, None, cfg)
    narrow = pn.PromptNet(family="sd1", unet=net.unet_config, vision_width=128, text_width=64,
                          downsize=net.config["downsize"], region_kernel=net.config["region_kernel"], seed=0)
    with pytest.raises(err, match="text width 64"):
        pt.tune(narrow, model, clip, vae, tower, image, None, cfg)
    with pytest.raises(err, match="does not contain the placeholder"):
        pt.tune(net, model, clip, vae, tower, image, None, _config(pt, prompt="a photo of a star"))
    with pytest.raises(err, match="augmented_copies"):
        pt.tune(net, model, clip, vae, tower, image, None, _config(pt, augmented_copies=-1))
    monkeypatch.undo()
    wide = pn.PromptNet(family="sd1", unet=net.unet_config, vision_width=64, text_width=128,
                        downsize=net.config["downsize"], region_kernel=net.config["region_kernel"], seed=0)
    with pytest.raises(err, match="CLIP vision tokens of width 64"):  # known once the CLIP vision model has run
        pt.tune(wide, model, clip, vae, tower, image, None, cfg)


def test_nan_loss_is_refused_and_nothing_changes(pt, mini, tower, net, image, err):
    model, clip, vae = mini
    before = _state(net)
    with pytest.raises(err, match="loss became .*Lower the learning rate"):
        pt.tune(net, model, clip, vae, tower, image, None, _config(pt, steps=6, learning_rate=1e30))
    assert _same_state(_state(net), before) and not model.patches


def test_node_call_outputs(host, mini, tower, net, image):
    model, clip, vae = mini
    out = call_node(NODE, promptnet=net, model=model, clip=clip, vae=vae, clip_vision=tower, image=image, steps=2,
                    learning_rate=2e-5, batch_size=2, augmented_copies=1, tune_unet_qkv=True, seed=0,
                    preview_every=1)
    tuned, out_model, loss, previews = out
    assert len(loss["loss"]) == 2 and previews.shape == (2, 64, 64, 3)
    assert out_model is not model and set(out_model.patches)


def test_cancel_stops_at_the_next_step_and_leaves_everything_clean(pt, mini, tower, net, image):
    """Cancel (ComfyUI's interrupt) is checked before every step: after step 1 the run stops, the input PromptNet
    and MODEL are as they were and no patch of the training clones is left on the shared UNet."""
    import comfy.model_management as mm
    import comfy.utils
    from helpers import module_forward_is_clean
    model, clip, vae = mini
    before, out_before = _state(net), _raw_unet(model)
    calls = []

    def hook(value, total, preview, *args, **kwargs):
        calls.append(value)
        if value == 1:
            mm.interrupt_current_processing(True)

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            pt.tune(net, model, clip, vae, tower, image, None, _config(pt, steps=5))
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert calls == [1]
    assert _same_state(_state(net), before) and not model.patches
    assert module_forward_is_clean(model.model) and module_forward_is_clean(net)
    torch.testing.assert_close(_raw_unet(model), out_before, rtol=0, atol=0)


def test_sd2_v_prediction_fixture(host, pt, sd2, tower):
    """The official base family (SD2, v-prediction, 4 levels): one step tunes the PromptNet and patches q/k/v of the
    SD2 fixture, with a finite loss. A one-word head for 8×8 latents (region kernel 1, 64 px), so the CPU step
    takes seconds, not the minute of the official 64×64 (512 px)."""
    pn = pack_module(host, "networks.promptnet")
    model, clip, vae = sd2
    with torch.inference_mode():
        net = pn.PromptNet.from_model(model, family="sd2", vision_width=128, seed=0, downsize=8, region_kernel=1)
    assert net.latent_size == 8
    image = torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(0))
    tuned, out_model, result = pt.tune(net, model, clip, vae, tower, image, None,
                                       _config(pt, steps=1, batch_size=1, augmented_copies=1))
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    assert set(out_model.patches) and all(k.endswith(QKV) for k in out_model.patches)
    assert not _same_state(_state(tuned), _state(net))

"""ProFusion's nodes (nodes/profusion.py) through ComfyUI's real executor, on the shipped mini model: PromptNet Loader →
PromptNet Encode → Fusion Sampler → stock SamplerCustom runs, follows its seed and equals the methods called
directly with the same values; inside the run PromptNet sees the very x_t (= x/√(1+σ²)) and timestep of each model
evaluation, and γ scales only S*'s row of the prompt the fusion stage feeds the UNet; bad input is refused with a
clear error before work. The maths is tested in tests/test_profusion_sampler.py and tests/test_promptnet.py."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import call_node, pack_module

PROMPT = "a photo of holder on the beach"
PN_FILE = "mini_world_promptnet.safetensors"
STEPS, SEED = 3, 7
# non-default values, so that a socket wired to the wrong parameter shows
SETTINGS = dict(omega1=4.0, omega2=2.5, m=1, gamma=0.5, omega_f=3.0, eta_fuse=0.8)


@pytest.fixture(scope="module")
def pf(host):
    return pack_module(host, "methods.profusion")


@pytest.fixture(scope="module")
def err(host):
    return pack_module(host, "core.host").PersonalizeError


@pytest.fixture(scope="module")
def mini(host):
    return call_node("PersonalizeLoadMiniModel", ckpt_name="mini_world.safetensors")


@pytest.fixture(scope="module")
def tower(host):
    return call_node("PersonalizeLoadMiniCLIPVision", clip_name="mini_world_clip_vision.safetensors")[0]


@pytest.fixture(scope="module")
def net(host):
    return call_node("PersonalizePromptNetLoader", promptnet_name=PN_FILE)[0]


@pytest.fixture(scope="module")
def view(host):
    images = call_node("PersonalizeLoadSubjectImages", folder="striped_red_star", size=64)[0]
    return images[:1]


class _Sink:
    """A test-only output node keeping the latents it gets."""
    FUNCTION, CATEGORY, RETURN_TYPES, OUTPUT_NODE = "keep", "testing", (), True
    kept: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def keep(self, samples):
        _Sink.kept.append(samples["samples"].clone())
        return {}


class _Recorder:
    """A test-only node: the MODEL with a UNet wrapper that records every evaluation (x, σ, c_crossattn) and a copy of
    the PROMPTNET with a forward hook that records every call (timestep, x_t, S*)."""
    FUNCTION, CATEGORY, RETURN_TYPES = "wrap", "testing", ("MODEL", "PROMPTNET")
    unet: list = []
    promptnet: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "promptnet": ("PROMPTNET",)}}

    def wrap(self, model, promptnet):
        def unet(apply_model, args):
            c = args["c"]
            _Recorder.unet.append((args["input"].detach().cpu().clone(), args["timestep"].detach().cpu().clone(),
                                   c["c_crossattn"].detach().cpu().clone()))
            return apply_model(args["input"], args["timestep"], **c)

        def hook(module, inputs, output):
            _ref, t, _tokens, x_t = inputs
            _Recorder.promptnet.append((t.detach().cpu().clone(), x_t.detach().cpu().clone(),
                                        output[:, :1].detach().cpu().clone()))

        patched = model.clone()
        patched.set_model_unet_function_wrapper(unet)
        copy = promptnet.copy()
        copy.register_forward_hook(hook)
        return patched, copy


def _graph(seed=SEED, settings=None, recorder=False, **over) -> dict:
    s = {**SETTINGS, **(settings or {})}
    model, pn = (["20", 0], ["20", 1]) if recorder else (["1", 0], ["3", 0])
    prompt = {
        "1": {"class_type": "PersonalizeLoadMiniModel", "inputs": {"ckpt_name": "mini_world.safetensors"}},
        "2": {"class_type": "PersonalizeLoadMiniCLIPVision",
              "inputs": {"clip_name": "mini_world_clip_vision.safetensors"}},
        "3": {"class_type": "PersonalizePromptNetLoader", "inputs": {"promptnet_name": PN_FILE}},
        "4": {"class_type": "PersonalizeLoadSubjectImages", "inputs": {"folder": "striped_red_star", "size": 64}},
        "5": {"class_type": "ImageFromBatch", "inputs": {"image": ["4", 0], "batch_index": 0, "length": 1}},
        "6": {"class_type": "PersonalizePromptNetEncode",
              "inputs": {"image": ["5", 0], "promptnet": pn, "vae": ["1", 2], "clip_vision": ["2", 0]}},
        "7": {"class_type": "PersonalizeFusionSampler",
              "inputs": {"promptnet": pn, "reference": ["6", 0], "clip": ["1", 1], "prompt": PROMPT,
                         "class_word": "star", "placeholder": "holder", **s}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "9": {"class_type": "BasicScheduler",
              "inputs": {"model": model, "scheduler": "ddim_uniform", "steps": STEPS, "denoise": 1.0}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "SamplerCustom",
               "inputs": {"model": model, "add_noise": True, "noise_seed": seed, "cfg": 5.0, "positive": ["8", 0],
                          "negative": ["8", 0], "sampler": ["7", 0], "sigmas": ["9", 0], "latent_image": ["10", 0]}},
        "12": {"class_type": "TestPFNodesSink", "inputs": {"samples": ["11", 0]}},
    }
    if recorder:
        prompt["20"] = {"class_type": "TestPFNodesRecorder", "inputs": {"model": ["1", 0], "promptnet": ["3", 0]}}
    for key, value in over.items():
        node, name = key.split("__")
        prompt[node]["inputs"][name] = value
    return prompt


@pytest.fixture
def test_nodes(host, monkeypatch):
    _Sink.kept, _Recorder.unet, _Recorder.promptnet = [], [], []
    monkeypatch.setitem(host.nodes.NODE_CLASS_MAPPINGS, "TestPFNodesSink", _Sink)
    monkeypatch.setitem(host.nodes.NODE_CLASS_MAPPINGS, "TestPFNodesRecorder", _Recorder)


def _run(run_workflow, prompt, **kw):
    return run_workflow(prompt, fresh_executor=True, **kw)


def test_loader_lists_the_shipped_promptnet_and_load_mini_model_does_not(host):
    import folder_paths
    assert PN_FILE in folder_paths.get_filename_list("promptnet")
    options = host.nodes.NODE_CLASS_MAPPINGS["PersonalizePromptNetLoader"].INPUT_TYPES()["required"]["promptnet_name"]
    assert PN_FILE in (options[0] if isinstance(options[0], list) else options[1]["options"])
    ckpts = host.nodes.NODE_CLASS_MAPPINGS["PersonalizeLoadMiniModel"].INPUT_TYPES()["required"]["ckpt_name"]
    assert not any("promptnet" in name for name in (ckpts[0] if isinstance(ckpts[0], list) else ckpts[1]["options"]))


def test_graph_runs_follows_its_seed_and_equals_the_methods(host, pf, mini, tower, net, view, run_workflow,
                                                            test_nodes):
    _run(run_workflow, _graph())
    _run(run_workflow, _graph())
    _run(run_workflow, _graph(seed=SEED + 1))
    first, again, other = _Sink.kept
    assert first.shape == (1, 4, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert float((first - other).abs().max()) > 1e-2
    # the same through the methods, called directly with the values the graph gives its sockets
    model, clip, vae = mini
    with torch.inference_mode():  # as the executor runs nodes
        ref = pf.encode_reference(view, net, vae, tower)
        conditions = pf.PromptNetConditions(net, [ref], clip, PROMPT, "star", None)
        sampler = pf.fusion_sampler(conditions, pf.FusionSettings(**SETTINGS))
    sigmas = call_node("BasicScheduler", model=model, scheduler="ddim_uniform", steps=STEPS, denoise=1.0)[0]
    empty = call_node("CLIPTextEncode", clip=clip, text="")[0]
    latent = call_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    direct = call_node("SamplerCustom", model=model, add_noise=True, noise_seed=SEED, cfg=5.0, positive=empty,
                       negative=empty, sampler=sampler, sigmas=sigmas, latent_image=latent)[0]["samples"]
    torch.testing.assert_close(first.cpu(), direct.cpu(), rtol=1e-5, atol=1e-5)
    # another γ gives another image (the setting reaches the sampler)
    _run(run_workflow, _graph(settings={"gamma": 0.9}))
    assert float((_Sink.kept[-1] - first).abs().max()) > 1e-3


def test_promptnet_sees_each_evaluations_x_t_and_t_and_gamma_scales_only_the_s_star_row(host, pf, mini, run_workflow,
                                                                                        test_nodes):
    """Per step: m fusion evaluations then the refinement; before each, one PromptNet call on x_t = x/√(1+σ²) of
    that evaluation's x and the model's timestep of its σ; the prompt branch's context is Enc(S*) of that call with
    the S* row times γ (fusion) or as it is (refinement)."""
    m, gamma = 2, SETTINGS["gamma"]
    _run(run_workflow, _graph(settings={"m": m}, recorder=True))
    calls, evals = _Recorder.promptnet, _Recorder.unet
    assert len(calls) == len(evals) == STEPS * (m + 1)  # one batched UNet call per evaluation list on the CPU
    model, clip, _ = mini
    template = pf.PlaceholderPrompt(clip, PROMPT)
    row = template.rows[0]
    others = [i for i in range(77) if i != row]
    ms = model.model.model_sampling
    for k, ((t, x_t, words), (x, sigma, context)) in enumerate(zip(calls, evals)):
        fusion = k % (m + 1) < m
        s = float(sigma[0])
        assert torch.allclose(x_t, x[:1] / math.sqrt(1 + s * s), atol=1e-6), k
        assert float(t[0]) == pytest.approx(float(ms.timestep(sigma[:1]).float()[0]), abs=1e-3)
        branches = context.shape[0]
        assert branches == (2 if fusion else 3), k  # ∅ + prompt (fusion); ∅ + prompt + class word (refinement)
        with torch.no_grad():
            plain = template.encode(words[:, 0]).cpu()
        matches = [b for b in range(branches) if torch.allclose(context[b, others], plain[0, others], atol=1e-5)]
        assert len(matches) == 1, k  # exactly one branch is the prompt with this call's S*
        got = context[matches[0], row]
        want = plain[0, row] * (gamma if fusion else 1.0)
        assert torch.allclose(got, want, atol=1e-5), (k, fusion)
        assert not torch.allclose(got, plain[0, row] * (1.0 if fusion else gamma), atol=1e-4)
    # S* follows x_t and t: the timesteps fall step by step and the words differ between calls
    ts = [float(c[0][0]) for c in calls]
    assert ts[::m + 1] == sorted(ts[::m + 1], reverse=True) and len(set(ts)) == STEPS
    assert all(not torch.allclose(calls[i][2], calls[i + 1][2], atol=1e-4) for i in range(len(calls) - 1))
    assert not torch.allclose(calls[0][1], calls[1][1])


def test_latents_of_another_size_are_resized_for_promptnet_only(host, run_workflow, test_nodes):
    """A 96 px image (12×12 latents) samples at its size; PromptNet reads x_t resized to its own 8×8 (methods.md
    §5.3, UNCONFIRMED behaviour of the official encoder, our choice)."""
    _run(run_workflow, _graph(recorder=True, **{"9__steps": 2, "10__width": 96, "10__height": 96}))
    assert _Sink.kept[0].shape == (1, 4, 12, 12) and torch.isfinite(_Sink.kept[0]).all()
    assert {tuple(x_t.shape) for _t, x_t, _w in _Recorder.promptnet} == {(1, 4, 8, 8)}
    assert {tuple(x.shape[-2:]) for x, _s, _c in _Recorder.unet} == {(12, 12)}
    x, sigma, _ = _Recorder.unet[0]
    s = float(sigma[0])
    want = torch.nn.functional.interpolate(x[:1] / math.sqrt(1 + s * s), size=(8, 8), mode="bilinear",
                                           align_corners=False, antialias=True)
    assert torch.allclose(_Recorder.promptnet[0][1], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors before work.

def test_promptnet_for_another_model_is_refused_before_sampling(host, run_workflow, ckpt_sd15, test_nodes):
    prompt = _graph()
    prompt["30"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_sd15}}
    prompt["9"]["inputs"]["model"] = ["30", 0]
    prompt["11"]["inputs"]["model"] = ["30", 0]
    result = _run(run_workflow, prompt, expect_error=True)
    assert "does not fit this MODEL" in result.error_message() and "Fusion Sampler" in result.error_message()
    assert not _Sink.kept
    # the CLIP of another text width: refused when the sampler is made
    prompt["7"]["inputs"]["clip"] = ["30", 1]
    result = _run(run_workflow, prompt, expect_error=True)
    assert "words of width 128" in result.error_message()


def test_bad_inputs_of_the_nodes(host, pf, mini, tower, net, view, err):
    model, clip, vae = mini
    ref = call_node("PersonalizePromptNetEncode", image=view, promptnet=net, vae=vae, clip_vision=tower)[0]
    kw = dict(promptnet=net, reference=ref, clip=clip, prompt=PROMPT, class_word="star", placeholder="holder",
              **SETTINGS)
    with pytest.raises(err, match="does not contain the placeholder 'holder'"):
        call_node("PersonalizeFusionSampler", **{**kw, "prompt": "a photo of a star on the beach"})
    with pytest.raises(err, match="one token"):
        call_node("PersonalizeFusionSampler", **{**kw, "placeholder": "two words"})
    with pytest.raises(err, match="give the class word"):
        call_node("PersonalizeFusionSampler", **{**kw, "class_word": " "})
    foreign = pf.Reference(ref.latent, ref.vision_tokens[..., :64], ref.latent_size, 64)
    with pytest.raises(err, match="encoded for another PromptNet"):
        call_node("PersonalizeFusionSampler", **{**kw, "reference": foreign})
    with pytest.raises(err, match="encoded for another PromptNet"):
        call_node("PersonalizeFusionSampler", **{**kw, "reference_2": foreign})
    with pytest.raises(err, match="η_fuse|must lie in 0..1"):
        call_node("PersonalizeFusionSampler", **{**kw, "eta_fuse": 1.5})
    with pytest.raises(err, match="connect a CLIP_VISION"):
        call_node("PersonalizePromptNetEncode", image=view, promptnet=net, vae=vae, clip_vision=None)
    with pytest.raises(err, match="one reference image is expected; got a batch of 2"):
        call_node("PersonalizePromptNetEncode", image=view.repeat(2, 1, 1, 1), promptnet=net, vae=vae,
                  clip_vision=tower)
    with pytest.raises(err, match="the mask is"):
        call_node("PersonalizePromptNetEncode", image=view, promptnet=net, vae=vae, clip_vision=tower,
                  mask=torch.ones(1, 32, 32))
    with pytest.raises(err, match="mask is empty"):
        call_node("PersonalizePromptNetEncode", image=view, promptnet=net, vae=vae, clip_vision=tower,
                  mask=torch.zeros(1, 64, 64))
    # a masked reference is another reference; the sampler with two references runs its refusals too
    masked = call_node("PersonalizePromptNetEncode", image=view, promptnet=net, vae=vae, clip_vision=tower,
                       mask=torch.ones(1, 64, 64) * (torch.arange(64) < 32).float()[None, :, None])[0]
    assert not torch.allclose(masked.latent, ref.latent)
    assert call_node("PersonalizeFusionSampler", **{**kw, "reference_2": masked, "scale_2": 2.0})[0] is not None


def test_missing_clip_vision_is_refused_by_validation(host, run_workflow, test_nodes):
    from harness.executor import WorkflowValidationError
    prompt = _graph()
    del prompt["6"]["inputs"]["clip_vision"]
    with pytest.raises(WorkflowValidationError, match="clip_vision"):
        _run(run_workflow, prompt)


def test_corrupt_and_foreign_files_are_refused(host, run_workflow, tmp_path, test_nodes):
    pn = pack_module(host, "networks.promptnet")
    mc = pack_module(host, "networks.mini_clip")
    folder = pn.PROMPTNET_FILE.write_dir()
    folder.mkdir(parents=True, exist_ok=True)
    shipped = pn.PROMPTNET_FILE.resolve(PN_FILE)
    damaged = folder / "test_damaged_promptnet.safetensors"
    damaged.write_bytes(shipped.read_bytes()[:-1000])
    foreign = mc.CLIP_VISION_FILE.save({"w": torch.zeros(1)}, folder / "test_foreign_promptnet.safetensors",
                                       family=None)
    try:
        result = _run(run_workflow, _graph(**{"3__promptnet_name": damaged.name}), expect_error=True)
        assert damaged.name in result.error_message() or "damaged" in result.error_message()
        result = _run(run_workflow, _graph(**{"3__promptnet_name": foreign.name}), expect_error=True)
        assert "is not a PromptNet file" in result.error_message()
        assert not _Sink.kept
    finally:
        damaged.unlink(missing_ok=True)
        foreign.unlink(missing_ok=True)

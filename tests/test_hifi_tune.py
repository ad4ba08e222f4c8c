"""HiFi Subject Tune / HiFi Subject Conditioning / HiFi Load Subject (HiFi Tuner §3.2, Algorithm 1) on the SD1.5
fixture; SD2 (v-prediction) and SDXL runs are marked slow."""
import numpy as np
import pytest
import torch

from helpers import call_node, encode, eps_loss_reference, pack_module

TUNE = "PersonalizeHiFiSubjectTune"
COND = "PersonalizeHiFiSubjectConditioning"
LOAD = "PersonalizeHiFiLoadSubject"
CAPTION = "a photo of a dog"
STEPS = 4          # global steps of the two small training runs below
LR = 1e-1


@pytest.fixture(scope="module")
def hifi(host):
    host.model_folder("personalize_subjects")  # subject files go to the session's models dir, first in the list
    return pack_module(host, "methods.hifi_tuner")


@pytest.fixture
def err(host):
    return pack_module(host, "core.host").PersonalizeError


def _tune(model, clip, vae, images, name, **kw):
    args = dict(model=model, clip=clip, vae=vae, images=images, caption=CAPTION, n_tokens=5, global_steps=2,
                steps_per_step=1, sampling_steps=2, learning_rate=5e-3, reg_weight=1e-2, use_mask=False,
                use_regularisation=True, use_stepwise=True, seed=0, subject_name=name, overwrite=False)
    args.update(kw)
    return call_node(TUNE, **args)


def _subject_file(host, name):
    return host.folder_paths.get_full_path("personalize_subjects", name + ".safetensors")


@pytest.fixture(scope="module")
def trained(hifi, sd15, subject):
    """One small run through the node: unmasked, no regulariser, 4 global steps at lr 0.1, then 2 step-wise
    timesteps x 1 step. Returns (subject, loss map, file name)."""
    import uuid
    model, clip, vae = sd15
    name = f"hifi_{uuid.uuid4().hex[:8]}"
    return _tune(model, clip, vae, subject[0], name, global_steps=STEPS, learning_rate=LR, use_regularisation=False)


def _tail(c, rows):
    """[c, c_s] written out: the last n rows of the encoded prompt replaced by the subject rows."""
    return torch.cat([c[:, :-rows.shape[0]], rows[None].to(c.dtype)], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Training


def test_masked_loss_has_zero_gradient_outside_mask(hifi, host, sd15, subject):
    """Eq. 5 + Eq. 6: the loss equals an independent computation, and latent cells outside the mask give no
    gradient while the subject rows do get one."""
    model, clip, vae = sd15
    images, masks = subject
    tuning = pack_module(host, "core.tuning")
    diffusion = pack_module(host, "core.diffusion")
    textual = pack_module(host, "core.textual")
    inputs = pack_module(host, "core.inputs")
    latents = call_node("VAEEncode", pixels=images, vae=vae)[0]["samples"]
    lmask = inputs.to_latent_masks(masks, tuple(latents.shape[-2:]))
    assert 0 < float(lmask.mean()) < 1
    cond = encode(clip, CAPTION).clone()
    null_tail = encode(clip, "")[0, -5:].clone()
    with tuning.TrainingSession(model) as s:
        s.load()
        rows = textual.ConditioningRows(null_tail)
        with torch.no_grad():
            rows.rows.add_(0.05 * torch.randn(rows.rows.shape, generator=torch.Generator().manual_seed(3)))
        obj = diffusion.DiffusionObjective(s.model, latents, lmask, tuning.seeded_generator(0))
        captured, real_predict = {}, obj.predict

        def predict(x, sigma, c, pooled=None):
            d = real_predict(x, sigma, c, pooled)
            captured.update(x=x.detach(), sigma=sigma.detach(), d=d)
            d.retain_grad()
            return d

        obj.predict = predict
        gen_state = obj.generator.get_state()
        loss, _ = hifi.masked_eps_loss(obj, rows, cond, None, 2, None, True, 0.5)
        loss.backward()
        # independent value: sum(M ⊙ (ε̂ − ε)²) / ΣM over channels + w·mean((c_s − ϕ_s)²)
        obj.generator.set_state(gen_state)
        idx, sigma, noise = (t.cpu() for t in obj.sample(2))  # written out on the CPU, whatever the device
        eps_hat = (captured["x"].cpu() - captured["d"].detach().cpu()) / sigma.view(-1, 1, 1, 1)
        m = lmask[idx].expand_as(eps_hat)
        expected = float(((eps_hat - noise).pow(2) * m).sum() / m.sum()
                         + 0.5 * (rows.rows.detach().cpu() - null_tail.cpu()).pow(2).mean())
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
        grad = captured["d"].grad.cpu()
        assert grad[m == 0].abs().max() == 0
        assert grad[m > 0].abs().max() > 0
        assert rows.rows.grad is not None and rows.rows.grad.abs().max() > 0


def test_global_loss_goes_down(hifi, sd15, subject, trained):
    """The global rows lower the ε-loss on the subject photos, measured by an independent implementation at
    fixed timesteps and noise (not the node's own noisy per-step losses)."""
    model, clip, vae = sd15
    images, _ = subject
    subj, loss, _ = trained
    latents = call_node("VAEEncode", pixels=images, vae=vae)[0]["samples"]
    c = encode(clip, CAPTION)
    ts = [200, 500, 800]
    before = eps_loss_reference(model, latents, _tail(c, subj.null_tail), timesteps=ts)
    after = eps_loss_reference(model, latents, _tail(c, subj.global_rows), timesteps=ts)
    assert after < before * 0.995, (before, after)
    # one loss per step: global phase then 2 timesteps x 1 step; all finite
    assert len(loss["loss"]) == STEPS + 2 and np.isfinite(loss["loss"]).all()


def test_regularisation_pulls_toward_null_tail(hifi, sd15, subject, trained, unique_name):
    """Eq. 6: with a large w_s the rows stay much closer to ϕ_s than the same run without the regulariser."""
    model, clip, vae = sd15
    free, _, _ = trained
    anchored = _tune(model, clip, vae, subject[0], unique_name("hifi"), global_steps=STEPS, learning_rate=LR,
                     reg_weight=100.0, use_stepwise=False)[0]
    # the null tail is the encoded empty prompt's last 5 rows, and both runs started from it
    torch.testing.assert_close(free.null_tail, encode(clip, "")[0, -5:].float())
    torch.testing.assert_close(anchored.null_tail, free.null_tail)
    d_free = float((free.global_rows - free.null_tail).pow(2).mean().sqrt())
    d_reg = float((anchored.global_rows - anchored.null_tail).pow(2).mean().sqrt())
    assert d_reg < 0.5 * d_free, (d_reg, d_free)
    assert anchored.rows.shape[0] == 1 and not anchored.has_stepwise


def test_stepwise_schedule_and_storage(hifi, host, sd15, trained):
    """Algorithm 1 walks the DDIM timesteps high to low noise; each is stored as timestep, sigma and percent, and
    the host's percent_to_sigma maps the stored percent back onto the stored sigma."""
    model = sd15[0]
    subj, _, _ = trained
    assert hifi.ddim_timesteps(50)[:3] == [981, 961, 941] and hifi.ddim_timesteps(50)[-1] == 1
    assert subj.timesteps == [501, 1]
    assert subj.rows.shape == (3, 5, 768)
    ms = model.model.model_sampling
    torch.testing.assert_close(subj.sigmas, ms.sigmas[[501, 1]].float())
    for p, sigma in zip(subj.percents, subj.sigmas):
        assert ms.percent_to_sigma(p) == pytest.approx(float(sigma), rel=1e-5)
    # each step-wise row set started from the previous one and moved (one step each)
    assert not torch.equal(subj.rows[1], subj.rows[0]) and not torch.equal(subj.rows[2], subj.rows[1])


# ---------------------------------------------------------------------------------------------------------
# Conditioning: step-wise rows reach the UNet at their own timesteps and nowhere else


def _recording_model(model):
    """A clone whose UNet calls record (sigma, cond-or-uncond, c_crossattn tail) for every batch chunk. The
    wrapper sees exactly what ``apply_model`` would get; it returns zeros instead of running the UNet (the
    sampling itself — cond processing, timestep ranges, batching — is the host's, unchanged)."""
    seen = []
    m = model.clone()

    def wrapper(apply_model, args):
        x, sigma, c = args["input"], args["timestep"], args["c"]
        chunks = args["cond_or_uncond"]
        per = x.shape[0] // len(chunks)
        for i, kind in enumerate(chunks):
            seen.append((float(sigma[i * per]), kind, c["c_crossattn"][i * per, -5:].detach().float().cpu()))
        return torch.zeros_like(x)

    m.set_model_unet_function_wrapper(wrapper)
    return m, seen


def _marked_subject(hifi, timesteps, model):
    """A subject whose row sets are constants: global 100, step-wise k + 1 (k = 0 at the highest noise)."""
    k = len(timesteps)
    rows = torch.stack([torch.full((5, 768), 100.0)] + [torch.full((5, 768), float(i + 1)) for i in range(k)])
    sig = model.model.model_sampling.sigmas[timesteps].float()
    return hifi.HiFiSubject(rows=rows, timesteps=list(timesteps), sigmas=sig,
                            percents=[hifi.timestep_to_percent(t) for t in timesteps], null_tail=rows[0] * 0,
                            family="sd1", caption=CAPTION)


def _expected_row(t_cont, timesteps):
    """Reference for the documented rule: the row set of the nearest training timestep, the boundary between
    neighbours τ_a > τ_b at the half-integer timestep floor((τ_a + τ_b) / 2) + 0.5."""
    for k in range(len(timesteps)):
        hi = np.inf if k == 0 else np.floor((timesteps[k - 1] + timesteps[k]) / 2) + 0.5
        lo = -np.inf if k == len(timesteps) - 1 else np.floor((timesteps[k] + timesteps[k + 1]) / 2) + 0.5
        if lo < t_cont < hi:
            return k + 1
    raise AssertionError(f"t={t_cont} is on a boundary")


def _continuous_t(model, sigma):
    """Inverse of ComfyUI's log-linear sigma(t), with numpy."""
    log_s = model.model.model_sampling.log_sigmas.double().cpu().numpy()
    return float(np.interp(np.log(sigma), log_s, np.arange(len(log_s))))


def _sample(model, positive, negative, **kw):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    if "sigmas" in kw:
        sampler = call_node("KSamplerSelect", sampler_name="euler")[0]
        return call_node("SamplerCustom", model=model, add_noise=True, noise_seed=1, cfg=2.0, positive=positive,
                         negative=negative, sampler=sampler, sigmas=kw["sigmas"], latent_image=latent)
    return call_node("KSampler", model=model, seed=1, cfg=2.0, positive=positive, negative=negative,
                     latent_image=latent, denoise=1.0, **kw)


def test_stepwise_rows_reach_the_model_at_their_timesteps(hifi, host, sd15):
    model, clip, _ = sd15
    timesteps = hifi.ddim_timesteps(5)
    assert timesteps == [801, 601, 401, 201, 1]
    subj = _marked_subject(hifi, timesteps, model)
    positive = call_node("CLIPTextEncode", clip=clip, text="a dog on the beach")[0]
    negative = call_node("CLIPTextEncode", clip=clip, text="")[0]
    null_tail = negative[0][0][0, -5:]
    cond = call_node(COND, conditioning=positive, subject=subj, use_stepwise=True)[0]
    assert len(cond) == 5
    # the ranges tile [0, 1]: shared boundaries, no gap
    ranges = [(c[1]["start_percent"], c[1]["end_percent"]) for c in cond]
    assert ranges[0][0] == 0.0 and ranges[-1][1] == 1.0
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(torch.equal(c[1]["pooled_output"], positive[0][1]["pooled_output"]) for c in cond)

    # 1) stock KSampler, ddim + ddim_uniform with the training step count: exactly the training sigmas, in order,
    #    each with exactly its own row set; the negative prompt is untouched
    rec, seen = _recording_model(model)
    _sample(rec, cond, negative, steps=5, sampler_name="ddim", scheduler="ddim_uniform")
    conds = [(s, tail) for s, kind, tail in seen if kind == 0]
    assert [s for s, _ in conds] == pytest.approx(subj.sigmas.tolist(), rel=1e-6)
    for k, (_s, tail) in enumerate(conds):
        assert torch.equal(tail, torch.full_like(tail, k + 1.0)), (k, tail.unique())
    assert all(torch.equal(tail, null_tail) for _s, kind, tail in seen if kind == 1)

    # 2) SamplerCustom with sigmas 16 float32 steps above and below every boundary sigma (a relative 2e-6; a GPU
    #    computes the boundary with its own exp/log, an ulp or two from the CPU's: one ulp away failed on an H100),
    #    plus the extremes: exactly one row set each (no overlap, no gap); exactly on a boundary both neighbours
    #    are evaluated (ComfyUI's ranges are inclusive at both ends; boundaries sit at half-integer timesteps,
    #    which no discrete schedule can hit)
    ms = model.model.model_sampling
    bounds = [ms.percent_to_sigma(e) for _s, e in ranges[:-1]]
    probe = [float(ms.sigmas[-1])]
    for b, t_b in zip(bounds, [np.floor((a + c) / 2) + 0.5 for a, c in zip(timesteps, timesteps[1:])]):
        lo, hi = float(ms.sigmas[int(np.floor(t_b))]), float(ms.sigmas[int(np.ceil(t_b))])
        assert lo < b < hi, (lo, b, hi)
        ulp = np.spacing(np.float32(b))
        up, down = float(np.float32(b) + 16 * ulp), float(np.float32(b) - 16 * ulp)
        assert lo < down < up < hi
        probe += [up, down]
    probe += [float(ms.sigmas[0])]
    sigmas = torch.tensor(sorted(probe, reverse=True) + [0.0], dtype=torch.float32)
    rec, seen = _recording_model(model)
    _sample(rec, cond, negative, sigmas=sigmas)
    conds = [(s, tail) for s, kind, tail in seen if kind == 0]
    assert len(conds) == len(probe)
    for s, tail in conds:
        want = _expected_row(_continuous_t(model, s), timesteps)
        assert torch.equal(tail, torch.full_like(tail, float(want))), (s, want, tail.unique())
    rec, seen = _recording_model(model)
    _sample(rec, cond, negative, sigmas=torch.tensor([bounds[1], 0.0]))
    assert sorted(float(t[0, 0]) for _s, kind, t in seen if kind == 0) == [2.0, 3.0]

    # 3) stock KSampler with another schedule (euler/normal, 7 steps): every step gets one row set, by the rule
    rec, seen = _recording_model(model)
    _sample(rec, cond, negative, steps=7, sampler_name="euler", scheduler="normal")
    conds = [(s, tail) for s, kind, tail in seen if kind == 0]
    assert len(conds) == 7
    for s, tail in conds:
        want = _expected_row(_continuous_t(model, s), timesteps)
        assert torch.equal(tail, torch.full_like(tail, float(want))), (s, want, tail.unique())

    # use_stepwise off: one entry per input entry, the global rows at every step
    flat = call_node(COND, conditioning=positive, subject=subj, use_stepwise=False)[0]
    assert len(flat) == 1 and "start_percent" not in flat[0][1]
    torch.testing.assert_close(flat[0][0], _tail(positive[0][0], subj.global_rows))


def test_conditioning_keeps_an_existing_timestep_range(hifi, sd15):
    model, clip, _ = sd15
    subj = _marked_subject(hifi, hifi.ddim_timesteps(5), model)
    positive = call_node("CLIPTextEncode", clip=clip, text="a dog")[0]
    ranged = call_node("ConditioningSetTimestepRange", conditioning=positive, start=0.3, end=0.6)[0]
    out = call_node(COND, conditioning=ranged, subject=subj, use_stepwise=True)[0]
    spans = [(c[1]["start_percent"], c[1]["end_percent"]) for c in out]
    assert spans[0][0] == 0.3 and spans[-1][1] == 0.6
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert [float(c[0][0, -1, 0]) for c in out] == [2.0, 3.0]  # t in [399.6, 699.3]: rows of 601 and 401


# ---------------------------------------------------------------------------------------------------------
# Files


def test_save_load_round_trip(hifi, host, trained):
    subj, _, file_name = trained
    path = _subject_file(host, file_name.removesuffix(".safetensors"))
    assert path and file_name in host.filename_list("personalize_subjects")
    loaded = call_node(LOAD, subject_file=file_name)[0]
    assert torch.equal(loaded.rows, subj.rows) and torch.equal(loaded.null_tail, subj.null_tail)
    assert loaded.timesteps == subj.timesteps and loaded.percents == subj.percents
    assert torch.equal(loaded.sigmas, subj.sigmas)
    assert (loaded.family, loaded.caption) == ("sd1", CAPTION)
    assert loaded.metadata["global_steps"] == STEPS and loaded.metadata["use_reg"] is False
    assert loaded.metadata["reg_weight"] == 1e-2


def test_loaded_subject_samples_in_a_workflow(hifi, host, run_workflow, ckpt_sd15, trained):
    """Load -> Conditioning -> stock KSampler through ComfyUI's executor (the Tune node runs in
    workflows/hifi_subject_tune_*.json, tests/test_workflows.py)."""
    _, _, file_name = trained
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_sd15}},
        "2": {"class_type": LOAD, "inputs": {"subject_file": file_name}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a dog in the snow"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": COND, "inputs": {"conditioning": ["3", 0], "subject": ["2", 0], "use_stepwise": True}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["5", 0], "negative": ["4", 0],
                                                   "latent_image": ["6", 0], "seed": 3, "steps": 2, "cfg": 7.5,
                                                   "sampler_name": "ddim", "scheduler": "ddim_uniform",
                                                   "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "personalize/hifi_test"}},
    }
    result = run_workflow(prompt)
    assert result.files()
    # a name that is not in the folder fails when the node runs, saying what to do
    prompt["2"]["inputs"]["subject_file"] = "no_such_subject.safetensors"
    failed = run_workflow(prompt, expect_error=True)
    assert "File not found" in failed.error_message()


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any work, nothing written


@pytest.mark.parametrize("case", ["count", "empty", "missing", "n_tokens", "caption"])
def test_bad_training_input(hifi, host, sd15, subject, err, unique_name, case):
    model, clip, vae = sd15
    images, masks = subject
    kw = dict(use_mask=True, mask=masks)
    if case == "count":
        kw["mask"], match = masks[:2], "2 masks for 3 images"
    elif case == "empty":
        bad = masks.clone()
        bad[1] = 0
        kw["mask"], match = bad, "mask of image 2 is empty"
    elif case == "missing":
        kw.pop("mask")
        match = "use_mask is on but no masks are connected"
    elif case == "n_tokens":
        kw.update(caption="a photo of a dog sitting on a red sofa in the afternoon sun", n_tokens=70)
        match = r"n_tokens 70 is too large: the caption uses 16 of the 77 positions, so at most 61"
    else:
        kw.update(caption="a dog " * 40)
        match = "longer than one 77-token chunk"
    name = unique_name("hifi")
    with pytest.raises(err, match=match):
        _tune(model, clip, vae, images, name, **kw)
    assert _subject_file(host, name) is None


def test_one_progress_bar_and_interrupt_in_the_stepwise_phase(hifi, host, sd15, subject, unique_name):
    """One ProgressBar spans the global and the step-wise phase (total = 2 + 2 x 1); Cancel during the step-wise
    phase stops the run before the next step and nothing is written."""
    import comfy.model_management as mm
    import comfy.utils
    model, clip, vae = sd15
    calls = []

    def hook(value, total, preview, *args, **kwargs):
        calls.append((value, total))
        if value == 3:
            mm.interrupt_current_processing(True)

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    name = unique_name("hifi")
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _tune(model, clip, vae, subject[0], name)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert calls == [(1, 4), (2, 4), (3, 4)]
    assert _subject_file(host, name) is None


def test_existing_file_is_not_overwritten(hifi, host, sd15, subject, err, trained):
    model, clip, vae = sd15
    _, _, file_name = trained
    path = _subject_file(host, file_name.removesuffix(".safetensors"))
    before = open(path, "rb").read()
    with pytest.raises(err, match="already exists.*enable 'overwrite'"):
        _tune(model, clip, vae, subject[0], file_name.removesuffix(".safetensors"))
    assert open(path, "rb").read() == before


def test_bad_files_and_families(hifi, host, err, trained, unique_name):
    subj, _, file_name = trained
    folder = host.model_folder("personalize_subjects")
    with pytest.raises(err, match="File not found"):
        call_node(LOAD, subject_file="missing_subject.safetensors")
    corrupt = folder / f"{unique_name('corrupt')}.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(err, match="not a readable safetensors file"):
        call_node(LOAD, subject_file=corrupt.name)
    from safetensors.torch import save_file
    other = folder / f"{unique_name('other')}.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, str(other))
    with pytest.raises(err, match="not a HiFi subject file"):
        call_node(LOAD, subject_file=other.name)
    # a subject trained on another family
    with pytest.raises(err, match="trained on SD1.x but is used with SD2.x.*retrain it"):
        hifi.load_subject(file_name, family="sd2")
    sd2_cond = [[torch.zeros(1, 77, 1024), {}]]
    with pytest.raises(err, match="trained on SD1.x .* but the conditioning is SD2.x"):
        call_node(COND, conditioning=sd2_cond, subject=subj, use_stepwise=True)
    flat = call_node(LOAD, subject_file=file_name)[0]
    flat.rows = flat.rows[:1]
    with pytest.raises(err, match="no step-wise representations"):
        call_node(COND, conditioning=[[torch.zeros(1, 77, 768), {}]], subject=flat, use_stepwise=True)
    # the validation hook refuses names that leave the folder
    assert host.node_class(LOAD).validate_inputs(subject_file="../escape") is not True


# ---------------------------------------------------------------------------------------------------------
# Other families


@pytest.mark.slow
def test_sd2_vpred_subject(hifi, host, sd2, subject, err, trained, unique_name):
    model, clip, vae = sd2
    images, masks = subject
    subj, loss, _ = _tune(model, clip, vae, images, unique_name("hifi2"), mask=masks, use_mask=True)
    assert subj.family == "sd2" and subj.rows.shape == (3, 5, 1024)
    assert np.isfinite(loss["loss"]).all() and len(loss["loss"]) == 4
    torch.testing.assert_close(subj.null_tail, encode(clip, "")[0, -5:].float())
    cond = call_node("CLIPTextEncode", clip=clip, text="a dog")[0]
    out = call_node(COND, conditioning=cond, subject=subj, use_stepwise=True)[0]
    assert len(out) == 2 and float(out[1][0][0, -1, 0]) == float(subj.rows[2][-1, 0])
    with pytest.raises(err, match="trained on SD1.x .* but the conditioning is SD2.x"):
        call_node(COND, conditioning=cond, subject=trained[0], use_stepwise=False)


@pytest.mark.slow
def test_sdxl_subject(hifi, host, sdxl, subject, unique_name):
    """SDXL (not covered by the paper): the tail of the 2048-d sequence; pooled untouched."""
    model, clip, vae = sdxl
    subj, loss, _ = _tune(model, clip, vae, subject[0], unique_name("hifixl"), global_steps=1, sampling_steps=1)
    assert subj.family == "sdxl" and subj.rows.shape == (2, 5, 2048) and np.isfinite(loss["loss"]).all()
    cond = call_node("CLIPTextEncode", clip=clip, text="a dog")[0]
    out = call_node(COND, conditioning=cond, subject=subj, use_stepwise=True)[0]
    assert len(out) == 1 and torch.equal(out[0][1]["pooled_output"], cond[0][1]["pooled_output"])
    torch.testing.assert_close(out[0][0], _tail(cond[0][0], subj.rows[1]))

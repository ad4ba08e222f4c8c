"""PromptNet's pre-training task (methods/profusion_pretrain.py) on the engine (core/pretrain.py), on the shipped mini
family and mini CLIP vision tower:

* ``encode_prompts`` (several placeholder prompts in one text-encoder call) equals each prompt's own encode;
* the prompts: the caption with the subject phrase replaced by the placeholder, the official one, a folder caption;
* the task's loss equals an ε-loss written out here from ComfyUI's conventions (S* from the network, the
  placeholder prompt per row, the MODEL's ``apply_model``) with the same σ and ε; gradients reach PromptNet and no
  frozen network; a few steps on one batch lower it;
* the engine: parts of a run resume to the straight run, the written file reads back (``load_promptnet``) giving
  the same S*; a folder of subjects with references trains;
* ``scripts/pretrain_promptnet.py --quick`` stops after N, resumes and writes the file, alone and as two gloo ranks
  under torchrun (``slow``: ComfyUI boots in subprocesses).

Held-out subjects never reach the world source (tests/test_pretrain.py covers WorldSource).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import pack_module

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pp(host):
    return pack_module(host, "methods.profusion_pretrain")


@pytest.fixture(scope="module")
def pf(host):
    return pack_module(host, "methods.profusion")


@pytest.fixture(scope="module")
def engine(host):
    return pack_module(host, "core.pretrain")


@pytest.fixture(scope="module")
def error(host):
    return pack_module(host, "core.host").PersonalizeError


@pytest.fixture(scope="module")
def nets(engine):
    return engine.host_networks(need_clip_vision=True)


@pytest.fixture(scope="module")
def views(host):
    return pack_module(host, "miniworld.sources").WorldSource("views", seed=5)


def _task(pp, nets, **kw):
    return pp.PromptNetTask(networks=nets, **kw)


def _folder(root: Path) -> Path:
    """Two subjects of two 64² images each; one caption holds the placeholder, the others do not."""
    import numpy as np
    from PIL import Image
    lines = []
    for s, subject in enumerate(("red_box", "blue_ball")):
        for k in range(2):
            a = np.zeros((64, 64, 3), np.uint8)
            a[..., s * 2] = 200
            a[16 + 8 * k:40 + 8 * k, 16:48] = 255
            (root / subject).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / subject / f"{k}.png")
            caption = "a photo of holder on a table" if (s, k) == (0, 0) else f"a photo of a {subject} on a table"
            lines.append({"image": f"{subject}/{k}.png", "caption": caption, "subject": subject})
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


# ------------------------------------------------------------------------------------------------ prompts

def test_encode_prompts_equals_each_prompts_own_encode(pf, nets):
    texts = ["a photo of holder on the beach", "holder", "a photo of holder in front of a brick wall at night"]
    prompts = [pf.PlaceholderPrompt(nets.clip, t) for t in texts]
    words = torch.randn(3, 1, prompts[0].width, generator=torch.Generator().manual_seed(0))
    together = pf.encode_prompts(prompts, words)
    alone = torch.cat([p.encode(words[i:i + 1]) for i, p in enumerate(prompts)])
    assert together.shape == alone.shape == (3, 77, prompts[0].width)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # the rows differ where the prompts do, and S* is at each prompt's own position
    assert [p.position for p in prompts] == [4, 1, 4]
    assert not torch.allclose(together[0], together[2])
    with pytest.raises(ValueError, match="3 prompts for 2 words"):
        pf.encode_prompts(prompts, words[:2])


def test_prompts_replace_the_subject_phrase(pp, nets, views, error):
    batch = views.batch(0, 0, 1, 6)
    task = _task(pp, nets)
    for caption, subject, prompt in zip(batch.captions, batch.extras["subjects"], task.prompts(batch)):
        assert prompt.startswith("a photo of holder ") and prompt.count("holder") == 1
        assert prompt.replace("holder", pp.subject_phrase(subject.name)) == caption
        assert not set(subject.words) & set(prompt.split())
    assert _task(pp, nets, prompt="official").prompts(batch) == ["a photo of holder"] * 6
    assert pp.caption_prompt("me, holder, at home", None) == "me, holder, at home"
    assert pp.caption_prompt("a cat on a mat", "a dog") is None
    assert pp.caption_prompt("a placeholder cat", "a dog") is None  # a whole word only
    with pytest.raises(error, match="caption, official"):
        _task(pp, nets, prompt="nope")


# ------------------------------------------------------------------------------------------------ the loss

def test_loss_is_the_eps_loss_with_s_star_in_each_rows_prompt(pp, pf, nets, views):
    """The task's loss against the objective written out here: σ and ε drawn as the task documents (timesteps, then
    noise, from the step generator), S* = PromptNet(reference latent, t, reference's CLIP vision tokens, VP x_t),
    each row's prompt encoded with its S* by the host CLIP (not the task's differentiable clone), D from the MODEL's
    apply_model, mean (ε̂ − ε)²."""
    task = _task(pp, nets)
    net = task.build(torch.device("cpu"))
    batch = views.batch(3, 0, 1, 4)
    loss, _ = task.loss(net, batch, torch.Generator().manual_seed(11))

    base = nets.model.model
    with torch.no_grad():
        x0 = base.process_latent_in(nets.vae.encode(batch.images).float())
        ref = base.process_latent_in(nets.vae.encode(batch.references).float())
        tokens = nets.clip_vision.encode_image(batch.references)["last_hidden_state"].float()
        g = torch.Generator().manual_seed(11)
        ts = torch.randint(0, 1000, (4,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        sigma = base.model_sampling.sigmas[ts].float()
        x = x0 + sigma.view(-1, 1, 1, 1) * noise
        x_t = x / torch.sqrt(1 + sigma.view(-1, 1, 1, 1) ** 2)
        words = net(ref, ts.float(), tokens, x_t)[:, :1]
        texts = [c.replace(pp.subject_phrase(s.name), "holder")
                 for c, s in zip(batch.captions, batch.extras["subjects"])]
        context = torch.cat([pf.PlaceholderPrompt(nets.clip, t).encode(words[i:i + 1]) for i, t in enumerate(texts)])
        d = base.apply_model(x, sigma, c_crossattn=context)
        expected = ((x - d) / sigma.view(-1, 1, 1, 1) - noise).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)


def test_gradients_reach_promptnet_only_and_steps_lower_the_loss(pp, nets, views):
    task = _task(pp, nets)
    net = task.build(torch.device("cpu"))
    batch = views.batch(0, 0, 1, 4)
    loss, _ = task.loss(net, batch, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("prompt_out.weight", "cond_embedding.conv_in.weight", "vision_proj.weight",
                 "encoder.input_blocks.0.0.weight", "encoder.middle_block.0.in_layers.2.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().max()) > 0, name
    frozen = [task.model.model, task.clip.cond_stage_model, nets.model.model, nets.clip.cond_stage_model,
              nets.vae.first_stage_model, nets.clip_vision.model]
    for module in frozen:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters()), type(module).__name__

    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
    losses = []
    for _ in range(8):
        loss, _ = task.loss(net, batch, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


def test_word_init_scale_scales_the_last_layer_only(pp, nets):
    plain = _task(pp, nets).build(torch.device("cpu")).state_dict()
    small = _task(pp, nets, word_init_scale=0.05).build(torch.device("cpu")).state_dict()
    for k, v in plain.items():
        if k == "prompt_out.weight":
            torch.testing.assert_close(small[k], 0.05 * v)
        elif k == "prompt_out.bias":
            assert not small[k].any()
        else:
            assert torch.equal(small[k], v), k
    assert _task(pp, nets, word_init_scale=0.05).config()["word_init_scale"] == 0.05


# ------------------------------------------------------------------------------------------------ the engine

def test_parts_resume_to_the_straight_run_and_the_file_reads_back(pp, pf, engine, nets, views, tmp_path, host):
    cfg = engine.PretrainConfig(steps=4, batch_size=4, lr=1e-4, weight_decay=1e-2, warmup=1, checkpoint_every=2,
                                log_every=1, seed=2)
    straight = engine.pretrain(_task(pp, nets), views, cfg, tmp_path / "straight", progress=False)
    engine.pretrain(_task(pp, nets), views, cfg, tmp_path / "parts", progress=False, stop_after=2)
    torch.manual_seed(1234)  # what ran before in the process does not matter
    resumed = engine.pretrain(_task(pp, nets), views, cfg, tmp_path / "parts", progress=False)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses[2:]
    for k, v in straight.module.state_dict().items():
        assert torch.equal(v, resumed.module.state_dict()[k]), k

    out = tmp_path / "promptnet.safetensors"
    resumed.module.save(out, metadata={"steps_done": "4"})
    pack_module(host, "core.artifacts").write_file_checksum(out)
    loaded = pack_module(host, "networks.promptnet").load_promptnet(out)
    assert loaded.config == resumed.module.config and loaded.family == "sd1"
    fp16 = resumed.module.copy().half().float()  # the file holds fp16 weights
    batch = views.batch(9, 0, 1, 2)
    ref = pf.encode_reference(batch.references[:1], loaded, nets.vae, nets.clip_vision)
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        got = pf.promptnet_words(loaded, ref, nets.model.model, x_t, t)
        want = pf.promptnet_words(fp16, ref, nets.model.model, x_t, t)
    assert got.shape == (2, 1, 128)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (out.with_name(out.name + ".sha256")).write_text("0" * 64 + "  promptnet.safetensors\n")
    with pytest.raises(Exception, match="does not match its checksum"):
        pack_module(host, "networks.promptnet").load_promptnet(out)


def test_a_folder_of_subjects_with_references_trains(pp, engine, nets, host, tmp_path, caplog):
    data = pack_module(host, "core.pretrain_data")
    source = data.FolderSource(_folder(tmp_path / "subjects"), size=64, seed=0)
    batch = source.batch(0, 0, 1, 4)
    assert batch.references is not None
    task = _task(pp, nets)
    prompts = task.prompts(batch)
    for caption, prompt in zip(batch.captions, prompts):
        assert prompt == (caption if "holder" in caption else "a photo of holder")
    cfg = engine.PretrainConfig(steps=2, batch_size=4, lr=1e-4, log_every=1, checkpoint_every=2)
    result = engine.pretrain(task, source, cfg, None, progress=False)
    assert len(result.losses) == 2 and all(0 < v < 10 for v in result.losses)
    assert "names no subject phrase" in caplog.text


def test_world_validation_compares_s_star_with_the_class_word_and_the_caption(pp, nets):
    validation = pp.WorldValidation(batches=1, batch_size=4)
    task = _task(pp, nets, validation=validation)
    net = task.build(torch.device("cpu"))
    with torch.no_grad():
        first = task.validate(net)
        again = task.validate(net)
    assert set(first) == {"val_loss_promptnet", "val_loss_class_word", "val_loss_caption"}
    assert first == again and all(0 < v < 10 for v in first.values())
    assert len({round(v, 6) for v in first.values()}) == 3


# ------------------------------------------------------------------------------------------------ the script

def _script(host, *args, timeout=600):
    env = dict(os.environ, COMFYUI_PATH=str(host.path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_promptnet.py"), "--threads", "1", *args],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.slow
def test_script_quick_stops_resumes_and_writes_the_file(host, tmp_path):
    promptnet = pack_module(host, "networks.promptnet")
    out, work = tmp_path / "pn.safetensors", tmp_path / "work"
    r = _script(host, "--quick", "--stop-after", "2", "--out", str(out), "--work-dir", str(work))
    assert "part done: step 2 of 4" in r.stderr and not out.exists()
    with pytest.raises(AssertionError, match="another configuration"):
        _script(host, "--quick", "--set", "prompt=official", "--out", str(out), "--work-dir", str(work))
    r = _script(host, "--quick", "--out", str(out), "--work-dir", str(work))
    assert "resuming at step 2 of 4" in r.stderr and out.is_file()
    net = promptnet.load_promptnet(out)
    meta = promptnet.PROMPTNET_FILE.load(out).metadata
    assert meta["steps_done"] == meta["steps_total"] == 4 and meta["recipe"]["batch_size"] == 4
    assert meta["task"]["prompt"] == "caption"
    assert net.latent_size == 8 and net.vision_width == 128


@pytest.mark.slow
def test_script_under_torchrun_two_gloo_ranks(host, tmp_path):
    """Two CPU ranks (gloo) through DDP: the run ends (the engine's replica check passed) and rank 0 writes the file.
    Its losses are not compared with one process: the step generator is per rank, so σ and ε differ by design
    (tests/test_pretrain.py compares the engine itself with one process)."""
    from helpers import free_port
    out = tmp_path / "pn.safetensors"
    env = dict(os.environ, COMFYUI_PATH=str(host.path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(REPO / "scripts" / "pretrain_promptnet.py"), "--quick",
                        "--threads", "1", "--out", str(out), "--work-dir", str(tmp_path / "work")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ckpt = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert pack_module(host, "networks.promptnet").load_promptnet(out).latent_size == 8

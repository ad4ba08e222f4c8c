"""PromptNet (networks/promptnet.py) and S* in the prompt (methods/profusion.py: PlaceholderPrompt,
PromptNetConditions): the network is the host UNet's own encoder half (its features equal the MODEL's UNet's on the
same input), S* depends on x_t and t, the file round-trips and is refused for another model, S* enters the prompt
with no position embedding (the official treatment), and γ scales the encoded S* row only."""
from __future__ import annotations

import pytest
import torch

from helpers import pack_module

PROMPT = "a photo of holder on the beach"


@pytest.fixture(scope="module")
def pn(host):
    return pack_module(host, "networks.promptnet")


@pytest.fixture(scope="module")
def pf(host):
    return pack_module(host, "methods.profusion")


@pytest.fixture(scope="module")
def err(host):
    return pack_module(host, "core.host").PersonalizeError


@pytest.fixture(scope="module")
def mini(host):
    """The shipped (trained) mini model: an untrained UNet's zero-initialised block outputs would hide t and the
    CLIP tokens from the encoder."""
    mf = pack_module(host, "core.mini_family")
    return mf.load_checkpoint(mf.shipped_checkpoint())


@pytest.fixture(scope="module")
def net(pn, mini):
    torch.manual_seed(0)
    return pn.PromptNet.from_model(mini[0], family="sd1", vision_width=128, seed=1)


def _inputs(batch=2, size=8, width=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, size, size, generator=g), torch.randn(1, 65, width, generator=g),
            torch.randn(batch, 4, size, size, generator=g))


def test_encoder_is_the_models_encoder_half(net, mini):
    """Initialised from the MODEL (ControlNet-style): every encoder tensor equals the UNet's, and with the noisy-latent
    embedding switched off the middle block's output equals the one the MODEL's own UNet computes on the same input
    (captured with a forward hook on the host's full forward)."""
    unet = mini[0].model.diffusion_model
    source = unet.state_dict()
    for key, value in net.encoder.state_dict().items():
        assert torch.equal(value, source[key]), key
    assert not any(k.startswith(("output_blocks", "out.")) for k in net.state_dict())
    ref, tokens, _ = _inputs(batch=1)
    t = torch.tensor([321.0])
    captured = {}
    hook = unet.middle_block[-1].register_forward_hook(lambda m, a, out: captured.setdefault("mid", out))
    seen = {}
    mid_hook = net.encoder.middle_block[-1].register_forward_hook(lambda m, a, out: seen.setdefault("mid", out))
    try:
        with torch.no_grad():
            context = net.vision_proj(tokens)
            unet(ref, t, context)
            saved = [p.detach().clone() for p in net.cond_embedding.parameters()]
            for p in net.cond_embedding.parameters():
                p.zero_()
            net(ref, t, tokens, torch.randn(1, 4, 8, 8))
            for p, s in zip(net.cond_embedding.parameters(), saved):
                p.copy_(s)
    finally:
        hook.remove()
        mid_hook.remove()
    assert torch.allclose(seen["mid"], captured["mid"], atol=1e-5)


def test_one_word_of_the_text_width_that_depends_on_x_t_and_t(net):
    ref, tokens, x = _inputs()
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        s = net(ref, t, tokens, x)
        assert s.shape == (2, 1, 128)
        def moved(other):
            return float((other - s).abs().max()) > 1e-3 * float(s.abs().max())
        assert moved(s.flip(0))                                            # rows differ with their x_t
        assert moved(net(ref, torch.tensor([20.0, 20.0]), tokens, x))      # with t
        assert moved(net(ref, t, tokens, x + 0.5))
        assert moved(net(ref * 0, t, tokens, x))                           # with the reference
        assert moved(net(ref, t, tokens * 0, x))                           # and with the CLIP tokens
        assert torch.equal(net(ref, t, tokens, x), s)                      # deterministic


def test_file_round_trip_and_refusals(net, pn, mini, err, tmp_path, ckpt_sd15, host):
    path = net.save(tmp_path / "pn.safetensors", dtype=None)
    loaded = pn.load_promptnet(path)
    ref, tokens, x = _inputs()
    t = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        assert torch.equal(loaded(ref, t, tokens, x), net(ref, t, tokens, x))
    assert loaded.config == net.config and loaded.family == "sd1"
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.check_model(mini[0])
    with pytest.raises(err, match="CLIP vision width 128"):
        loaded.check_vision(1280)
    with pytest.raises(err, match="text width 128"):
        loaded.check_text(768)
    import comfy.sd
    sd15 = comfy.sd.load_checkpoint_guess_config(str(host.model_folder("checkpoints") / ckpt_sd15),
                                                 output_vae=False, output_clip=False)[0]
    with pytest.raises(err, match="does not fit this MODEL"):
        loaded.check_model(sd15)
    other = pack_module(host, "core.artifacts").kind  # a foreign file: the CLIP vision kind
    mc = pack_module(host, "networks.mini_clip")
    foreign = mc.CLIP_VISION_FILE.save({"w": torch.zeros(1)}, tmp_path / "cv.safetensors", family=None)
    assert other is not None
    with pytest.raises(err, match="is not a PromptNet file"):
        pn.load_promptnet(foreign)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(err):
        pn.load_promptnet(damaged)


def test_sd2_v_prediction_model(pn, host, ckpt_sd2):
    """The official base (SD2, v-prediction, 4 levels): the official head (downsize 8, region kernel 8) gives one
    1024-d word for 64×64 latents; the MODEL's SDXL-style relatives are refused (tested in the method tests)."""
    import comfy.sd
    model = comfy.sd.load_checkpoint_guess_config(str(host.model_folder("checkpoints") / ckpt_sd2),
                                                  output_vae=False, output_clip=False)[0]
    net = pn.PromptNet.from_model(model, family="sd2", vision_width=32, seed=0)
    assert net.latent_size == 64 and net.text_width == 1024
    assert [m.kernel_size[0] for m in net.prompt_projections] == [8, 4, 2, 1, 1, 1]  # official downsize halving
    with torch.no_grad():
        s = net(torch.randn(1, 4, 64, 64), torch.tensor([999.0]), torch.randn(1, 5, 32), torch.randn(1, 4, 64, 64))
    assert s.shape == (1, 1, 1024) and torch.isfinite(s).all()


def test_placeholder_gets_no_position_embedding(pf, mini):
    """Putting E[holder] + P[pos] at the placeholder gives exactly the plain prompt's encoding: the vector there is
    the whole input (token and position), as the official pipeline replaces it."""
    clip = mini[1]
    prompt = pf.PlaceholderPrompt(clip, PROMPT)
    emb = clip.cond_stage_model.clip_l.transformer.text_model.embeddings
    token = prompt.tokens["l"][0][prompt.position][0]
    whole = (emb.token_embedding.weight[token] + emb.position_embedding.weight[prompt.position]).detach()
    plain = clip.encode_from_tokens(prompt.tokens)
    assert torch.allclose(prompt.encode(whole[None]), plain, atol=1e-6)
    # with the token vector alone (a word that would get a position embedding) it is not the plain encoding
    assert not torch.allclose(prompt.encode(emb.token_embedding.weight[token][None].detach()), plain, atol=1e-4)


def test_batch_of_words_encodes_each_row(pf, mini):
    prompt = pf.PlaceholderPrompt(mini[1], PROMPT)
    words = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    both = prompt.encode(words)
    assert both.shape == (3, 77, 128)
    for b in range(3):
        assert torch.allclose(both[b:b + 1], prompt.encode(words[b:b + 1]), atol=1e-5)
    assert not torch.allclose(both[0], both[1])
    before = both[:, :prompt.position]  # causal text encoder: rows before the word do not see it
    assert torch.allclose(before[0], before[1], atol=1e-6)


def test_prompt_refusals(pf, mini, err):
    with pytest.raises(err, match="does not contain the placeholder"):
        pf.PlaceholderPrompt(mini[1], "a photo of a star")
    with pytest.raises(err, match="occurs 2 times"):
        pf.PlaceholderPrompt(mini[1], "holder and holder")
    with pytest.raises(err, match="one token"):
        pf.PlaceholderPrompt(mini[1], PROMPT, placeholder="two words")


def test_gamma_scales_the_encoded_row_not_the_input(pf, net, mini, host):
    """Fusion stage: Enc_γ(P_S) is Enc(P_S) with the S* row (the encoder OUTPUT) times γ and every other row as it
    is (§5.4, §5.10.1); refinement: Enc(P_S) unscaled. Both use S* of the x_t they are given."""
    model, clip, vae = mini
    mc = pack_module(host, "networks.mini_clip")
    tower = mc.load_clip_vision(mc.PACK_MODELS / "clip_vision" / mc.SHIPPED_NAME)
    ref = pf.encode_reference(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)), net, vae, tower)
    cond = pf.PromptNetConditions(net, [ref], clip, PROMPT, "star", None, model.model)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = cond.refinement_contexts(x, 2.0, 400.0)[0]
    scaled = cond.fusion_contexts(x, 2.0, 400.0, 0.6)[0]
    row = cond.template.rows[0]
    others = [i for i in range(plain.shape[1]) if i != row]
    assert torch.equal(scaled[:, others], plain[:, others])
    assert torch.allclose(scaled[:, row], 0.6 * plain[:, row])
    words = pf.promptnet_words(net, ref, model.model, x, torch.full((2,), 400.0))
    assert torch.allclose(plain, cond.template.encode(words), atol=1e-6)
    assert not torch.allclose(cond.refinement_contexts(x + 1, 2.0, 400.0)[0], plain)

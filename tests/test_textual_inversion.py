"""Train Subject Embedding (Textual Inversion) on the generated SD1.5 fixture."""
import torch

from helpers import call_node, encode, eps_loss_reference, pack_module, train_embedding

def _train(model, clip, vae, images, name, **kw):
    return train_embedding((model, clip, vae), images, name, **{"steps": 3, **kw})


def _embedding_file(host, name):
    return host.folder_paths.get_full_path("embeddings", name + ".safetensors")


def test_saved_file_loads_with_stock_encoder_and_matches_in_graph(host, sd15, subject, unique_name):
    model, clip, vae = sd15
    images, masks = subject
    name = unique_name("ti")
    out_clip, prompt_ref, loss, previews = _train(model, clip, vae, images, name, mask=masks, preview_every=2,
                                                  steps=4, learning_rate=5e-2)
    assert prompt_ref == f"embedding:{name}"
    assert _embedding_file(host, name), "embedding file not written to models/embeddings"
    in_graph = encode(out_clip, "a photo of sks on the beach")
    stock = encode(clip, f"a photo of {prompt_ref} on the beach")
    torch.testing.assert_close(in_graph, stock, rtol=1e-5, atol=1e-5)
    base = encode(clip, "a photo of sks on the beach")
    assert (in_graph - base).abs().max() > 1e-3, "the learned embedding changed nothing"
    # loss report and previews every 2 steps (steps 2 and 4)
    assert len(loss["loss"]) == 4 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert previews.shape == (2, 64, 64, 3) and torch.isfinite(previews).all()


def test_loss_goes_down(host, sd15, subject, unique_name):
    """The trained embedding lowers the ε-loss on the subject photos, measured by an independent
    implementation at fixed timesteps and noise (not the node's own noisy per-step losses)."""
    model, clip, vae = sd15
    images, masks = subject
    latents = call_node("VAEEncode", pixels=images, vae=vae)[0]["samples"]
    ts = [100, 300, 500, 700, 900]
    before = eps_loss_reference(model, latents, encode(clip, "a photo of a sks"), timesteps=ts)
    out_clip = _train(model, clip, vae, images, unique_name("ti"), steps=25, learning_rate=5e-2)[0]
    after = eps_loss_reference(model, latents, encode(out_clip, "a photo of a sks"), timesteps=ts)
    assert after < before * 0.995, (before, after)


def test_same_seed_same_embedding(host, sd15, subject, unique_name):
    model, clip, vae = sd15
    images, _ = subject
    a = _train(model, clip, vae, images, unique_name("ti"), steps=2)[0]
    b = _train(model, clip, vae, images, unique_name("ti"), steps=2)[0]
    c = _train(model, clip, vae, images, unique_name("ti"), steps=2, seed=1)[0]
    ea, eb, ec = (encode(x, "a sks") for x in (a, b, c))
    assert torch.equal(ea, eb)
    assert not torch.equal(ea, ec)


def test_objective_gives_zero_gradient_outside_mask(host, sd15, subject):
    """The masked loss takes no gradient from latent cells outside the mask (HiFi Tuner Eq. 5)."""
    model, clip, vae = sd15
    images, masks = subject
    diffusion = pack_module(host, "core.diffusion")
    inputs = pack_module(host, "core.inputs")
    tuning = pack_module(host, "core.tuning")
    latents = call_node("VAEEncode", pixels=images, vae=vae)[0]["samples"]
    lmask = inputs.to_latent_masks(masks, tuple(latents.shape[-2:]))
    cond = encode(clip, "a photo of a dog")
    with tuning.TrainingSession(model) as s:
        s.load()
        obj = diffusion.DiffusionObjective(s.model, latents, lmask, tuning.seeded_generator(0))
        captured = {}
        real_predict = obj.predict

        def predict(x, sigma, c, pooled=None):
            d = real_predict(x, sigma, c, pooled).detach().requires_grad_(True)
            captured["d"] = d
            return d

        obj.predict = predict
        idx, sigma, noise = obj.sample(3)
        loss, _ = obj.loss(cond.clone(), idx, sigma, noise)
        loss.backward()
        grad = captured["d"].grad
        m = lmask[idx].expand_as(grad)
        assert grad[m == 0].abs().max() == 0
        assert grad[m > 0].abs().max() > 0




def test_runs_outside_inference_mode_too(host, sd15, subject, unique_name):
    """Scripts may call the node's function directly, with autograd on (not the executor's inference mode): it
    trains the same and returns the same embedding as under inference mode."""
    import nodes
    model, clip, vae = sd15
    images, _ = subject
    cls = nodes.NODE_CLASS_MAPPINGS["PersonalizeTrainSubjectEmbedding"]
    args = dict(model=model, clip=clip, vae=vae, images=images, placeholder="sks", init_word="dog", steps=2,
                learning_rate=5e-3, batch_size=1, seed=0, overwrite=False)
    plain = getattr(cls(), cls.FUNCTION)(**args, embedding_name=unique_name("ti"))[0]
    executor = _train(model, clip, vae, images, unique_name("ti"), steps=2)[0]
    assert torch.equal(encode(plain, "a sks"), encode(executor, "a sks"))

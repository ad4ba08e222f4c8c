"""The mini-world benchmark (miniworld/benchmark.py, `make eval`) and the shipped, trained mini family.

The short evaluation here is the one the issue asks CI to run (`scripts/eval_methods.py --quick`): the tuning half's
first two held-out subjects, one reference-view draw, one seed per prompt, the registry's gated rows (Textual
Inversion, DreamBooth-LoRA, HiFi Tuner) through the pack's nodes on the trained model; it fails when a method does not
beat the base model's subject fidelity with the class word alone. Its one-image version (one subject, short tuning)
checks that under the one-image protocol each method's nodes see view 0 alone while every row is scored against all
reference views, and the one-image table's columns.
"""
import logging
import shutil

import pytest
import torch

from helpers import pack_module

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def bench(host):
    return pack_module(host, "miniworld.benchmark")


@pytest.fixture(scope="module")
def shipped(host):
    mf = pack_module(host, "core.mini_family")
    path = mf.shipped_checkpoint()
    return path, mf.load_checkpoint(path, embedding_directory=str(host.model_folder("embeddings")))


@pytest.fixture(scope="module")
def evaluator(host):
    return pack_module(host, "miniworld.evaluators").load_evaluator()


def test_shipped_family_is_small_and_checksummed(host, shipped, tmp_path):
    mf = pack_module(host, "core.mini_family")
    path, _ = shipped
    assert path.stat().st_size <= 40e6
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    shutil.copy(path.with_name(path.name + ".sha256"), tmp_path / (path.name + ".sha256"))
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    err = pack_module(host, "core.host").PersonalizeError
    with pytest.raises(err, match="does not match its checksum") as e:
        mf.load_checkpoint(copy)
    assert "git checkout -- models/" in str(e.value) and "make mini-world" in str(e.value)
    with pytest.raises(err, match="does not exist"):
        mf.load_checkpoint(tmp_path / "missing.safetensors")


def test_subjects_come_from_the_halves(bench):
    w = bench.world
    heldouts = bench.pick_subjects(12)
    assert [k.subject for k in heldouts] == [w.heldout_subjects()[i] for i in w.REPORTING_HALF]
    assert [k.subject.name for k in bench.pick_subjects(2, "tuning")] == ["red circle", "yellow heart"]
    draws = bench.pick_draws(bench.BenchConfig(subjects=3, draws=2))
    assert [k.subject for k in draws[0]] == [k.subject for k in draws[1]] == [k.subject for k in heldouts[:3]]
    assert not torch.equal(draws[0][0].references[0].image, draws[1][0].references[0].image)  # new views
    # the one-image protocol: the same draws of 4 views (a method sees view 0; every row is scored against all 4)
    cfg = bench.BenchConfig(subjects=2, draws=2)
    one = bench.one_image(cfg)
    assert (cfg.seen, cfg.protocol, one.seen, one.protocol, one.views) == (4, "multi", 1, "one", 4)
    for a, b in zip(bench.pick_draws(cfg), bench.pick_draws(one)):
        for x, y in zip(a, b):
            assert x.subject == y.subject and len(y.references) == 4
            assert all(torch.equal(r.image, q.image) for r, q in zip(x.references, y.references))
    for bad in (0, 5):
        with pytest.raises(ValueError, match="seen_views must be in"):
            bench.BenchConfig(seen_views=bad)


def test_real_images_bound_scores_the_subject_not_the_scene(host, bench, shipped, evaluator):
    """The "real images" row: renders of the subject in the prompts' scenes score high against its references, and
    the same scenes with another held-out subject score far lower (so the column measures the subject)."""
    import nodes
    _, (model, clip, vae) = shipped
    runner = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, evaluator, bench.BenchConfig(seeds=2))
    heldouts = bench.pick_subjects(2, "tuning")
    own = runner.score("real", [[runner.real_images(k) for k in heldouts]], [heldouts], [], [])
    swapped = runner.score("real", [[runner.real_images(k) for k in reversed(heldouts)]], [heldouts], [], [])
    assert own.images == 2 * 6 * 2 and own.tune_seconds is None and own.bytes_per_subject == 0
    assert own.subject_fidelity > 0.8 and own.attributes > 0.9 and own.prompt_fidelity > 0.9, own
    assert swapped.subject_fidelity < own.subject_fidelity - 0.3 and swapped.attributes == 0.0, swapped
    assert swapped.prompt_fidelity == pytest.approx(own.prompt_fidelity, abs=0.05)  # same scenes either way
    assert own.subject_fidelity == pytest.approx(sum(own.per_subject["subject_fidelity"]) / 2, abs=1e-6)


def test_restart_from_noised_renders_ends_at_the_vae_reconstruction(host, bench, shipped):
    """``restart_captions`` (eval_mini_world --restart-at): from the last step of the schedule the sample is the
    render's own VAE reconstruction up to the smallest sigma's noise; from step 0 it is a fresh sample, far from
    it. Both go through stock KSamplerAdvanced with the render's latent."""
    import nodes
    _, (model, clip, vae) = shipped
    w, tf = bench.world, pack_module(host, "miniworld.train_family")
    pairs = bench.heldout_prompts(2, 0)
    real = w.render_batch([s for s, _ in pairs], [sc for _, sc in pairs], [0, 1]).images
    means = tf.encode_means(vae, real)
    with torch.inference_mode():
        ae = tf.fp32_autoencoder(vae)
        z = means.to(next(ae.parameters()).device)
        recon = ((ae.decoder(ae.post_quant_conv(z)) + 1) / 2).clamp(0, 1).movedim(1, -1).float().cpu()
    captions = [w.caption(s, sc) for s, sc in pairs]
    late = bench.restart_captions(nodes.NODE_CLASS_MAPPINGS, model, clip, means, vae, captions, 19, steps=20)
    fresh = bench.restart_captions(nodes.NODE_CLASS_MAPPINGS, model, clip, means, vae, captions, 0, steps=20)
    assert late.shape == fresh.shape == recon.shape
    err_late, err_fresh = float((late - recon).abs().mean()), float((fresh - recon).abs().mean())
    assert err_late < 0.05 and err_fresh > 3 * err_late, (err_late, err_fresh)


def test_quick_evaluation_personalisation_beats_the_base_model(host, bench, shipped, evaluator):
    """CI's short `make eval`: every gated method's subject fidelity (DINO analog) is above the base model's with
    the class word only, on the trained mini family, through the nodes."""
    import nodes
    report = pack_module(host, "miniworld.report")
    _, (model, clip, vae) = shipped
    cfg = bench.quick_config()
    assert cfg.half == "tuning" and set(cfg.methods) == {"ti", "lora", "hifi"}
    runner = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, evaluator, cfg, run_name="ci_quick")
    rows = runner.run(methods=("base-class", *cfg.methods))
    names = [k.subject.name for k in bench.pick_subjects(cfg.subjects, cfg.half)]
    log.info("\n%s\n\n%s", report.format_table(rows, cfg, names), report.format_paired(rows))
    base = rows[0]
    assert base.method == "base-class" and base.tune_seconds is None and base.bytes_per_subject == 0
    assert report.below_floor(rows) == []
    for row in rows[1:]:
        assert row.subject_fidelity > base.subject_fidelity, (row, base)
        assert row.bytes_per_subject > 0 and row.tune_seconds > 0
        assert torch.isfinite(torch.tensor(row.per_subject["subject_fidelity"])).all()


def test_one_image_methods_run_in_the_one_image_table_only(host, bench):
    """ProFusion reads one image: its rows are in the one-image protocol's default rows, not the multi-image one's
    (nor in an explicit list run under the multi-image protocol); every other row is in both."""
    registry = pack_module(host, "miniworld.registry")
    benchmark = bench
    multi = benchmark.BenchConfig()
    one = benchmark.one_image(multi)
    pf = ("profusion-m0", "profusion", "profusion-tune")
    assert multi.method_keys() == ("ti", "lora", "hifi")
    assert one.method_keys() == ("ti", "lora", "hifi", *pf)
    assert benchmark.BenchConfig(methods=("ti", "profusion")).method_keys() == ("ti",)
    assert benchmark.one_image(benchmark.BenchConfig(methods=("profusion", "ti"))).method_keys() == ("profusion", "ti")
    assert benchmark.BenchConfig(views=4, seen_views=2).protocol == "2 of 4"
    assert not registry.runs_under("profusion", "2 of 4") and registry.runs_under("hifi", "2 of 4")
    assert all(registry.get(k).protocols == ("one",) for k in pf)


def test_a_rows_sampler_runs_in_samplercustom_and_stock_ddim_there_is_ksampler(host, bench, shipped, evaluator):
    """``Personalised.sampler`` (ProFusion's Fusion Sampler per caption): each caption is sampled by stock
    SamplerCustom with the row's SAMPLER on the benchmark's SIGMAS, seeds, cfg and prompts. With the stock ddim
    SAMPLER that is exactly what KSampler (ddim, ddim_uniform) gives the other rows, image for image; the hook is
    asked once per caption, in order, and its SAMPLER is the one used (dpmpp_2m gives other images)."""
    import nodes
    registry = pack_module(host, "miniworld.registry")
    _, (model, clip, vae) = shipped
    runner = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, evaluator,
                             bench.BenchConfig(seeds=2, sampler_steps=10))
    runner.draw = 1
    prompts = list(bench.pick_subjects(1, "tuning")[0].prompts[:2])
    asked = []

    def stock(name):
        def sampler(caption):
            asked.append(caption)
            return runner.call("KSamplerSelect", sampler_name=name)[0]
        return sampler

    plain = runner.generate(registry.Personalised(model, clip, prompts))
    hooked = runner.generate(registry.Personalised(model, clip, prompts, sampler=stock("ddim")))
    assert asked == prompts and plain.shape == hooked.shape == (4, 64, 64, 3)
    assert torch.equal(plain, hooked)
    other = runner.generate(registry.Personalised(model, clip, prompts, sampler=stock("dpmpp_2m")))
    assert float((other - plain).abs().mean()) > 1e-3


class Recording:
    """The evaluator, recording the references every similarity score is computed against."""

    def __init__(self, evaluator):
        self.evaluator, self.refs = evaluator, []

    def subject_fidelity(self, images, refs):
        self.refs.append(refs)
        return self.evaluator.subject_fidelity(images, refs)

    def image_similarity(self, images, refs):
        self.refs.append(refs)
        return self.evaluator.image_similarity(images, refs)

    def __getattr__(self, name):
        return getattr(self.evaluator, name)


@pytest.mark.parametrize("tuned", [True, False])
def test_one_image_protocol_sees_one_view_and_is_scored_against_all(host, bench, shipped, evaluator, monkeypatch,
                                                                    tuned):
    """A fake row (a tuning row, then a tuning-free one) records the references it is handed and returns renders of
    the subject: under the one-image protocol it gets view 0 of each draw alone, and its scores are the evaluator's
    against all four views (computed here directly), not against the view it saw."""
    import nodes
    registry = pack_module(host, "miniworld.registry")
    seen = []

    def personalise(runner, heldout, index):
        seen.append((heldout, *runner.references(heldout)))
        return registry.Personalised(images=runner.real_images(heldout), seconds=1.5 + index, nbytes=7)

    monkeypatch.setitem(registry._ROWS, "fake", registry.MethodRow("fake", "fake row", personalise, tuned=tuned,
                                                                    default=False))
    _, (model, clip, vae) = shipped
    cfg = bench.one_image(bench.BenchConfig(half="tuning", subjects=2, draws=1, seeds=1))
    runner = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, evaluator, cfg)
    draws = bench.pick_draws(cfg)
    (row,) = runner.run(methods=("fake",), draws=draws)
    assert [h for h, _, _ in seen] == draws[0]
    for heldout, images, masks in seen:
        assert images.shape[0] == masks.shape[0] == 1 and len(heldout.references) == 4
        assert torch.equal(images[0], heldout.references[0].image) and torch.equal(masks[0], heldout.references[0].mask)
    apart = 0.0
    for i, heldout in enumerate(draws[0]):
        generated = runner.real_images(heldout)
        all_refs = torch.stack([r.image for r in heldout.references])
        for metric in ("subject_fidelity", "image_similarity"):
            score = getattr(evaluator, metric)
            want = float(score(generated, all_refs).float().mean())
            assert row.per_subject[metric][i] == pytest.approx(want, abs=1e-6), metric
            apart = max(apart, abs(want - float(score(generated, all_refs[:1]).float().mean())))
    assert apart > 1e-3  # scoring against the seen view alone would give other numbers
    assert row.tune_seconds == pytest.approx(2.0) and row.bytes_per_subject == 7 and row.tuned is tuned
    # the multi-image protocol hands the same row all four views
    seen.clear()
    multi = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, evaluator, bench.replace(cfg, seen_views=None))
    multi.run(methods=("fake",), draws=draws)
    assert [images.shape[0] for _, images, _ in seen] == [4, 4]


TRAINING_NODES = ("PersonalizeTrainSubjectEmbedding", "PersonalizeTrainSubjectLoRA", "PersonalizeHiFiSubjectTune")


def test_quick_one_image_evaluation(host, bench, shipped, evaluator):
    """CI's one-image `make eval` (one subject, short tuning): Textual Inversion, DreamBooth-LoRA and HiFi Tuner's
    training nodes get view 0 of the draw alone; every similarity score of every row is against all four views; the
    table has its columns, each method its seconds to personalise (> 0) and "yes" for tuned at test time, the bounds
    "-"."""
    import nodes
    report = pack_module(host, "miniworld.report")
    _, (model, clip, vae) = shipped
    cfg = bench.quick_one_image_config()
    assert (cfg.subjects, cfg.draws, cfg.seeds, cfg.views, cfg.seen, cfg.half) == (1, 1, 1, 4, 1, "tuning")
    recording = Recording(evaluator)
    runner = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, recording, cfg, run_name="ci_one")
    given = []

    def call(class_type, **inputs):
        if class_type in TRAINING_NODES:
            given.append((class_type, inputs["images"], inputs["mask"]))
        return bench.call(runner.nodes, class_type, **inputs)

    runner.call = call
    draws = bench.pick_draws(cfg)
    (heldout,) = draws[0]
    rows = runner.run(draws=draws)
    assert [r.method for r in rows] == ["real", "base-class", "base-full", "ti", "lora", "hifi"]
    assert [c for c, _, _ in given] == list(TRAINING_NODES)
    view0 = heldout.references[0]
    for _, images, mask in given:
        assert images.shape[0] == mask.shape[0] == 1
        assert torch.equal(images[0], view0.image) and torch.equal(mask[0], view0.mask)
    all_refs = torch.stack([r.image for r in heldout.references])
    assert len(recording.refs) == 2 * len(rows) and all(torch.equal(r, all_refs) for r in recording.refs)

    table = report.format_one_image_table(rows, cfg, [heldout.subject.name])
    log.info("\n%s", table)
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(report.ONE_IMAGE_COLUMNS) + " |"
    cells = [[c.strip() for c in line[2:-2].split(" | ")] for line in lines[2:2 + len(rows)]]
    assert all(len(c) == 7 for c in cells)
    assert [c[5:] for c in cells[:3]] == [["-", "-"]] * 3
    for row, c in zip(rows[3:], cells[3:]):
        assert row.tuned is True and row.tune_seconds > 0 and row.bytes_per_subject > 0 and c[6] == "yes"
        assert float(c[5]) == pytest.approx(row.tune_seconds, abs=0.05)
    for row in rows:
        assert all(torch.isfinite(torch.tensor(v)).all() for v in row.per_subject.values())
    assert rows[0].subject_fidelity > 0.8 > rows[1].subject_fidelity  # the ceiling is the ceiling


PROFUSION_NODES = ("PersonalizeProFusionTune", "PersonalizePromptNetEncode")


def test_quick_one_image_profusion_rows(host, bench, shipped, evaluator, monkeypatch):
    """ProFusion's rows on the one-image protocol (one subject, 4 tuning steps, 5 sampling steps): ProFusion Tune and
    PromptNet Encode get view 0 alone, each caption is sampled through the Fusion Sampler node (the placeholder in
    the caption, the class word with its article, the row's m) in SamplerCustom, and the table says "no" for the
    encoder rows' tuning and "yes" for the tuned row, with their seconds and bytes; the tuned row's bytes hold the
    tuned PromptNet and q/k/v deltas, the encoder rows' only the reference."""
    import nodes
    report = pack_module(host, "miniworld.report")
    rows_pf = pack_module(host, "miniworld.rows.profusion")
    monkeypatch.setattr(rows_pf, "TUNE_STEPS", 4)
    _, (model, clip, vae) = shipped
    cfg = bench.replace(bench.quick_one_image_config(), sampler_steps=5)
    runner = bench.Benchmark(nodes.NODE_CLASS_MAPPINGS, model, clip, vae, evaluator, cfg, run_name="ci_pf")
    given, fusion = [], []

    def call(class_type, **inputs):
        if class_type in PROFUSION_NODES:
            given.append((class_type, inputs["image"]))
        if class_type == "PersonalizeFusionSampler":
            fusion.append((inputs["prompt"], inputs["class_word"], inputs["m"]))
        return bench.call(runner.nodes, class_type, **inputs)

    runner.call = call
    draws = bench.pick_draws(cfg)
    (heldout,) = draws[0]
    keys = ("profusion-m0", "profusion", "profusion-tune")
    assert bench.one_image(bench.BenchConfig()).method_keys()[-3:] == keys  # in `make eval`'s one-image table
    rows = runner.run(methods=keys, draws=draws)
    assert [c for c, _ in given] == ["PersonalizePromptNetEncode"] * 2 + list(PROFUSION_NODES)
    assert all(torch.equal(image, heldout.references[0].image[None]) for _, image in given)
    word = f"{bench.world.article(heldout.class_word)} {heldout.class_word}"
    scenes = len(heldout.scenes)
    assert len(fusion) == 3 * scenes
    assert [m for _, _, m in fusion] == [0] * scenes + [1] * 2 * scenes
    assert all(w == word and p.startswith("a photo of holder ") for p, w, _ in fusion)
    table = report.format_one_image_table(rows, cfg, [heldout.subject.name])
    log.info("\n%s", table)
    cells = [[c.strip() for c in line[2:-2].split(" | ")] for line in table.splitlines()[2:5]]
    assert [c[6] for c in cells] == ["no", "no", "yes"]
    assert [r.tuned for r in rows] == [False, False, True] and all(r.tune_seconds > 0 for r in rows)
    assert rows[0].bytes_per_subject == rows[1].bytes_per_subject < 100_000 < 10 ** 6 < rows[2].bytes_per_subject
    for row in rows:
        assert all(torch.isfinite(torch.tensor(v)).all() for v in row.per_subject.values())

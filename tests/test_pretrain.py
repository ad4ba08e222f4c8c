"""The pre-training engine (core/pretrain.py) and its data sources (core/pretrain_data.py, miniworld/sources.py), held
to the engine's promises (issue #19 §2):

* a run resumed from its checkpoint ends bit-for-bit where the uninterrupted run ends, after a clean stop
  (``stop_after``) and after a SIGKILL in the middle of writing a checkpoint (the previous checkpoint stays whole);
  a fresh run does not depend on what ran before it in the process (same seed, same result);
* a checkpoint of another task, task config or engine setting, or a file that is no checkpoint, is refused with a
  message naming the fix; a longer ``steps`` is not refused (a run may be extended);
* 2 CPU processes with gloo keep identical replicas, resume exactly as they run straight, reproduce a single
  process at the same global batch (to float tolerance), and stop together on a non-finite loss of one rank;
* ``log.jsonl``, ``loss.png``, the progress bar, validation; a NaN loss stops with the fix named;
* the folder source reads images, masks and boxes at the requested size, pairs each image with another of its subject,
  is a pure function of (seed, step, rank), covers each line once per epoch, and refuses a bad folder before training;
  the world source gives the same global batches whatever the rank count, and never a held-out subject;
* ``scripts/pretrain_clip_vision.py --quick`` runs, resumes and reads a user folder (``slow``: three ComfyUI boots).

The network under test is a tiny conv net defined here (:class:`TinyTask`) whose loss draws input noise from the
engine's per-step generator and dropout masks from torch's global RNG, so a resume that restored either wrongly
would diverge (and a test checks that another seed does change the result).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import free_port, pack_module

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ the tiny task

class TinyTask:
    """A conv net on 16×16 (pooled) images regressing two numbers read off the caption (its length and word count).
    ``noise``: Gaussian input noise from the step generator; ``dropout``: torch's global RNG. ``nan_at``: the loss of
    that call (1-based; on rank ``nan_rank`` only, or every rank when None) is NaN."""
    name = "tiny_test_task"

    def __init__(self, width: int = 8, noise: float = 0.1, dropout: float = 0.2, nan_at: int | None = None,
                 nan_rank: int | None = None):
        self.width, self.noise, self.dropout = width, noise, dropout
        self.nan_at, self.nan_rank, self.calls = nan_at, nan_rank, 0

    def config(self) -> dict:
        return {"width": self.width, "noise": self.noise, "dropout": self.dropout}

    def build(self, device) -> torch.nn.Module:
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, self.width, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(self.dropout),
            torch.nn.Conv2d(self.width, self.width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(self.width, 2))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return net.to(device)

    @staticmethod
    def target(captions) -> torch.Tensor:
        return torch.tensor([[len(c) / 64.0, c.count(" ") / 16.0] for c in captions])

    def loss(self, module, batch, generator):
        self.calls += 1
        x = batch.images.permute(0, 3, 1, 2)
        if x.shape[-1] > 16:
            x = F.adaptive_avg_pool2d(x, 16)
        x = x + self.noise * torch.randn(x.shape, generator=generator)
        loss = F.mse_loss(module(x), self.target(batch.captions))
        if self.calls == self.nan_at and self.nan_rank in (None, _rank()):
            loss = loss * float("nan")
        return loss, {"target_mean": float(self.target(batch.captions).mean())}

    def validate(self, module) -> dict:
        x = torch.linspace(0, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16)
        return {"output_mean": float(module(x).mean())}


class OtherTask(TinyTask):
    name = "another_network"


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _config(engine, **kw):
    base = dict(steps=6, batch_size=4, lr=1e-2, warmup=2, checkpoint_every=2, log_every=1, seed=3)
    return engine.PretrainConfig(**{**base, **kw})


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def _engine_without_boot(host_path):
    """The engine and the world source in a worker process (spawned for DDP, or the subprocess the kill test kills)
    without booting ComfyUI: core/host.py imports ``comfy.model_management``, which only needs the host on
    ``sys.path`` and ``--cpu`` on a machine without a GPU (as harness.host.boot sets it)."""
    if str(host_path) not in sys.path:
        sys.path.insert(0, str(host_path))
    if str(REPO / ".pythonpath") not in sys.path:
        sys.path.insert(0, str(REPO / ".pythonpath"))
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    from harness import pack_package
    pack_package()
    return (importlib.import_module("comfyui_personalize.core.pretrain"),
            importlib.import_module("comfyui_personalize.miniworld.sources"))


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def engine(host):
    return pack_module(host, "core.pretrain")


@pytest.fixture(scope="module")
def data(host):
    return pack_module(host, "core.pretrain_data")


@pytest.fixture(scope="module")
def error(host):
    return pack_module(host, "core.host").PersonalizeError


@pytest.fixture(scope="module")
def world_source(host):
    return pack_module(host, "miniworld.sources").WorldSource("single", seed=0)


# ------------------------------------------------------------------------------------------------ resume

def test_resume_equals_a_straight_run(engine, world_source, tmp_path):
    """Straight 6 steps vs parts of 2 + 2 + 2 (``stop_after``), with the process's global RNG scrambled between the
    parts: same final weights, optimiser state and checkpoint bit for bit, same losses and log lines."""
    cfg = _config(engine)
    torch.manual_seed(11)
    straight = engine.pretrain(TinyTask(), world_source, cfg, tmp_path / "a", progress=False)
    assert straight.steps == 6 and straight.resumed_from == 0 and len(straight.losses) == 6
    losses = []
    for part, seed in zip(range(3), (12, 13, 14)):
        torch.manual_seed(seed)  # what ran in the process before must not matter
        r = engine.pretrain(TinyTask(), world_source, cfg, tmp_path / "b", progress=False, stop_after=2)
        assert (r.resumed_from, r.steps) == (2 * part, 2 * part + 2)
        assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2 * part + 2
        losses += r.losses
    _assert_state_equal(_params(straight.module), _params(r.module))
    assert losses == straight.losses
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("a", "b"))
    _assert_state_equal(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_state_equal(sa, sb)
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"] == 6
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert _log(tmp_path / "a") == _log(tmp_path / "b")
    assert [row["step"] for row in _log(tmp_path / "a") if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert r.validation == straight.validation and "output_mean" in r.validation
    assert not [p.name for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]

    # The equality above means something: another seed (generator noise and dropout) ends elsewhere.
    other = engine.pretrain(TinyTask(), world_source, _config(engine, seed=4), None, progress=False)
    assert not torch.equal(other.module[0].weight, straight.module[0].weight)


def test_same_seed_same_result_whatever_ran_before(engine, world_source):
    """A fresh run seeds torch's global RNG (dropout draws from it) from the config's seed."""
    cfg = _config(engine, steps=3)
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.rand(seed * 5)
        runs.append(engine.pretrain(TinyTask(), world_source, cfg, None, progress=False))
    _assert_state_equal(_params(runs[0].module), _params(runs[1].module))
    assert runs[0].losses == runs[1].losses


_KILL_CHILD = """
import sys
sys.path[:0] = [{tests!r}, {pythonpath!r}]
import test_pretrain as T
T._killed_child({host!r}, {out!r}, kill_at_save={kill_at_save})
"""


def _killed_child(host_path, out_dir, kill_at_save: int) -> None:
    """Run in a subprocess: pretrain with a checkpoint every step, and SIGKILL itself in the middle of writing the
    ``kill_at_save``-th checkpoint (half of its bytes on disk: the worst moment for a kill)."""
    engine, sources = _engine_without_boot(host_path)
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as the parent's comparison runs: oneDNN picks kernels by the CPUs it sees
    saves = []
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        saves.append(1)
        if len(saves) < kill_at_save:
            return real_save(obj, f, *a, **k)
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    engine.pretrain(TinyTask(), sources.WorldSource("single", seed=0),
                    _config(engine, checkpoint_every=1), out_dir, progress=False)


def test_a_run_killed_while_writing_a_checkpoint_resumes_exactly(engine, world_source, host, tmp_path):
    """A subprocess is SIGKILLed half-way through writing its 4th checkpoint: checkpoint.pt is still the whole 3rd
    one (the half-written temporary file never replaced it, and the resume deletes it), the log's line of step 4 is
    dropped on resume, and the resumed run ends bit for bit where a straight run ends."""
    out = tmp_path / "killed"
    script = _KILL_CHILD.format(tests=str(REPO / "tests"), pythonpath=str(REPO / ".pythonpath"),
                                host=str(host.path), out=str(out), kill_at_save=4)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    leftovers = [p for p in out.iterdir() if p.name.startswith(".checkpoint.pt.")]
    assert leftovers, "the kill was meant to interrupt a checkpoint write"
    payload = engine.load_checkpoint(out / "checkpoint.pt", TinyTask(), _config(engine))
    assert payload["step"] == 3
    assert max(row["step"] for row in _log(out)) == 4  # logged before the interrupted checkpoint

    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)  # the killed child's arithmetic: one thread, no oneDNN (bit for bit across processes)
    torch.backends.mkldnn.enabled = False
    try:
        resumed = engine.pretrain(TinyTask(), world_source, _config(engine), out, progress=False)
        straight = engine.pretrain(TinyTask(), world_source, _config(engine), tmp_path / "straight", progress=False)
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn
    assert resumed.resumed_from == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the interrupted write's file is cleaned up
    _assert_state_equal(_params(resumed.module), _params(straight.module))
    assert resumed.losses == straight.losses[3:]
    assert _log(out) == _log(tmp_path / "straight")


def test_resume_survives_a_log_line_cut_by_a_kill(engine, world_source, tmp_path):
    """A kill can cut log.jsonl in the middle of a line: the resume drops it (and the curve skips it)."""
    cfg = _config(engine)
    engine.pretrain(TinyTask(), world_source, cfg, tmp_path, progress=False, stop_after=2)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    r = engine.pretrain(TinyTask(), world_source, cfg, tmp_path, progress=False)
    assert r.steps == 6
    assert [row["step"] for row in _log(tmp_path) if "loss" in row] == [1, 2, 3, 4, 5, 6]


def test_extending_steps_resumes_and_other_cadences_are_not_refused(engine, world_source, tmp_path):
    engine.pretrain(TinyTask(), world_source, _config(engine, steps=4), tmp_path, progress=False)
    r = engine.pretrain(TinyTask(), world_source, _config(engine, steps=6, log_every=3, checkpoint_every=5,
                                                          validate_every=2), tmp_path, progress=False)
    assert (r.resumed_from, r.steps, len(r.losses)) == (4, 6, 2)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 6


# ------------------------------------------------------------------------------------------------ refusals

def test_a_checkpoint_of_another_run_is_refused_naming_the_fix(engine, world_source, error, tmp_path):
    cfg = _config(engine, steps=2)
    engine.pretrain(TinyTask(), world_source, cfg, tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    before, log_before = ckpt.read_bytes(), (tmp_path / "log.jsonl").read_text()

    with pytest.raises(error, match="was written while pre-training 'tiny_test_task', not 'another_network'.*"
                                    "another output folder"):
        engine.pretrain(OtherTask(), world_source, cfg, tmp_path, progress=False)
    with pytest.raises(error, match=r"another configuration of tiny_test_task.*\"width\": 6.*Resume with the "
                                    "checkpoint's settings, or use another output folder"):
        engine.pretrain(TinyTask(width=6), world_source, cfg, tmp_path, progress=False)
    with pytest.raises(error, match=r"another configuration.*\"lr\": 0\.01.*\"lr\": 0\.02.*another output folder"):
        engine.pretrain(TinyTask(), world_source, dataclasses.replace(cfg, lr=2e-2), tmp_path, progress=False)
    with pytest.raises(error, match="another configuration"):
        engine.pretrain(TinyTask(), world_source, dataclasses.replace(cfg, batch_size=8), tmp_path, progress=False)
    assert ckpt.read_bytes() == before and (tmp_path / "log.jsonl").read_text() == log_before  # nothing touched

    ckpt.write_bytes(before[: len(before) // 2])  # truncated
    with pytest.raises(error, match="is not a readable pre-training checkpoint.*Delete it to start over"):
        engine.pretrain(TinyTask(), world_source, cfg, tmp_path, progress=False)
    ckpt.write_text("garbage, not a checkpoint")
    with pytest.raises(error, match="is not a readable pre-training checkpoint.*Delete it to start over"):
        engine.pretrain(TinyTask(), world_source, cfg, tmp_path, progress=False)
    torch.save({"model": {}, "step": 3}, ckpt)  # a torch file of something else
    with pytest.raises(error, match="is not a pre-training checkpoint of this engine.*Delete it"):
        engine.pretrain(TinyTask(), world_source, cfg, tmp_path, progress=False)


def test_a_nan_loss_stops_with_the_fix_named(engine, world_source, error, tmp_path):
    cfg = _config(engine, checkpoint_every=1)
    with pytest.raises(error, match=r"tiny_test_task: the loss is nan at step 3\. Lower the learning rate \(now "
                                    r"0\.01\) or use precision=fp32, and start again in another output folder"):
        engine.pretrain(TinyTask(nan_at=3), world_source, cfg, tmp_path, progress=False)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert payload["step"] == 2 and all(torch.isfinite(v).all() for v in payload["model"].values())


# ------------------------------------------------------------------------------------------------ progress

def test_log_curve_progress_and_validation(engine, world_source, tmp_path, capfd):
    from PIL import Image
    cfg = _config(engine, steps=7, log_every=3, checkpoint_every=3, validate_every=3)
    r = engine.pretrain(TinyTask(), world_source, cfg, tmp_path)
    rows = _log(tmp_path)
    assert [row["step"] for row in rows if "loss" in row] == [3, 6, 7]  # every log_every steps, and the last
    assert [row["step"] for row in rows if "validation" in row] == [3, 6, 7]
    for row in rows:
        if "loss" in row:
            assert set(row) == {"step", "loss", "lr", "target_mean"} and row["loss"] == r.losses[row["step"] - 1]
    assert rows[-1]["validation"] == r.validation
    with Image.open(tmp_path / "loss.png") as im:
        im.load()
        assert im.size == (640, 360)
        assert len(im.convert("RGB").getcolors(1 << 16)) > 2  # axes, text and curves drawn on white
    err = capfd.readouterr().err
    assert "tiny_test_task" in err and "7/7" in err  # tqdm bar on stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_no_curve_from_a_single_point(engine, world_source, tmp_path):
    engine.pretrain(TinyTask(), world_source, _config(engine, steps=1), tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "loss.png").exists()


# ------------------------------------------------------------------------------------------------ DDP

def _ddp_worker(rank: int, world: int, port: int, host_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    engine, sources = _engine_without_boot(host_path)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out = Path(out_dir)
    try:
        src = sources.WorldSource("single", seed=0)
        cfg = _config(engine, steps=4, batch_size=8)
        straight = engine.pretrain(TinyTask(), src, cfg, out / "straight", progress=False)
        torch.manual_seed(100 + rank)
        engine.pretrain(TinyTask(), src, cfg, out / "parts", progress=False, stop_after=2)
        resumed = engine.pretrain(TinyTask(), src, cfg, out / "parts", progress=False)
        plain = engine.pretrain(TinyTask(noise=0.0, dropout=0.0), src, cfg, out / "plain", progress=False)
        try:
            engine.pretrain(TinyTask(nan_at=2, nan_rank=1), src, cfg, None, progress=False)
            nan = "no error"
        except engine.PersonalizeError as e:
            nan = str(e)
        torch.save({"straight": _params(straight.module), "resumed": _params(resumed.module),
                    "plain": _params(plain.module), "plain_losses": plain.losses, "straight_losses": straight.losses,
                    "resumed_losses": resumed.losses, "nan": nan}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes(engine, world_source, host, tmp_path):
    """Two CPU ranks (gloo), 4 steps at global batch 8:

    * the replicas end identical (the engine's own check passed, and the test compares the weights itself);
    * stopped after 2 steps and resumed, they end bit for bit where the straight 2-rank run ends;
    * a NaN loss on rank 1 only stops both ranks with the PersonalizeError (no rank left waiting in a collective);
    * with a deterministic loss (no noise, no dropout) they reproduce one process at global batch 8 to float
      tolerance, not bit for bit: DDP averages two per-rank gradients where one process averages 8 samples at once
      (another summation order). The noisy task is not compared with one process: the step generator is per rank,
      so its noise differs by design."""
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, free_port(), str(host.path), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for key in ("straight", "resumed", "plain"):
        _assert_state_equal(r0[key], r1[key])
    _assert_state_equal(r0["straight"], r0["resumed"])
    assert r0["resumed_losses"] == r0["straight_losses"][2:]
    for r in (r0, r1):
        assert "tiny_test_task: the loss is nan at step 2" in r["nan"] and "Lower the learning rate" in r["nan"]
    ckpt = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 4
    _assert_state_equal(ckpt["model"], r0["straight"])
    assert _log(tmp_path / "straight") == _log(tmp_path / "parts")

    single = engine.pretrain(TinyTask(noise=0.0, dropout=0.0), world_source, _config(engine, steps=4, batch_size=8),
                             None, progress=False)
    for k, v in _params(single.module).items():
        torch.testing.assert_close(r0["plain"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert r0["plain_losses"] == pytest.approx(single.losses, rel=1e-5)
    assert not torch.equal(r0["plain"]["0.weight"], TinyTask().build("cpu")[0].weight)  # it did train


# ------------------------------------------------------------------------------------------------ sources

def test_world_source_global_batches_do_not_depend_on_the_rank_count(host):
    sources = pack_module(host, "miniworld.sources")
    for mode in ("single", "views"):
        src = sources.WorldSource(mode, seed=5)
        whole = src.batch(3, 0, 1, 4)
        halves = [src.batch(3, r, 2, 2) for r in range(2)]
        assert torch.equal(torch.cat([h.images for h in halves]), whole.images)
        assert sum((h.captions for h in halves), []) == whole.captions
        assert torch.equal(src.batch(3, 0, 1, 4).images, whole.images)  # pure function
        assert not torch.equal(src.batch(4, 0, 1, 4).images, whole.images)
        if mode == "views":
            assert whole.references.shape == whole.images.shape
            assert not torch.equal(whole.references, whole.images)


def test_world_source_draws_base_subjects_only(host):
    """No held-out subject's caption name is ever drawn (in any pattern colour): house rule, and sources.py's
    promise. 3000 draws (no rendering) cover every base name, and a rendered batch's subjects are base ones."""
    sources = pack_module(host, "miniworld.sources")
    world = pack_module(host, "miniworld.world")
    held = {s.words for s in world.heldout_subjects()}
    base_names = {s.words for s in world.base_subjects()}
    g = torch.Generator().manual_seed(0)
    drawn = {sources.draw_subject(g).words for _ in range(3000)}
    assert not drawn & held and drawn == base_names
    batch = sources.WorldSource("views", seed=1).batch(0, 0, 1, 8)
    assert all(s.words in base_names for s in batch.extras["subjects"])
    assert len(set(batch.subject_ids)) > 1


def _png(path: Path, array) -> None:
    from PIL import Image
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(array, dtype=np.uint8)
    Image.fromarray(a).save(path)


def _solid(w: int, h: int, rgb) -> "object":
    import numpy as np
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (h, w, 3)).copy()


def _write_folder(root: Path, lines: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.fixture
def masked_folder(tmp_path):
    """Three images of different sizes, each with a mask: alice/01 (96×48, red left half, blue right half, subject
    box (24, 12)-(72, 36) = its mask's white rectangle), alice/02 (40×40 green), bob/01 (64×32 grey, no box)."""
    import numpy as np
    root = tmp_path / "masked"
    img = _solid(96, 48, (255, 0, 0))
    img[:, 48:] = (0, 0, 255)
    _png(root / "alice" / "01.png", img)
    mask = np.zeros((48, 96), np.uint8)
    mask[12:36, 24:72] = 255
    _png(root / "alice" / "01_mask.png", mask)
    _png(root / "alice" / "02.png", _solid(40, 40, (0, 255, 0)))
    _png(root / "alice" / "02_mask.png", np.full((40, 40), 255, np.uint8))
    _png(root / "bob" / "01.png", _solid(64, 32, (128, 128, 128)))
    _png(root / "bob" / "01_mask.png", np.zeros((32, 64), np.uint8))
    return _write_folder(root, [
        {"image": "alice/01.png", "caption": "alice by the sea", "subject": "alice", "boxes": [[24, 12, 72, 36]]},
        {"image": "alice/02.png", "caption": "alice in green", "subject": "alice"},
        {"image": "bob/01.png", "caption": "bob in grey", "subject": "bob"}])


@pytest.fixture
def mixed_folder(tmp_path):
    """Six lines: two subjects with two images each (no masks but one), and two lines without a subject whose
    files share a name in different folders (each is its own subject)."""
    import numpy as np
    root = tmp_path / "mixed"
    colours = {"a/1.png": (255, 0, 0), "a/2.png": (200, 0, 0), "b/1.png": (0, 255, 0), "b/2.png": (0, 200, 0),
               "x/pic.png": (0, 0, 255), "y/pic.png": (0, 0, 200)}
    for i, (name, rgb) in enumerate(colours.items()):
        _png(root / name, _solid(30 + 10 * i, 50 - 4 * i, rgb))
    _png(root / "a" / "1_mask.png", np.full((50, 30), 255, np.uint8))
    lines = [{"image": n, "caption": f"caption of {n}"} for n in colours]
    for line in lines[:4]:
        line["subject"] = line["image"][0]
    return _write_folder(root, lines)


def test_folder_source_reads_images_masks_and_boxes_at_size(data, masked_folder):
    src = data.FolderSource(masked_folder, size=32, seed=0)
    assert len(src) == 3
    b = src.batch(0, 0, 1, 3)  # epoch 0: every line once
    assert b.images.shape == (3, 32, 32, 3) and b.masks.shape == (3, 32, 32)
    assert b.references.shape == (3, 32, 32, 3) and b.reference_masks.shape == (3, 32, 32)
    assert sorted(b.captions) == ["alice by the sea", "alice in green", "bob in grey"]
    i = b.captions.index("alice by the sea")
    img, mask, boxes = b.images[i], b.masks[i], b.boxes[i]
    # 96×48 → 32×32: x scaled by 1/3, y by 2/3; the red/blue edge at x = 48 lands at x = 16
    assert torch.allclose(img[:, :15], torch.tensor([1.0, 0.0, 0.0]).expand(32, 15, 3), atol=1e-6)
    assert torch.allclose(img[:, 17:], torch.tensor([0.0, 0.0, 1.0]).expand(32, 15, 3), atol=1e-6)
    assert torch.equal(boxes, torch.tensor([[8.0, 8.0, 24.0, 24.0]]))
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)  # the box still bounds the resized mask's rectangle
    assert (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) == (8, 8, 24, 24)
    assert float(mask[16, 16]) == 1.0 and float(mask[2, 2]) == 0.0
    # the reference is the other image of alice (green), with its mask
    assert torch.allclose(b.references[i], torch.tensor([0.0, 1.0, 0.0]).expand(32, 32, 3), atol=1e-6)
    assert torch.equal(b.reference_masks[i], torch.ones(32, 32))
    j = b.captions.index("alice in green")
    assert torch.equal(b.references[j], b.images[i]) and b.boxes[j].shape == (0, 4)
    k = b.captions.index("bob in grey")  # bob has one image: his reference is himself
    assert torch.equal(b.references[k], b.images[k]) and b.subject_ids[k] == "bob"


def test_folder_source_order_references_ranks_and_epochs(data, mixed_folder):
    src = data.FolderSource(mixed_folder, size=16, seed=7)
    n = len(src)
    assert n == 6
    subject_of = {f"caption of {e.image.relative_to(mixed_folder).as_posix()}": e.subject for e in src.entries}
    assert len({subject_of["caption of x/pic.png"], subject_of["caption of y/pic.png"], "a", "b"}) == 4

    # epochs: 3 steps of 4 = 12 positions = 2 epochs, each line exactly once per epoch
    stream = sum((src.batch(s, 0, 1, 4).captions for s in range(3)), [])
    assert sorted(stream[:6]) == sorted(stream[6:]) == sorted(subject_of)
    assert stream[:6] != stream[6:]  # each epoch its own order

    # a pure function of (seed, step, rank): a new source reads the same; another seed another order
    again = data.FolderSource(mixed_folder, size=16, seed=7)
    for s in range(3):
        a, b = src.batch(s, 0, 1, 4), again.batch(s, 0, 1, 4)
        assert a.captions == b.captions and torch.equal(a.images, b.images) and torch.equal(a.references, b.references)
    other = data.FolderSource(mixed_folder, size=16, seed=8)
    assert sum((other.batch(s, 0, 1, 4).captions for s in range(3)), []) != stream

    # ranks take disjoint slices of the same global batch
    for s in range(3):
        whole = src.batch(s, 0, 1, 4)
        halves = [src.batch(s, r, 2, 2) for r in range(2)]
        assert halves[0].captions + halves[1].captions == whole.captions
        assert torch.equal(torch.cat([h.images for h in halves]), whole.images)
        assert torch.equal(torch.cat([h.references for h in halves]), whole.references)

    # references: another image of the same subject when there is one
    for s in range(6):
        b = src.batch(s, 0, 1, 4)
        for cap, img, ref, sid in zip(b.captions, b.images, b.references, b.subject_ids):
            if sid in ("a", "b"):
                assert not torch.equal(ref, img)
                partner = [c for c, v in subject_of.items() if v == sid and c != cap][0]
                idx = [f"caption of {e.image.relative_to(mixed_folder).as_posix()}" for e in src.entries].index(partner)
                assert torch.equal(ref, _read_image(src, idx))
            else:
                assert torch.equal(ref, img)
        assert b.masks is None  # one line has a mask, the others none: no masks in the batch


def _read_image(src, index: int) -> torch.Tensor:
    """Line ``index`` read independently of the source (PIL resize to the source's size)."""
    import numpy as np
    from PIL import Image
    with Image.open(src.entries[index].image) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB").resize((src.size, src.size), Image.BILINEAR),
                                           dtype=np.float32) / 255.0)


def test_bad_folders_are_refused_naming_the_problem(data, error, tmp_path, masked_folder):
    import numpy as np
    with pytest.raises(error, match="has no manifest.jsonl. Write one JSON line per image"):
        data.FolderSource(tmp_path / "empty", size=16)

    def folder(name, lines, files=()):
        root = tmp_path / name
        for fname, array in files:
            _png(root / fname, array)
        return _write_folder(root, lines)

    ok = ("p/1.png", _solid(20, 20, (9, 9, 9)))
    with pytest.raises(error, match="lists no images"):
        data.FolderSource(folder("nolines", [], [ok]), size=16)
    with pytest.raises(error, match=r"line 2: .*missing\.png does not exist"):
        data.FolderSource(folder("missing", [{"image": "p/1.png", "caption": "c"},
                                             {"image": "p/missing.png", "caption": "c"}], [ok]), size=16)
    with pytest.raises(error, match="line 1: .*needs at least \"image\" and \"caption\""):
        data.FolderSource(folder("nocaption", [{"image": "p/1.png"}], [ok]), size=16)
    with pytest.raises(error, match=r"line 1: boxes are \[x0, y0, x1, y1\]"):
        data.FolderSource(folder("badbox", [{"image": "p/1.png", "caption": "c", "boxes": [[1, 2, 3]]}], [ok]),
                          size=16)
    with pytest.raises(error, match=r"line 1: boxes are \[x0, y0, x1, y1\]"):
        data.FolderSource(folder("wordbox", [{"image": "p/1.png", "caption": "c", "boxes": [["a", 2, 3, 4]]}],
                                 [ok]), size=16)
    with pytest.raises(error, match="1_mask.png is 10x20 but its image is 20x20; a mask must have its image's size"):
        data.FolderSource(folder("masksize", [{"image": "p/1.png", "caption": "c"}],
                                 [ok, ("p/1_mask.png", np.zeros((20, 10), np.uint8))]), size=16)
    root = folder("corrupt", [{"image": "p/1.png", "caption": "c"}, {"image": "p/2.png", "caption": "d"}], [ok])
    (root / "p" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    with pytest.raises(error, match=r"2\.png cannot be read as an image"):
        data.FolderSource(root, size=16)
    good = (masked_folder / "alice" / "01.png").read_bytes()
    (root / "p" / "2.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(error, match=r"2\.png cannot be read as an image"):
        data.FolderSource(root, size=16)
    root = folder("corruptmask", [{"image": "p/1.png", "caption": "c"}], [ok])
    (root / "p" / "1_mask.png").write_bytes(b"not a png")
    with pytest.raises(error, match=r"1_mask\.png cannot be read as an image"):
        data.FolderSource(root, size=16)
    root = folder("badjson", [], [ok])
    (root / "manifest.jsonl").write_text('{"image": "p/1.png", "caption": "c"}\n{"image": oops}\n')
    with pytest.raises(error, match="manifest.jsonl, line 2"):
        data.FolderSource(root, size=16)


# ------------------------------------------------------------------------------------------------ the script

def _script(host, *args, timeout=600):
    env = dict(os.environ, COMFYUI_PATH=str(host.path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_clip_vision.py"), "--threads", "1", *args],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.slow
def test_clip_vision_script_quick_resumes_and_reads_a_folder(host, engine, masked_folder, tmp_path):
    """``--quick --stop-after 2`` stops at a checkpoint of step 2 and writes no file; ``--quick`` again resumes and
    finishes (the written tower loads through the pack's loader and encodes); ``--folder`` trains on the user's
    images through the same script."""
    mini_clip = pack_module(host, "networks.mini_clip")
    out, work = tmp_path / "cv.safetensors", tmp_path / "work"
    r = _script(host, "--quick", "--stop-after", "2", "--out", str(out), "--work-dir", str(work))
    assert "part done: step 2 of 4" in r.stderr and not out.exists()
    assert torch.load(work / "checkpoint.pt", weights_only=False)["step"] == 2
    r = _script(host, "--quick", "--out", str(out), "--work-dir", str(work))
    assert "resuming at step 2 of 4" in r.stderr and out.is_file()
    assert [row["step"] for row in _log(work) if "loss" in row] == [1, 2, 3, 4]
    clip_vision = mini_clip.load_clip_vision(out)
    assert clip_vision.encode_image(torch.rand(1, 64, 64, 3))["image_embeds"].shape == (1, 128)

    fout, fwork = tmp_path / "folder_cv.safetensors", tmp_path / "folder_work"
    _script(host, "--folder", str(masked_folder), "--size", "64", "--quick", "--out", str(fout), "--work-dir",
            str(fwork))
    assert fout.is_file() and (fwork / "loss.png").is_file()
    assert mini_clip.CLIP_VISION_FILE.load(fout).metadata["trained_on"] == str(masked_folder)


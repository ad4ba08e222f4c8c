"""Every workflow file users get (workflows/*.json, UI format) loads and runs through ComfyUI's executor.

``<method>_mini`` and the mini-world workflows run as shipped (the pack's mini model and subject, nothing in ComfyUI's
input or model folders); an ``<method>_sd15`` one runs with the tiny random SD1.5 test checkpoint in place of
v1-5-pruned-emaonly-fp16.safetensors, at 64 px with a few steps (``harness.workflow_variants.for_test``)."""
import json
from pathlib import Path

import pytest
import torch

from helpers import assert_saved_images, call_node

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
METHODS = ("textual_inversion", "dreambooth_lora", "hifi_subject_tune", "hifi_reference_guided",
           "hifi_subject_replace", "invert_image")
WRITES = {"PersonalizeTrainSubjectEmbedding": "embedding_name", "PersonalizeTrainSubjectLoRA": "lora_name",
          "PersonalizeHiFiSubjectTune": "subject_name"}  # training nodes and the input naming the file they write


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _values(node: dict, mappings: dict) -> dict:
    from harness.workflow_variants import widget_names
    return dict(zip(widget_names(node["type"], mappings), node["widgets_values"]))


def test_there_are_workflows():
    """Two per method (mini model, SD1.5), the mini-world sample and the two demos (HiFi Tuner from four views,
    ProFusion from one), and ProFusion's two on the mini model (its
    official weights are SD2's: a real-model ProFusion workflow would need a converted PromptNet that no download
    provides)."""
    assert {p.stem for p in WORKFLOWS} == ({f"{m}_{k}" for m in METHODS for k in ("mini", "sd15")}
                                           | {"mini_world_sample", "mini_world_demo", "mini_world_demo_profusion",
                                              "profusion_encode_mini",
                                              "profusion_tune_mini"})


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(host, run_ui_workflow, ckpt_sd15, path):
    from harness.workflow_variants import for_test
    assert_saved_images(run_ui_workflow(for_test(path.stem, _load(path), ckpt_sd15, host.nodes.NODE_CLASS_MAPPINGS)))


def test_workflow_files_are_what_the_script_builds(host):
    """workflows/*.json are scripts/build_workflows.py's output (rebuild after editing a graph)."""
    from harness.workflow_variants import build_workflows
    bw = build_workflows()
    table = bw.load_size_table()
    assert sorted(bw.GRAPHS) == [p.stem for p in WORKFLOWS]
    for name, (title, demo, nodes) in bw.GRAPHS.items():
        built = json.loads(json.dumps(bw.build(name, title, demo, nodes, host.nodes.NODE_CLASS_MAPPINGS, table)))
        assert built == _load(ROOT / "workflows" / f"{name}.json"), f"{name}: run scripts/build_workflows.py"


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if not p.stem.endswith("_sd15")], ids=lambda p: p.stem)
def test_mini_workflows_need_only_what_the_pack_ships(host, path):
    """The mini model from the pack's models/ and subject folders from the pack's subjects/: nothing a user has to
    put anywhere."""
    from harness.subjects import SHIPPED_PHOTO, SHIPPED_SUBJECT
    mappings = host.nodes.NODE_CLASS_MAPPINGS
    nodes = [n for n in _load(path)["nodes"] if n["type"] != "Note"]
    assert "CheckpointLoaderSimple" not in {n["type"] for n in nodes}
    for node in nodes:
        values = _values(node, mappings)
        if node["type"] == "PersonalizeLoadMiniModel":
            assert values["ckpt_name"] == "mini_world.safetensors"
        if node["type"] == "PersonalizeLoadSubjectImages":
            assert values["folder"] in (SHIPPED_SUBJECT, SHIPPED_PHOTO) and values["size"] == 64
        if node["type"] == "PersonalizePromptNetLoader":
            assert values["promptnet_name"] == "mini_world_promptnet.safetensors"
        if node["type"] == "PersonalizeLoadMiniCLIPVision":
            assert values["clip_name"] == "mini_world_clip_vision.safetensors"


@pytest.mark.parametrize("method", METHODS)
def test_sd15_workflows_are_set_for_a_real_checkpoint(host, method):
    """512 px, the conventional SD1.5 file name with the download ComfyUI's templates give, and the same graph as
    the mini workflow with Load Checkpoint in place of Load Mini Model."""
    mappings = host.nodes.NODE_CLASS_MAPPINGS
    sd15, mini = _load(ROOT / "workflows" / f"{method}_sd15.json"), _load(ROOT / "workflows" / f"{method}_mini.json")
    loader = next(n for n in sd15["nodes"] if n["id"] == 1)
    assert loader["type"] == "CheckpointLoaderSimple"
    assert loader["widgets_values"] == ["v1-5-pruned-emaonly-fp16.safetensors"]
    assert loader["properties"]["models"] == [{
        "name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
               "v1-5-pruned-emaonly-fp16.safetensors"}]
    for node in sd15["nodes"]:
        values = _values(node, mappings) if node["type"] != "Note" else {}
        if node["type"] in ("PersonalizeLoadSubjectImages", "EmptyLatentImage"):
            assert values.get("size", values.get("width")) == 512, node["type"]
    shape = lambda wf: sorted((n["id"], n["type"], n["mode"]) for n in wf["nodes"] if n["id"] != 1)  # noqa: E731
    assert shape(sd15) == shape(mini) and sd15["links"] == mini["links"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_workflow_reads_a_file_its_own_run_writes(host, path):
    """A node that loads a file the same run writes is flagged as missing by the frontend on a fresh install (and
    depends on execution order): such a node is muted (a later session's), the run uses the trainer's output."""
    mappings = host.nodes.NODE_CLASS_MAPPINGS
    active = [n for n in _load(path)["nodes"] if n["type"] != "Note" and n["mode"] == 0]
    written = {_values(n, mappings)[WRITES[n["type"]]] + ".safetensors" for n in active if n["type"] in WRITES}
    read = {v for n in active if n["type"] not in WRITES for v in _values(n, mappings).values() if isinstance(v, str)}
    assert not written & read
    assert not any(n["type"] == "PersonalizeHiFiLoadSubject" for n in active)


#: Nodes whose first workflow comes with the method that consumes them (node id -> why). Each must still be missing
#: from every workflow (the test fails once one uses it, so the entry is removed then) and run by the executor in a
#: test of its own.
FIRST_WORKFLOW_PENDING: dict = {}


def test_every_pack_node_is_in_a_workflow(host):
    used = set()
    for p in WORKFLOWS:
        used |= {n["type"] for n in _load(p)["nodes"]}
    missing = set(host.pack_node_ids) - used
    assert missing == set(FIRST_WORKFLOW_PENDING), missing ^ set(FIRST_WORKFLOW_PENDING)


@pytest.mark.server
def test_workflow_over_http(host, comfy_server):
    """The mini LoRA workflow, as shipped but for fewer steps, through a real server (``python main.py``): the
    pack's mini model and subject are found there too."""
    from harness.ui_convert import ui_to_api
    prompt = ui_to_api(_load(ROOT / "workflows" / "dreambooth_lora_mini.json"), host.nodes.NODE_CLASS_MAPPINGS)
    prompt["3"]["inputs"]["steps"] = 3
    prompt["3"]["inputs"]["lora_name"] = "http_demo_lora"
    try:
        entry = comfy_server.wait(comfy_server.submit(prompt), timeout=600)
    finally:
        # The server process writes into the first loras folder it knows, which may be the host tree's own.
        for folder in (host.path / "models" / "loras", host.model_folder("loras")):
            (folder / "http_demo_lora.safetensors").unlink(missing_ok=True)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert saved


def test_load_subject_images_masks(host, demo_subject_folder):
    images, masks = call_node("PersonalizeLoadSubjectImages", folder=demo_subject_folder.name, size=32)
    assert images.shape == (3, 32, 32, 3) and masks.shape == (3, 32, 32)
    assert 0.1 < float(masks.mean()) < 0.5 and torch.isfinite(images).all()


SHIPPED_SUBJECTS = Path(__file__).resolve().parents[1] / "subjects"


def _pixels(path: Path):
    import numpy as np
    from PIL import Image
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_shipped_subjects_are_what_their_script_writes(tmp_path):
    """subjects/ holds exactly what scripts/build_subjects.py writes (harness.subjects.write_shipped_subjects)."""
    import numpy as np
    from harness.subjects import write_shipped_subjects
    written = write_shipped_subjects(tmp_path)
    assert sorted(p.name for p in SHIPPED_SUBJECTS.iterdir() if not p.name.startswith(".")) == sorted(
        f.name for f in written)
    for folder in written:
        files = sorted(p.name for p in folder.iterdir())
        assert sorted(p.name for p in (SHIPPED_SUBJECTS / folder.name).iterdir()) == files
        for name in files:
            assert np.array_equal(_pixels(folder / name), _pixels(SHIPPED_SUBJECTS / folder.name / name)), name
    assert sum(p.stat().st_size for p in SHIPPED_SUBJECTS.rglob("*.png")) < 200_000


@pytest.fixture
def empty_input_dir(host, tmp_path, monkeypatch):
    """ComfyUI's input directory as on a fresh install: empty."""
    import folder_paths
    empty = tmp_path / "input"
    empty.mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(empty))
    assert folder_paths.get_input_directory() == str(empty)
    return empty


def test_load_subject_images_finds_the_shipped_subject(empty_input_dir):
    from harness.subjects import SHIPPED_SUBJECT
    images, masks = call_node("PersonalizeLoadSubjectImages", folder=SHIPPED_SUBJECT, size=64)
    assert images.shape == (4, 64, 64, 3) and masks.shape == (4, 64, 64)
    assert 0.05 < float(masks.mean()) < 0.5 and torch.isfinite(images).all()
    images, masks = call_node("PersonalizeLoadSubjectImages", folder=SHIPPED_SUBJECT, size=512)
    assert images.shape == (4, 512, 512, 3) and masks.shape == (4, 512, 512)


def test_a_folder_in_input_wins_over_the_shipped_one(host, empty_input_dir):
    from harness.subjects import SHIPPED_SUBJECT, write_subject_folder
    write_subject_folder(empty_input_dir, folder=SHIPPED_SUBJECT, n=2)
    images, _ = call_node("PersonalizeLoadSubjectImages", folder=SHIPPED_SUBJECT, size=32)
    assert images.shape[0] == 2


def test_a_missing_folder_names_both_places(host, empty_input_dir):
    from helpers import pack_module
    error = pack_module(host, "core.host").PersonalizeError
    with pytest.raises(error) as info:
        call_node("PersonalizeLoadSubjectImages", folder="no_such_subject", size=64)
    message = str(info.value)
    assert "no_such_subject" in message and str(empty_input_dir) in message
    assert str(SHIPPED_SUBJECTS) in message and "striped_red_star" in message
    with pytest.raises(error):  # never outside either folder
        call_node("PersonalizeLoadSubjectImages", folder="../workflows", size=64)

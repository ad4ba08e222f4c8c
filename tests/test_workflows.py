"""Every workflow file users get (workflows/*.json, UI format) loads and runs through ComfyUI's executor."""
import json
from pathlib import Path

import pytest
import torch

from helpers import assert_saved_images, call_node

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))


def test_there_are_workflows():
    assert {p.stem for p in WORKFLOWS} >= {"textual_inversion", "dreambooth_lora"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(host, run_ui_workflow, ckpt_sd15, ckpt_mini, demo_subject_folder, path):
    assert_saved_images(run_ui_workflow(path))


def test_every_pack_node_is_in_a_workflow(host):
    used = set()
    for p in WORKFLOWS:
        used |= {n["type"] for n in json.loads(p.read_text())["nodes"]}
    assert set(host.pack_node_ids) <= used, set(host.pack_node_ids) - used


@pytest.mark.server
def test_workflow_over_http(host, comfy_server, ckpt_sd15, demo_subject_folder):
    from harness.ui_convert import ui_to_api
    prompt = ui_to_api(json.loads((Path(__file__).resolve().parents[1] / "workflows" / "dreambooth_lora.json").read_text()),
                       host.nodes.NODE_CLASS_MAPPINGS)
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

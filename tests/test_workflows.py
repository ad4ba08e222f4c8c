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

"""The harness itself: in-process execution, UI->API conversion, and the real HTTP server, on the booted host."""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.executor import WorkflowValidationError, run_api_prompt
from harness.ui_convert import (
    MissingNodeTypeError,
    WorkflowConversionError,
    load_workflow,
    map_widget_values,
    ui_to_api,
)

DATA = Path(__file__).resolve().parent / "data"
# The same txt2img graph as saved by a 2024 frontend (users still have such files; the current frontend migrates them)
# and by a 2025 one.
UI_2024 = DATA / "txt2img_ui.json"
UI_2025 = DATA / "txt2img_ui_2025.json"


def txt2img_prompt(ckpt_name: str, prefix: str, seed: int = 42) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 2, "cfg": 7, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def assert_real_image(path: Path) -> np.ndarray:
    assert path.is_file(), f"missing output {path}"
    with Image.open(path) as img:
        img.load()
        assert img.size == (64, 64)
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert np.isfinite(pixels).all()
    assert pixels.std() > 1.0, "decoded image is (nearly) constant"
    return pixels


# ----------------------------------------------------------------------------------------------------------------
# (a) API prompt in-process


def test_host_boot_loaded_pack(host):
    assert host.pack_module is not None
    for node_id in host.pack_node_ids:
        assert host.nodes.NODE_CLASS_MAPPINGS[node_id] is host.pack_classes[node_id]
    assert host.custom_nodes_dir.joinpath("comfyui_personalize").resolve() == Path(__file__).resolve().parents[1]
    assert host.folder_paths.get_output_directory() == str(host.output_dir)
    # the model folders the harness registered come first, so files nodes write never land in the tree's models/
    assert host.folder_paths.get_folder_paths("loras")[0] == str(host.models_dir / "loras")
    assert host.version == (host.path / "comfyui_version.py").read_text().split('"')[1]


def test_api_txt2img_in_process(host, ckpt_sd15, run_workflow):
    result = run_workflow(txt2img_prompt(ckpt_sd15, "harness_api"), extra_pnginfo={"note": "api"})
    assert result.success and result.error is None
    assert "execution_start" in result.event_names()
    images = result.outputs["9"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    path = result.files("9")[0]
    assert path.parent == host.output_dir
    assert_real_image(path)
    with Image.open(path) as img:  # SaveImage embeds the API prompt and extra_pnginfo
        assert json.loads(img.info["prompt"])["3"]["class_type"] == "KSampler"
        assert json.loads(img.info["note"]) == "api"


def test_validation_error_is_readable(host, ckpt_sd15):
    prompt = txt2img_prompt(ckpt_sd15, "harness_invalid")
    prompt["3"]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(WorkflowValidationError) as info:
        run_api_prompt(prompt)
    assert "3" in info.value.node_errors
    assert "no_such_sampler" in str(info.value) and "KSampler" in str(info.value)


def test_unknown_node_type_is_a_validation_error(host):
    with pytest.raises(WorkflowValidationError, match="missing node type 'NoSuchNode'"):
        run_api_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})


class _Raise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 3, "min": 0, "max": 10})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, value):
        raise ValueError(f"harness probe failure with value={value}")


class _Interrupt(_Raise):
    def run(self, value):
        import comfy.model_management
        import nodes

        nodes.interrupt_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()
        return ()


def test_execution_error_and_interrupt_are_reported(host, monkeypatch):
    monkeypatch.setitem(host.nodes.NODE_CLASS_MAPPINGS, "HarnessTestRaise", _Raise)
    monkeypatch.setitem(host.nodes.NODE_CLASS_MAPPINGS, "HarnessTestInterrupt", _Interrupt)

    failed = run_api_prompt({"1": {"class_type": "HarnessTestRaise", "inputs": {"value": 7}}})
    assert not failed.success and not failed.interrupted
    assert failed.error["node_id"] == "1" and failed.error["exception_type"].endswith("ValueError")
    assert "value=7" in failed.error_message()

    stopped = run_api_prompt({"1": {"class_type": "HarnessTestInterrupt", "inputs": {"value": 1}}})
    assert stopped.interrupted and not stopped.success and stopped.error is None
    assert "execution_interrupted" in stopped.event_names()

    # the executor is usable again afterwards
    again = run_api_prompt({"2": {"class_type": "HarnessTestRaise", "inputs": {"value": 2}}})
    assert again.error["node_id"] == "2"


# ----------------------------------------------------------------------------------------------------------------
# (b) UI-format workflow


def expected_txt2img_api(ckpt_name: str, prefix: str) -> dict:
    prompt = txt2img_prompt(ckpt_name, prefix)
    return {k: {"inputs": v["inputs"], "class_type": v["class_type"]} for k, v in prompt.items()}


def test_ui_workflow_converts_like_the_frontend(host, ckpt_sd15):
    api = ui_to_api(load_workflow(UI_2024))
    assert api == expected_txt2img_api(ckpt_sd15, "harness_ui")
    # Reroute, PrimitiveNode and Note are virtual; bypassed LatentUpscaleBy and muted PreviewImage are gone
    assert set(api) == {"3", "4", "5", "6", "7", "8", "9"}


def test_ui_workflow_2025_frontend_save_converts_the_same(host, ckpt_sd15):
    assert ui_to_api(load_workflow(UI_2025)) == ui_to_api(load_workflow(UI_2024))


def test_ui_workflow_with_link_objects_converts_the_same(host):
    workflow = load_workflow(UI_2025)
    workflow["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
                         for link in workflow["links"]]
    workflow["version"] = 1
    assert ui_to_api(workflow) == ui_to_api(load_workflow(UI_2024))


def test_ui_txt2img_in_process(host, ckpt_sd15, run_ui_workflow):
    result = run_ui_workflow(UI_2024)
    path = result.files("9")[0]
    assert path.name.startswith("harness_ui")
    assert_real_image(path)
    with Image.open(path) as img:
        assert json.loads(img.info["workflow"])["nodes"], "UI workflow not embedded in the PNG"
    assert "12" not in result.outputs  # the muted PreviewImage did not run


# ----------------------------------------------------------------------------------------------------------------
# (c) real server over HTTP


@pytest.mark.server
@pytest.mark.slow
def test_http_txt2img(host, ckpt_sd15, comfy_server):
    info = comfy_server.object_info()
    missing = [node_id for node_id in host.pack_node_ids if node_id not in info]
    assert not missing, f"pack nodes missing from the server's /object_info: {missing}"

    prompt = txt2img_prompt(ckpt_sd15, "harness_http", seed=7)
    prompt_id = comfy_server.submit(prompt, extra_data={"extra_pnginfo": {"workflow": load_workflow(UI_2024)}})
    entry = comfy_server.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["9"]["images"]
    assert images and images[0]["filename"].startswith("harness_http")
    assert_real_image(host.output_dir / images[0]["subfolder"] / images[0]["filename"])
    png = comfy_server.view(images[0]["filename"], images[0]["subfolder"], images[0]["type"])
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (64, 64)


@pytest.mark.server
def test_http_validation_error(host, comfy_server):
    with pytest.raises(WorkflowValidationError) as info:
        comfy_server.submit({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64}},
                             "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}}})
    assert info.value.node_errors or info.value.error


# ----------------------------------------------------------------------------------------------------------------
# (d) ui_to_api edge cases against hand-written expectations (fake node classes; no host needed)


def _node_class(required: dict, optional: dict | None = None):
    spec = {"required": required}
    if optional:
        spec["optional"] = optional
    return type("Fake", (), {"INPUT_TYPES": classmethod(lambda cls: spec)})


FAKE = {
    "Source": _node_class({"x": ("INT", {"default": 0})}),
    "Sampler": _node_class(
        {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0}),
            "steps": ("INT", {"default": 20}),
            "sampler_name": (["euler", "ddim"],),
            "latent": ("LATENT",),
        },
        {"noise_seed": ("INT", {"default": 0}), "strength": ("FLOAT", {"default": 1.0})},
    ),
    "Custom": _node_class(
        {
            "count": ("INT", {"default": 1, "control_after_generate": True}),
            "mode": (["a", "b", "c"], {"control_after_generate": True}),
            "text": ("STRING", {"multiline": True}),
            "flag": ("BOOLEAN", {"default": False}),
        }
    ),
    "Forced": _node_class({"a": ("INT", {"default": 1}), "b": ("FLOAT", {"forceInput": True}),
                           "c": ("STRING", {"default": ""})}),
    "Loader": _node_class({"name": (["m1", "m2"],)}),
    "Pass": _node_class({"image": ("IMAGE",), "latent": ("LATENT",), "amount": ("FLOAT", {"default": 0.5})}),
    "Sink": _node_class({"latent": ("LATENT",)}, {"image": ("IMAGE",)}),
    "V3Combo": _node_class({"choice": ("COMBO", {"options": ["x", "y"], "control_after_generate": True}),
                            "after": ("INT", {"default": 0})}),
}


def _node(node_id, node_type, *, inputs=(), outputs=(), widgets=None, mode=0, **extra):
    node = {"id": node_id, "type": node_type, "mode": mode, "pos": [0, 0], "size": [100, 50], "flags": {},
            "order": 0, "properties": {}, "inputs": list(inputs), "outputs": list(outputs)}
    if widgets is not None:
        node["widgets_values"] = widgets
    node.update(extra)
    return node


def _inp(name, typ, link=None, widget=None):
    entry = {"name": name, "type": typ, "link": link}
    if widget:
        entry["widget"] = {"name": widget}
    return entry


def _out(name, typ, links):
    return {"name": name, "type": typ, "links": list(links), "slot_index": 0}


def _wf(nodes, links, version=0.4):
    return {"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": version}


def test_seed_control_values_are_skipped():
    wf = _wf([
        _node(1, "Loader", outputs=[_out("MODEL", "MODEL", [1])], widgets=["m2"]),
        _node(2, "Sampler", inputs=[_inp("model", "MODEL", 1), _inp("latent", "LATENT")],
              widgets=[5, "randomize", 30, "ddim", 9, "increment", 0.25]),
    ], [[1, 1, 0, 2, 0, "MODEL"]])
    assert ui_to_api(wf, FAKE) == {
        "1": {"inputs": {"name": "m2"}, "class_type": "Loader"},
        "2": {"inputs": {"seed": 5, "steps": 30, "sampler_name": "ddim", "noise_seed": 9, "strength": 0.25,
                         "model": ["1", 0]}, "class_type": "Sampler"},
    }


def test_control_after_generate_option_and_combo_filter():
    wf = _wf([_node(1, "Custom", widgets=[3, "fixed", "b", "increment", "", "hello", True]),
              _node(2, "V3Combo", widgets=["y", "randomize", "", 4])], [])
    assert ui_to_api(wf, FAKE) == {
        "1": {"inputs": {"count": 3, "mode": "b", "text": "hello", "flag": True}, "class_type": "Custom"},
        "2": {"inputs": {"choice": "y", "after": 4}, "class_type": "V3Combo"},
    }


def test_seed_without_control_value_is_not_misaligned():
    # API-generated UI files sometimes omit the control value; only control strings are skipped.
    values = map_widget_values(FAKE["Sampler"].INPUT_TYPES(), [5, 30, "euler", 1, 0.5])
    assert values == {"seed": 5, "steps": 30, "sampler_name": "euler", "noise_seed": 1, "strength": 0.5}


def test_force_input_slots_2024_and_2025():
    spec = FAKE["Forced"].INPUT_TYPES()
    assert map_widget_values(spec, [1, 2.5, "s"]) == {"a": 1, "b": 2.5, "c": "s"}  # 2024: hidden widget kept
    assert map_widget_values(spec, [1, "s"]) == {"a": 1, "c": "s"}  # 2025: no widget for forceInput


def test_dict_widget_values():
    wf = _wf([_node(1, "Custom", widgets={"count": 2, "mode": "c", "text": "t", "flag": False, "junk": 1})], [])
    assert ui_to_api(wf, FAKE)["1"]["inputs"] == {"count": 2, "mode": "c", "text": "t", "flag": False}


def test_linked_widget_input_wins_and_keeps_its_slot():
    wf = _wf([
        _node(1, "Source", outputs=[_out("INT", "INT", [1])], widgets=[11]),
        _node(2, "Sampler", inputs=[_inp("model", "MODEL"), _inp("latent", "LATENT"),
                                    _inp("seed", "INT", 1, widget="seed")],
              widgets=[5, "fixed", 30, "euler", 0, "fixed", 1.0]),
    ], [[1, 1, 0, 2, 2, "INT"]])
    assert ui_to_api(wf, FAKE)["2"]["inputs"] == {"seed": ["1", 0], "steps": 30, "sampler_name": "euler",
                                                  "noise_seed": 0, "strength": 1.0}


def test_primitive_node_sets_target_widget():
    wf = _wf([
        _node(1, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [1], "widget": {"name": "steps"}}],
              widgets=[12, "fixed"]),
        _node(2, "Sampler", inputs=[_inp("steps", "INT", 1, widget="steps")],
              widgets=[5, "fixed", 99, "euler", 0, "fixed", 1.0]),
    ], [[1, 1, 0, 2, 0, "INT"]])
    assert ui_to_api(wf, FAKE) == {"2": {"inputs": {"seed": 5, "steps": 12, "sampler_name": "euler",
                                                    "noise_seed": 0, "strength": 1.0}, "class_type": "Sampler"}}


def test_reroute_chain_and_native_reroutes():
    wf = _wf([
        _node(1, "Loader", outputs=[_out("MODEL", "MODEL", [1])], widgets=["m1"]),
        _node(2, "Reroute", inputs=[_inp("", "*", 1)], outputs=[_out("", "MODEL", [2])]),
        _node(3, "Reroute", inputs=[_inp("", "*", 2)], outputs=[_out("", "MODEL", [3])]),
        _node(4, "Sampler", inputs=[_inp("model", "MODEL", 3)], widgets=[1, "fixed", 2, "euler", 3, "fixed", 1.0]),
    ], [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], {"id": 3, "origin_id": 3, "origin_slot": 0,
                                                             "target_id": 4, "target_slot": 0, "type": "MODEL",
                                                             "parentId": 7}])
    wf["extra"] = {"reroutes": [{"id": 7, "pos": [0, 0], "linkIds": [3]}]}
    api = ui_to_api(wf, FAKE)
    assert set(api) == {"1", "4"}
    assert api["4"]["inputs"]["model"] == ["1", 0]


def test_bypass_passes_matching_type_through():
    # Pass has inputs (IMAGE, LATENT) and is bypassed; its LATENT output at slot 0 must map to input 1.
    wf = _wf([
        _node(1, "Source", outputs=[_out("LATENT", "LATENT", [1])], widgets=[0]),
        _node(2, "Pass", mode=4, inputs=[_inp("image", "IMAGE"), _inp("latent", "LATENT", 1)],
              outputs=[_out("LATENT", "LATENT", [2]), _out("IMAGE", "IMAGE", [3])], widgets=[0.5]),
        _node(3, "Sink", inputs=[_inp("latent", "LATENT", 2), _inp("image", "IMAGE", 3)]),
    ], [[1, 1, 0, 2, 1, "LATENT"], [2, 2, 0, 3, 0, "LATENT"], [3, 2, 1, 3, 1, "IMAGE"]])
    # IMAGE has no connected counterpart on the bypassed node, so that input is dropped.
    assert ui_to_api(wf, FAKE) == {
        "1": {"inputs": {"x": 0}, "class_type": "Source"},
        "3": {"inputs": {"latent": ["1", 0]}, "class_type": "Sink"},
    }


def test_muted_nodes_and_dangling_links_are_removed():
    wf = _wf([
        _node(1, "Source", mode=2, outputs=[_out("LATENT", "LATENT", [1])], widgets=[0]),
        _node(2, "Sink", inputs=[_inp("latent", "LATENT", 1), _inp("image", "IMAGE", 42)]),
        _node(3, "NotInstalled", mode=2, widgets=[1]),  # muted unknown nodes are fine
        _node(4, "Note", widgets=["hello"]),
        _node(5, "MarkdownNote", widgets=["# hi"]),
    ], [[1, 1, 0, 2, 0, "LATENT"]])
    assert ui_to_api(wf, FAKE) == {"2": {"inputs": {}, "class_type": "Sink"}}


def test_unknown_node_type_error():
    wf = _wf([_node(7, "PersonalizeDoesNotExist", widgets=[1])], [])
    with pytest.raises(MissingNodeTypeError, match=r"missing node type 'PersonalizeDoesNotExist' \(node 7\) — "
                                                   r"is the pack installed\?"):
        ui_to_api(wf, FAKE)


def test_subgraphs_are_rejected_clearly():
    wf = _wf([_node(1, "a1b2c3d4-0000-4000-8000-000000000000")], [])
    wf["definitions"] = {"subgraphs": [{"id": "a1b2c3d4-0000-4000-8000-000000000000", "nodes": [], "links": []}]}
    with pytest.raises(WorkflowConversionError, match="subgraph"):
        ui_to_api(wf, FAKE)


def test_api_prompt_passes_through_unchanged():
    prompt = {"1": {"class_type": "Source", "inputs": {"x": 1}}}
    converted = ui_to_api(copy.deepcopy(prompt), FAKE)
    assert converted == prompt and converted is not prompt


def test_object_info_can_replace_class_mappings():
    object_info = {"Sampler": {"input": {"required": {"seed": ["INT", {}], "steps": ["INT", {}]}}}}
    wf = _wf([_node(1, "Sampler", widgets=[3, "randomize", 4])], [])
    assert ui_to_api(wf, object_info=object_info) == {"1": {"inputs": {"seed": 3, "steps": 4},
                                                            "class_type": "Sampler"}}


def test_script_overrides_replace_numeric_fields_only():
    """Scripts' ``--set FIELD=VALUE`` (harness.host.replace_numeric): ints stay ints, tuples of whole numbers are
    written comma-separated, unknown or non-numeric fields and non-numbers are errors that list the allowed
    fields."""
    import dataclasses

    from harness.host import replace_numeric

    @dataclasses.dataclass
    class Cfg:
        steps: int = 10
        lr: float = 1e-3
        name: str = "a"
        mult: tuple = (1, 1, 2, 2)

    out = replace_numeric(Cfg(), ["steps=2e3", "lr=0.5", "mult=1,2,4,4"])
    assert out == Cfg(steps=2000, lr=0.5, name="a", mult=(1, 2, 4, 4)) and isinstance(out.steps, int)
    assert replace_numeric(Cfg(), ["mult=3"]).mult == (3,)
    assert replace_numeric(Cfg(), []) == Cfg()
    with pytest.raises(ValueError, match="one of steps, lr, mult"):
        replace_numeric(Cfg(), ["name=b"])
    with pytest.raises(ValueError, match="not a number"):
        replace_numeric(Cfg(), ["steps=many"])
    with pytest.raises(ValueError, match="comma-separated"):
        replace_numeric(Cfg(), ["mult=1,x"])
    with pytest.raises(ValueError, match="mult takes whole numbers"):
        replace_numeric(Cfg(), ["mult=1,2.5"])
    with pytest.raises(ValueError, match="steps takes whole numbers"):
        replace_numeric(Cfg(), ["steps=2.5"])  # not silently truncated to 2

"""The one artefact pattern (core/artifacts.ArtifactKind, networks/base.Network, nodes/artifacts.loader_node): typed
metadata, one folder registration, a generated loader node, and one refusal for a file of the wrong kind, family,
format or content. The HiFi subject loader is generated from it and runs in the shipped workflows."""
from __future__ import annotations

import json
import uuid

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import pack_module


@pytest.fixture(scope="module")
def art(host):
    return pack_module(host, "core.artifacts")


@pytest.fixture(scope="module")
def err(host):
    return pack_module(host, "core.host").PersonalizeError


@pytest.fixture(scope="module")
def toy_kind(host, art, tmp_path_factory):
    shipped = tmp_path_factory.mktemp("shipped_toys")
    folder = host.model_folder("personalize_test_toys")  # the session's models dir, registered first
    kind = art.kind(kind="test_toy", title="toy network", folder="personalize_test_toys", made_by="the toy trainer",
                    subdir=("personalize", "test_toys"), shipped=shipped)
    kind.register()
    return kind, folder, shipped


@pytest.fixture(scope="module")
def Toy(host, toy_kind):
    base = pack_module(host, "networks.base")

    class Toy(base.Network):
        kind = toy_kind[0]

        def __init__(self, *, family=None, width: int = 8, out: int = 4):
            super().__init__(family=family, width=width, out=out)
            self.proj = torch.nn.Linear(width, out)
            self.register_buffer("steps", torch.tensor([3], dtype=torch.int64))

        def forward(self, x):
            return self.proj(x)

    return Toy


def _name(stem="toy") -> str:
    return f"{stem}_{uuid.uuid4().hex[:8]}.safetensors"


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_network_round_trip_fp16_with_typed_metadata(Toy, toy_kind):
    kind, folder, _ = toy_kind
    torch.manual_seed(0)
    net = Toy(family="sd1", width=6, out=3)
    path = net.save(kind.target(_name()))
    assert path.parent == folder.resolve()
    meta = _meta(path)
    assert meta["personalize.kind"] == "test_toy" and meta["personalize.family"] == "sd1"
    assert json.loads(meta["personalize.widths"]) == {"width": 6, "out": 3}
    assert meta["personalize.format"] == "1" and len(meta["personalize.checksum"]) == 64
    back = Toy.load(path.name, family="sd1")
    assert back.config == {"width": 6, "out": 3} and back.family == "sd1"
    # fp16 on disk: the reloaded weights are the fp16 rounding of the originals, the int buffer is exact
    torch.testing.assert_close(back.proj.weight, net.proj.weight.half().float(), rtol=0, atol=0)
    assert back.steps.dtype == torch.int64 and int(back.steps) == 3
    x = torch.randn(2, 6)
    torch.testing.assert_close(back(x), torch.nn.functional.linear(x, net.proj.weight.half().float(),
                                                                   net.proj.bias.half().float()))


def test_checksum_is_independent_of_order_and_sees_every_byte(art):
    a = {"x": torch.arange(4.0), "y": torch.ones(2, dtype=torch.float16)}
    b = {"y": torch.ones(2, dtype=torch.float16), "x": torch.arange(4.0)}
    assert art.tensor_checksum(a) == art.tensor_checksum(b)
    c = {"x": torch.arange(4.0), "y": torch.tensor([1.0, 1.0009765625], dtype=torch.float16)}  # one ulp
    assert art.tensor_checksum(a) != art.tensor_checksum(c)
    assert art.tensor_checksum({"x": torch.zeros(2, 2)}) != art.tensor_checksum({"x": torch.zeros(4)})
    scalar = {"alpha": torch.tensor(4.0, dtype=torch.float16)}  # kohya LoRAs carry 0-d alphas
    assert art.tensor_checksum(scalar) != art.tensor_checksum({"alpha": torch.tensor(2.0, dtype=torch.float16)})


def test_one_refusal_for_wrong_kind_family_format_content_and_shape(Toy, toy_kind, host, err):
    kind, folder, _ = toy_kind
    hifi = pack_module(host, "methods.hifi_tuner")
    net = Toy(family="sd1")
    good = net.save(kind.target(_name()))
    # another kind: named, with the node that writes what the user asked for
    subject = hifi.SUBJECT_FILE.save({"rows": torch.zeros(1, 5, 8)}, folder / _name("subject"), family="sd1")
    with pytest.raises(err, match=r"is not a toy network file: it is a HiFi subject file \(written by HiFi Subject "
                                  r"Tune\)\. Load a file written by the toy trainer"):
        Toy.load(subject.name)
    plain = folder / _name("plain")
    save_file({"proj.weight": torch.zeros(4, 8)}, str(plain))
    with pytest.raises(err, match="it is a file without Personalize metadata"):
        Toy.load(plain.name)
    # another family
    with pytest.raises(err, match=r"trained on SD1.x but is used with SD2.x.*retrain it with the toy trainer"):
        Toy.load(good.name, family="sd2")
    # a newer format than this code reads
    tensors = {k: v for k, v in _tensors(good).items()}
    newer = folder / _name("newer")
    save_file(tensors, str(newer), metadata={**_meta(good), "personalize.format": "2"})
    with pytest.raises(err, match="format 2; this version of the pack reads up to format 1. Update"):
        Toy.load(newer.name)
    # tensors changed after saving
    damaged = folder / _name("damaged")
    tensors["proj.bias"] = tensors["proj.bias"] + 1
    save_file(tensors, str(damaged), metadata=_meta(good))
    with pytest.raises(err, match="is damaged .*checksum"):
        Toy.load(damaged.name)
    # widths that do not fit the tensors
    wrong = folder / _name("wrong")
    t = _tensors(good)
    save_file(t, str(wrong), metadata={**_meta(good), "personalize.widths": json.dumps({"width": 5, "out": 4})})
    with pytest.raises(err, match=r"does not fit the Toy its widths describe \(shape: proj.weight\)"):
        Toy.load(wrong.name)
    with pytest.raises(err, match="File not found"):
        Toy.load("nothing_here.safetensors")


def _tensors(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_folder_registration_keeps_a_users_entry_and_adds_the_shipped_folder(host, art, tmp_path):
    fp = host.folder_paths
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    user.mkdir()
    name = f"personalize_test_reg_{uuid.uuid4().hex[:6]}"
    kind = art.ArtifactKind(kind=name, title="test", folder=name, made_by="test", subdir=("personalize", name),
                            shipped=shipped)
    try:
        fp.add_model_folder_path(name, str(user))  # as extra_model_paths.yaml does: no extensions
        kind.register()
        kind.register()  # idempotent
        paths, exts = fp.folder_names_and_paths[name]
        assert paths == [str(user), str(shipped)] and exts == {".safetensors"}
        assert kind.write_dir() == user  # never into the pack's shipped files
        (shipped / "pretrained.safetensors").write_bytes(b"")
        (user / "mine.safetensors").write_bytes(b"")
        (user / "notes.txt").write_text("")
        host.refresh_model_lists()
        assert sorted(kind.filenames()) == ["mine.safetensors", "pretrained.safetensors"]
    finally:
        fp.folder_names_and_paths.pop(name, None)
    try:
        fresh = art.ArtifactKind(kind=name, title="test", folder=name, made_by="test", subdir=("personalize", name),
                                 shipped=shipped)
        fresh.register()
        assert fp.folder_names_and_paths[name][0] == [str(shipped), str(fp.models_dir) + f"/personalize/{name}"]
    finally:
        fp.folder_names_and_paths.pop(name, None)


def test_generated_loader_node(Toy, toy_kind, host):
    loaders = pack_module(host, "nodes.artifacts")
    from comfy_api.v0_0_2 import io
    kind, folder, _ = toy_kind
    node = loaders.loader_node(kind, node_id="PersonalizeTestToyLoader", display_name="Load Toy",
                               category="personalize/test", description="test", input_name="toy_file",
                               override_name="toy_file_name", output=io.Custom("TEST_TOY").Output(),
                               load=lambda name: Toy.load(name))
    path = Toy(family="sd1").save(kind.target(_name()))
    host.refresh_model_lists()
    schema = node.define_schema()
    assert [i.id for i in schema.inputs] == ["toy_file", "toy_file_name"]
    assert path.name in schema.inputs[0].options and schema.inputs[1].optional
    assert node.validate_inputs(toy_file="../escape.safetensors") is not True
    assert node.validate_inputs(toy_file="written_later_in_this_run.safetensors") is True
    before = node.fingerprint_inputs(toy_file=path.name)
    assert before and node.fingerprint_inputs(toy_file="x", toy_file_name=path.name) == before
    Toy(family="sd1", width=3).save(path, overwrite=True)
    assert node.fingerprint_inputs(toy_file=path.name) != before
    out = node.execute(toy_file="ignored", toy_file_name=path.name)
    assert out.result[0].config == {"width": 3, "out": 4}


def test_every_pack_file_kind_is_declared_once_with_a_writer(host, art):
    kinds = {k.kind: k for k in art.registered_kinds() if not k.kind.startswith("test_")}
    assert {"hifi_subject", "embedding", "lora"} <= set(kinds)
    assert kinds["embedding"].stock and kinds["lora"].stock and not kinds["hifi_subject"].stock
    for k in kinds.values():
        if not k.stock:
            assert k.folder in host.folder_paths.folder_names_and_paths  # registered when the pack loaded
    with pytest.raises(ValueError, match="declared twice"):
        art.kind(kind="hifi_subject", title="again", folder="x", made_by="y")


def test_a_subject_file_written_before_personalize_kind_still_loads(host, err):
    hifi = pack_module(host, "methods.hifi_tuner")
    folder = host.model_folder("personalize_subjects")
    path = folder / _name("legacy_subject")
    rows = torch.randn(2, 5, 768)
    save_file({"rows": rows, "null_tail": rows[0].clone(), "timesteps": torch.tensor([500]), "sigmas": torch.tensor([1.0]),
               "percents": torch.tensor([0.5], dtype=torch.float64)}, str(path),
              metadata={"personalize.format": "1", "personalize.method": "hifi_tuner", "personalize.family": "sd1",
                        "personalize.caption": "a photo of a dog"})
    host.refresh_model_lists()
    subject = hifi.load_subject(path.name, family="sd1")
    assert subject.caption == "a photo of a dog" and subject.timesteps == [500] and subject.family == "sd1"
    torch.testing.assert_close(subject.rows, rows)

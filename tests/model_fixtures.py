"""Session fixtures for the pack's tests: loaded fixture models and subject photos in ComfyUI's input folder.

Registered from conftest.py via ``pytest_plugins``. Builds on the harness fixtures ``host`` and ``ckpt_*``.
"""
from __future__ import annotations

import uuid

import pytest

from helpers import load_checkpoint, save_png, subject_images


@pytest.fixture(scope="session")
def sd15(host, ckpt_sd15):
    return load_checkpoint(ckpt_sd15)


@pytest.fixture(scope="session")
def sd2(host, ckpt_sd2):
    return load_checkpoint(ckpt_sd2)


@pytest.fixture(scope="session")
def sdxl(host, ckpt_sdxl):
    return load_checkpoint(ckpt_sdxl)


@pytest.fixture(scope="session")
def subject():
    """(images [3,64,64,3], masks [3,64,64])."""
    return subject_images(3, 64)


@pytest.fixture(scope="session")
def demo_subject_folder(host):
    """Subject folders in the input directory: the synthetic SD-fixture subject, and the held-out mini-world subject
    under the names the V1 workflows read (tests/data/workflows_v1). The shipped workflows need neither: they read
    the pack's own subjects/ (Load Subject Images looks there when the input directory has no such folder)."""
    from harness.subjects import write_heldout_subject_folder, write_subject_folder
    write_heldout_subject_folder(host.input_dir)
    return write_subject_folder(host.input_dir)


@pytest.fixture(scope="session")
def subject_files(host, subject):
    """The subject photos and masks as PNGs in the host's input folder, the names the workflows use."""
    images, masks = subject
    names = []
    for i in range(images.shape[0]):
        save_png(images[i], host.input_dir / f"personalize_subject_{i + 1}.png")
        save_png(masks[i][..., None].expand(-1, -1, 3), host.input_dir / f"personalize_subject_{i + 1}_mask.png")
        names.append(f"personalize_subject_{i + 1}.png")
    return names


@pytest.fixture
def unique_name():
    """A fresh artefact name per test, so tests never collide on files."""
    return lambda prefix="t": f"{prefix}_{uuid.uuid4().hex[:8]}"


MINI_TEST_CKPT = "personalize_test_mini.safetensors"


@pytest.fixture(scope="session")
def ckpt_mini(host) -> str:
    """A freshly initialised (untrained) mini-family file in the session's personalize_mini folder: the loader's
    and the workflows' code path without the trained weights."""
    from helpers import pack_module
    mf = pack_module(host, "core.mini_family")
    tf = pack_module(host, "miniworld.train_family")
    path = host.model_folder("personalize_mini") / MINI_TEST_CKPT
    if not path.exists():
        model, clip, vae = mf.build(seed=0)
        mf.save_checkpoint(path, model, clip, vae, tf.token_ids_of_world(clip), 0.5)
        host.refresh_model_lists()
    return MINI_TEST_CKPT

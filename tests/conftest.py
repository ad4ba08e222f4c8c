"""Session fixtures: one booted ComfyUI host per test session, tiny checkpoints, workflow runners, HTTP server.

The host tree is ``$COMFYUI_PATH`` (set by ``make test``), else ``<repo>/.hosts/comfyui-v0.3.75`` (``make host`` builds
it). Tiny random checkpoints are built lazily by ``harness.fixtures.ensure_checkpoint`` (cached in
``<repo>/.cache/fixtures``) and symlinked into the session's ``models/checkpoints`` as
``personalize_test_<kind>.safetensors``; only the kinds a test asks for are built.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import DEFAULT_HOST_PATH, REPO_ROOT  # pytest.ini: `pythonpath = .pythonpath` (never the repo root)
from harness.fixtures import default_cache_dir

FIXTURE_CACHE_DIR = default_cache_dir()  # $PERSONALIZE_FIXTURES_DIR or <repo>/.cache/fixtures

CHECKPOINT_KINDS = ("sd15", "sd2", "sdxl")


def checkpoint_filename(kind: str) -> str:
    return f"personalize_test_{kind}.safetensors"


def _host_path() -> Path:
    raw = os.environ.get("COMFYUI_PATH") or str(DEFAULT_HOST_PATH)
    path = Path(raw)
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path.resolve()


def pytest_report_header(config):
    return f"ComfyUI host: {_host_path()}"


@pytest.fixture(scope="session")
def comfy_dirs(tmp_path_factory) -> dict:
    """Session directories: models (with the standard subfolders), output, input, temp."""
    base = tmp_path_factory.mktemp("comfy")
    dirs = {name: base / name for name in ("models", "output", "input", "temp")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return dirs


@pytest.fixture(scope="session")
def host(comfy_dirs):
    """The booted ComfyUI host (``harness.host.Host``) with the pack loaded by ComfyUI's own loader."""
    from harness.host import boot

    return boot(
        _host_path(),
        models_dir=comfy_dirs["models"],
        output_dir=comfy_dirs["output"],
        input_dir=comfy_dirs["input"],
        temp_dir=comfy_dirs["temp"],
    )


@pytest.fixture(scope="session")
def checkpoint(host):
    """``checkpoint(kind) -> file name`` usable as ``ckpt_name``; builds/caches the tiny checkpoint on demand."""
    from harness.fixtures import ensure_checkpoint

    names: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {CHECKPOINT_KINDS}")
        if kind not in names:
            source = ensure_checkpoint(kind, FIXTURE_CACHE_DIR)
            link = host.model_folder("checkpoints") / checkpoint_filename(kind)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(source).resolve())
            host.refresh_model_lists()
            names[kind] = link.name
        return names[kind]

    return get


@pytest.fixture(scope="session")
def ckpt_sd15(checkpoint) -> str:
    return checkpoint("sd15")


@pytest.fixture(scope="session")
def ckpt_sd2(checkpoint) -> str:
    return checkpoint("sd2")


@pytest.fixture(scope="session")
def ckpt_sdxl(checkpoint) -> str:
    return checkpoint("sdxl")


@pytest.fixture(scope="session")
def run_workflow(host):
    """``run_workflow(api_prompt, expect_error=False, **kw) -> RunResult``.

    Fails the test with ComfyUI's error message (and traceback) when execution fails, unless ``expect_error``;
    with ``expect_error`` a successful run fails the test. Validation errors raise ``WorkflowValidationError``.
    Extra keyword arguments go to ``harness.executor.run_api_prompt``.
    """
    from harness.executor import run_api_prompt

    def run(prompt: dict, *, expect_error: bool = False, **kw):
        result = run_api_prompt(prompt, **kw)
        if expect_error:
            if result.success:
                pytest.fail(f"expected prompt {result.prompt_id} to fail, but it succeeded")
        elif not result.success:
            pytest.fail(f"workflow failed: {result.error_message()}", pytrace=False)
        return result

    return run


@pytest.fixture(scope="session")
def run_ui_workflow(host, run_workflow):
    """``run_ui_workflow(path_or_dict, expect_error=False, **kw)``: convert a UI-format workflow, then run it
    (the UI JSON goes into ``extra_pnginfo["workflow"]`` like the frontend does)."""
    from harness.ui_convert import load_workflow, ui_to_api

    def run(path_or_dict, **kw):
        workflow = path_or_dict if isinstance(path_or_dict, dict) else load_workflow(path_or_dict)
        prompt = ui_to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
        kw.setdefault("extra_pnginfo", {"workflow": workflow})
        return run_workflow(prompt, **kw)

    return run


@pytest.fixture(scope="session")
def comfy_server(host, comfy_dirs):
    """A real ComfyUI server (``python main.py``) on the same tree, models, custom_nodes and output directory."""
    from harness.server import ComfyServer

    server = ComfyServer(
        host.path,
        custom_nodes_dir=host.custom_nodes_dir,
        models_dir=comfy_dirs["models"],
        output_dir=comfy_dirs["output"],
        input_dir=comfy_dirs["input"],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Model, subject and naming fixtures of the pack's own tests.
from model_fixtures import ckpt_mini, demo_subject_folder, sd2, sd15, sdxl, subject, subject_files, unique_name  # noqa: E402,F401

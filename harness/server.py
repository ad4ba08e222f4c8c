"""Run a real ComfyUI server (``python main.py``) as a subprocess and drive it over HTTP (urllib only).

The server listens on 127.0.0.1 only, on a free port, with ``--cpu`` and an extra-model-paths YAML that registers
the harness' model folders and the custom_nodes directory holding the pack symlink (see ``harness.host``). Every flag
used here exists in both supported hosts (v0.3.75, v0.3.64).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from .executor import WorkflowValidationError
from .host import PACK_LINK_NAME

log = logging.getLogger(__name__)

_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The server failed to start, died, or a request failed."""


class RemoteExecutionError(RuntimeError):
    """The prompt ran on the server and ended with an error status."""

    def __init__(self, prompt_id: str, entry: dict):
        self.prompt_id = prompt_id
        self.entry = entry
        messages = (entry.get("status") or {}).get("messages") or []
        error = next((data for event, data in messages if event == "execution_error"), None)
        if error:
            text = (f"node {error.get('node_id')} ({error.get('node_type')}) raised {error.get('exception_type')}: "
                    f"{error.get('exception_message')}")
        else:
            text = f"status {(entry.get('status') or {}).get('status_str')!r}"
        super().__init__(f"prompt {prompt_id} failed on the server: {text}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _yaml_quote(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


class ComfyServer:
    """``with ComfyServer(path, custom_nodes_dir=..., models_dir=..., output_dir=...) as srv: srv.run(prompt)``."""

    def __init__(
        self,
        comfyui_path: str | os.PathLike,
        *,
        custom_nodes_dir: str | os.PathLike,
        models_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        input_dir: str | os.PathLike | None = None,
        port: int | None = None,
        startup_timeout: float = 120.0,
        python: str | None = None,
        extra_args: list[str] | None = None,
        isolate_custom_nodes: bool = True,
    ):
        self.comfyui_path = Path(comfyui_path).resolve()
        self.custom_nodes_dir = Path(custom_nodes_dir).resolve()
        self.models_dir = Path(models_dir).resolve()
        self.output_dir = Path(output_dir).resolve()
        self.input_dir = Path(input_dir).resolve() if input_dir else None
        self.port = port
        self.startup_timeout = startup_timeout
        self.python = python or sys.executable
        self.extra_args = list(extra_args or [])
        self.isolate_custom_nodes = isolate_custom_nodes
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.start_seconds: float | None = None
        self._log_file = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        assert self.workdir is not None and self.port is not None
        from .host import host_device
        cpu = ["--cpu"] if host_device() == "cpu" else []
        cmd = [self.python, str(self.comfyui_path / "main.py"), *cpu, "--listen", "127.0.0.1",
               "--port", str(self.port),
               "--extra-model-paths-config", str(self.workdir / "extra_model_paths.yaml"),
               "--output-directory", str(self.output_dir), "--disable-auto-launch",
               "--temp-directory", str(self.workdir), "--disable-api-nodes",
               "--user-directory", str(self.workdir / "user"),
               "--database-url", f"sqlite:///{self.workdir / 'comfyui.db'}"]
        if cpu:
            cmd.append("--fp32-text-enc")
        if self.input_dir is not None:
            cmd += ["--input-directory", str(self.input_dir)]
        if self.isolate_custom_nodes:
            # Load only the pack from the tree's custom_nodes folders (the tree may hold other packs).
            cmd += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_LINK_NAME]
        return cmd + self.extra_args

    def _write_model_paths(self) -> Path:
        assert self.workdir is not None
        lines = ["personalize_harness:", f"  base_path: {_yaml_quote(str(self.models_dir))}"]
        # is_default: the harness' folders come first, so files the server writes (LoRAs, embeddings, subjects) land
        # there and never in the host tree's own models/.
        lines.append("  is_default: true")
        folders = sorted(p.name for p in self.models_dir.iterdir() if p.is_dir()) if self.models_dir.is_dir() else []
        for name in folders:
            lines.append(f"  {name}: {_yaml_quote(str(self.models_dir / name))}")
        lines.append(f"  custom_nodes: {_yaml_quote(str(self.custom_nodes_dir))}")
        path = self.workdir / "extra_model_paths.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def start(self) -> "ComfyServer":
        if self.process is not None:
            return self
        self.workdir = Path(tempfile.mkdtemp(prefix="personalize_server_"))
        (self.workdir / "user").mkdir()
        self.port = self.port or free_port()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._write_model_paths()
        self.log_path = self.workdir / "server.log"
        self._log_file = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("COMFYUI_PATH", None)
        cmd = self.command()
        log.info("starting ComfyUI server: %s", " ".join(cmd))
        started = time.perf_counter()
        self.process = subprocess.Popen(cmd, cwd=str(self.comfyui_path), stdout=self._log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - started
        log.info("ComfyUI server ready on %s after %.1fs", self.base_url, self.start_seconds)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI server exited with code {self.process.returncode} during startup:\n"
                                  f"{self.log_tail()}")
            try:
                self._request("GET", "/object_info/CheckpointLoaderSimple", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ServerError):
                time.sleep(0.5)
        raise ServerError(f"ComfyUI server did not answer /object_info within {self.startup_timeout:.0f}s:\n"
                          f"{self.log_tail()}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.workdir is not None and self.workdir.is_dir():
            keep = self.workdir / "server.log"
            if keep.exists():  # keep the log readable after stop (copy next to the output dir's temp)
                try:
                    self._last_log = keep.read_text(encoding="utf-8", errors="replace")
                except OSError:
                    self._last_log = ""
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        text = ""
        if self.log_path is not None and self.log_path.exists():
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        else:
            text = getattr(self, "_last_log", "")
        return "\n".join(text.splitlines()[-lines:])

    # -- HTTP -----------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        with _NO_PROXY_OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
        if "json" in ctype:
            return json.loads(raw.decode("utf-8")) if raw else None
        return raw

    def object_info(self, node_class: str | None = None) -> dict:
        path = "/object_info" if node_class is None else f"/object_info/{urllib.parse.quote(node_class)}"
        return self._request("GET", path)

    def submit(self, api_prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt id. HTTP 400 raises WorkflowValidationError with node_errors."""
        body = {"prompt": api_prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            answer = self._request("POST", "/prompt", body)
        except urllib.error.HTTPError as exc:
            payload = exc.read().decode("utf-8", errors="replace")
            try:
                parsed = json.loads(payload)
            except ValueError:
                raise ServerError(f"POST /prompt failed with HTTP {exc.code}: {payload}") from exc
            raise WorkflowValidationError(parsed.get("error"), parsed.get("node_errors"), api_prompt) from exc
        if answer.get("node_errors"):
            log.warning("server accepted prompt %s with node_errors %s", answer.get("prompt_id"),
                        answer["node_errors"])
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        data = self._request("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        return (data or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll GET /history/{id} until the entry appears (it is written when the prompt finishes)."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                return entry
            if self.process is None or self.process.poll() is not None:
                raise ServerError(f"ComfyUI server died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, api_prompt: dict, extra_data: dict | None = None, timeout: float = 300.0) -> dict:
        """Submit, wait, and raise RemoteExecutionError unless the history status is success."""
        prompt_id = self.submit(api_prompt, extra_data)
        entry = self.wait(prompt_id, timeout)
        status = entry.get("status") or {}
        if status.get("status_str") not in (None, "success") or status.get("completed") is False:
            raise RemoteExecutionError(prompt_id, entry)
        return entry

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self._request("GET", f"/view?{query}")

    def get(self, path: str) -> Any:
        """GET ``path`` (``/api/...`` or the legacy route): parsed JSON, or the raw bytes of anything else."""
        return self._request("GET", path)

    def set_setting(self, key: str, value: Any) -> None:
        """POST /settings/{key}: a user setting the frontend reads at start-up (``Comfy.TutorialCompleted``...)."""
        self._request("POST", f"/settings/{urllib.parse.quote(key)}", value)

    def status_of(self, path: str) -> int:
        """The HTTP status of GET ``path`` (200, 404, ...), for probing which routes the server has."""
        try:
            with _NO_PROXY_OPENER.open(urllib.request.Request(self.base_url + path), timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", {})


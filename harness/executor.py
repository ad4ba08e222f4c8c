"""Run API-format prompts through the booted host's own ``execution.PromptExecutor`` (no HTTP server).

docs/comfyui-host.md section 9.2: validate with ``await execution.validate_prompt(prompt_id, prompt, None)``, then
execute with a stub server object. Outputs come from ``PromptExecutor.history_result["outputs"]``.
"""
from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import host as host_mod

log = logging.getLogger(__name__)


class WorkflowValidationError(ValueError):
    """ComfyUI rejected the prompt (what the server answers with HTTP 400)."""

    def __init__(self, error: dict | None, node_errors: dict | None, prompt: dict | None = None):
        self.error = error or {}
        self.node_errors = node_errors or {}
        super().__init__(format_validation_error(self.error, self.node_errors, prompt))


class WorkflowExecutionError(RuntimeError):
    """A node raised while the prompt executed (``execution_error``)."""

    def __init__(self, result: "RunResult"):
        self.result = result
        super().__init__(result.error_message())


def format_validation_error(error: dict, node_errors: dict, prompt: dict | None = None) -> str:
    lines = [str(error.get("message") or "prompt failed validation")]
    if error.get("details") and not node_errors:
        lines.append(f"  {error['details']}")
    for node_id, info in sorted((node_errors or {}).items(), key=lambda kv: str(kv[0])):
        class_type = info.get("class_type") or (prompt or {}).get(node_id, {}).get("class_type", "?")
        for reason in info.get("errors", []):
            detail = reason.get("details") or ""
            lines.append(f"  node {node_id} ({class_type}): {reason.get('message', '')}"
                         + (f": {detail}" if detail else ""))
    return "\n".join(lines)


@dataclass
class RunResult:
    prompt_id: str
    success: bool
    outputs: dict  # node_id -> UI dict ({"images": [{"filename", "subfolder", "type"}, ...]} etc.)
    messages: list  # (event, data) from PromptExecutor.status_messages
    error: dict | None  # the execution_error data, or None
    interrupted: bool = False
    events: list = field(default_factory=list)  # everything sent to the stub server (send_sync)
    node_errors: dict = field(default_factory=dict)  # validation errors of outputs that were dropped
    seconds: float = 0.0

    def error_message(self) -> str:
        if self.interrupted:
            return f"prompt {self.prompt_id} was interrupted"
        if not self.error:
            return "prompt failed without an execution_error message" if not self.success else ""
        e = self.error
        tb = "".join(e.get("traceback") or [])
        return (f"node {e.get('node_id')} ({e.get('node_type')}) raised {e.get('exception_type')}: "
                f"{e.get('exception_message')}" + (f"\n{tb}" if tb else ""))

    def files(self, node_id: str | None = None, kind: str = "images") -> list[Path]:
        """Paths of the files listed under ``kind`` in the UI outputs (of one node, or all)."""
        host = host_mod.current_host()
        if host is None:
            raise RuntimeError("no host booted")
        node_ids = [str(node_id)] if node_id is not None else list(self.outputs)
        return [host.ui_file_path(item) for nid in node_ids
                for item in (self.outputs.get(nid) or {}).get(kind, []) if isinstance(item, dict)]

    def event_names(self) -> list[str]:
        return [event for event, _ in self.messages]


class StubServer:
    """The parts of ``server.PromptServer`` that ``PromptExecutor`` touches."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.events: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))

    def queue_updated(self) -> None:
        pass

    def send_progress_text(self, text, node_id, sid=None) -> None:
        self.events.append(("progress_text", {"node_id": node_id, "text": text}))


_executor = None
_server: StubServer | None = None


def _require_host():
    host = host_mod.current_host()
    if host is None:
        raise RuntimeError("boot the host first (harness.host.boot)")
    return host


def get_executor(*, fresh: bool = False):
    """The process-wide PromptExecutor (kept between prompts so its cache works like the server's)."""
    global _executor, _server
    host = _require_host()
    if _executor is None or fresh:
        _server = StubServer()
        # 2025-12 trees read cache_args["ram"] after every node (main.py passes --cache-lru/--cache-ram defaults)
        params = inspect.signature(host.execution.PromptExecutor.__init__).parameters
        kwargs = {"cache_args": {"lru": 0, "ram": 0}} if "cache_args" in params else {}
        _executor = host.execution.PromptExecutor(_server, **kwargs)
    return _executor, _server


def validate_prompt(prompt: dict, prompt_id: str | None = None) -> tuple[list, dict]:
    """Validate like ``POST /prompt``. Returns (output node ids, node_errors of dropped outputs) or raises."""
    host = _require_host()
    mappings = host.nodes.NODE_CLASS_MAPPINGS
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise WorkflowValidationError({"message": f"node {node_id} has no class_type"}, {}, prompt)
        if node["class_type"] not in mappings:
            raise WorkflowValidationError(
                {"message": f"missing node type {node['class_type']!r} (node {node_id}) — is the pack installed?"},
                {}, prompt)
    valid, error, outputs, node_errors = asyncio.run(
        host.execution.validate_prompt(prompt_id or uuid.uuid4().hex, prompt, None))  # None: every output
    if not valid:
        raise WorkflowValidationError(error, node_errors, prompt)
    return list(outputs), dict(node_errors or {})


def run_api_prompt(
    prompt: dict,
    *,
    extra_pnginfo: dict | None = None,
    prompt_id: str | None = None,
    client_id: str | None = None,
    strict: bool = True,
    fresh_executor: bool = False,
) -> RunResult:
    """Validate and execute an API-format prompt in-process.

    Raises :class:`WorkflowValidationError` when validation fails (with ``strict``, also when only some outputs
    fail validation; ComfyUI's server would silently run the others). Execution errors do not raise: they are
    returned as ``RunResult(success=False, error=<execution_error data>)``.

    ``client_id`` (default None, as documented) makes the executor also send per-node events
    (``executing``, ``executed``, ``progress``) to the stub server; they land in ``RunResult.events``.
    """
    prompt = copy.deepcopy(prompt)
    prompt_id = prompt_id or uuid.uuid4().hex
    outputs, node_errors = validate_prompt(prompt, prompt_id)
    if node_errors and strict:
        raise WorkflowValidationError({"message": "some outputs failed validation"}, node_errors, prompt)

    executor, server = get_executor(fresh=fresh_executor)
    server.events = []
    extra_data: dict = {}
    if extra_pnginfo is not None:
        extra_data["extra_pnginfo"] = extra_pnginfo
    if client_id is not None:
        extra_data["client_id"] = client_id
    server.client_id = client_id
    server.last_prompt_id = prompt_id

    started = time.perf_counter()
    executor.execute(prompt, prompt_id, extra_data, outputs)
    seconds = time.perf_counter() - started

    messages = list(executor.status_messages)
    error = next((data for event, data in messages if event == "execution_error"), None)
    interrupted = any(event == "execution_interrupted" for event, _ in messages)
    ui_outputs = (getattr(executor, "history_result", None) or {}).get("outputs", {})
    result = RunResult(
        prompt_id=prompt_id,
        success=bool(executor.success) and error is None and not interrupted,
        outputs={str(k): v for k, v in copy.deepcopy(dict(ui_outputs)).items()},
        messages=messages,
        error=error,
        interrupted=interrupted,
        events=list(server.events),
        node_errors=node_errors,
        seconds=seconds,
    )
    log.info("prompt %s: success=%s in %.2fs", prompt_id, result.success, seconds)
    return result

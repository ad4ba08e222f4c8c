"""Entry point of ``make bench``: install the benchmark-only requirements once, then run every benchmark.

Run with the venv's python from the repository root (``make bench`` does: ``COMFYUI_PATH=<host> .venv/bin/python
bench/run_all.py``). Arguments are passed to each benchmark (e.g. ``--latents 8 --rounds 4`` for a quick look).

requirements-bench.txt is installed into the running interpreter's environment the first time, and again whenever
it or ``constraints.txt`` changes (a stamp named after their hash is kept in ``sys.prefix``), through the
repository's ``constraints.txt`` (the tested versions, torch included), so nothing the venv holds moves. Each
benchmark runs in its own process, because ComfyUI can be booted only once per process.

The benchmarks put only ``.pythonpath/`` (the harness) on ``sys.path``, never the repository root: the pack's
``kernels/`` would otherwise shadow Hugging Face's ``kernels``, which transformers >= 5 imports (issue #25).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements-bench.txt"
CONSTRAINTS = REPO / "constraints.txt"


def ensure_requirements() -> None:
    constraints = CONSTRAINTS.read_bytes() if CONSTRAINTS.is_file() else b""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + b"\0" + constraints).hexdigest()[:16]
    stamp = Path(sys.prefix) / f".stamp-bench-{digest}"
    if stamp.exists():
        return
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-r", str(REQUIREMENTS)]
    if CONSTRAINTS.is_file():
        cmd += ["-c", str(CONSTRAINTS)]
    print("installing benchmark requirements:", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"could not install {REQUIREMENTS.name}; the benchmark needs diffusers and peft")
    try:
        stamp.touch()
    except OSError:  # read-only environment: install again next time (pip is fast when satisfied)
        pass


def main(argv: list[str]) -> int:
    os.chdir(REPO)
    ensure_requirements()
    sys.path.insert(0, str(REPO / ".pythonpath"))  # `harness` only, never the repo root (see harness/__init__.py)
    __import__("harness").pack_package()  # the pack as the package comfyui_personalize (no ComfyUI needed)
    from comfyui_personalize.miniworld import registry  # each method's rows name the scripts that time its steps
    rc = 0
    for bench in registry.bench_scripts():
        t0 = time.perf_counter()
        print(f"=== {bench}", flush=True)
        env = dict(os.environ)
        # torch's profiler (used for the memory column) warns once about blocks allocated before it started
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        r = subprocess.run([sys.executable, bench, *argv], env=env)
        print(f"=== {bench}: exit {r.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
        rc = rc or r.returncode
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

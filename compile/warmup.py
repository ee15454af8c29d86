"""The compile stages' engine warm-up: ``python -m runtime.warmup`` in a child process, watched and stopped.

A compiler whose output is filled by the engine itself (vLLM's torch.compile cache, TensorRT-LLM's autotuner
cache) starts the runtime's own warm-up on the checkpoint. The warm-up derives the engine settings with the function
``serve`` uses and calls the engine's ``compile.warm_up`` hook, so the cache it fills is the one serving looks up.
It runs from the stage's interpreter (the toolchain's Python, which has the engine) in its own process group, so a
timeout or an interrupt stops the engine's processes too; its log is kept under the kiln cache when it fails.

This module imports only ``artifacts/``: the runtime is started as a program, never imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from artifacts.errors import StageError
from artifacts.paths import cache_root

log = logging.getLogger("kiln.compile.warmup")
REPO_ROOT = Path(__file__).resolve().parents[1]  # the runtime's warm-up is started from this checkout


def run(
    out: Path,
    target: Mapping[str, Any],
    serving: Mapping[str, Any],
    *,
    engine: str,
    cache_dir: Path,
    device: str,
    timeout_s: float,
    log_path: Path,
    fix: str,
    options: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Warm ``engine`` (its name for messages) up on the checkpoint in ``out`` into ``cache_dir``; return the
    warm-up's report (``key``: this host's compile key). Raises StageError naming ``compile.timeout_s`` on a
    timeout, with ``fix`` on a failure."""
    report = out.parent / "warmup.json"
    cmd = [sys.executable, "-m", "runtime.warmup", str(out), "--target", json.dumps(dict(target))]
    cmd += ["--serving", json.dumps(dict(serving)), "--cache-dir", str(cache_dir), "--report", str(report)]
    for option in options or []:
        cmd += ["--option", option]
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    child_env = dict(os.environ, PYTHONPATH=path) | dict(env or {})
    child_env.setdefault("KILN_LOG_FORMAT", "text")
    if device == "cpu":  # the runtime would pick a GPU where it sees one: hide it, the cache is for the CPU
        child_env["CUDA_VISIBLE_DEVICES"] = ""
    print(f"kiln: compile: starting {engine} on {device} to warm the model up", file=sys.stderr)
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env, cwd=REPO_ROOT, start_new_session=True
        )
        try:
            _wait(proc, start, timeout_s, engine)
        except subprocess.TimeoutExpired:
            raise StageError(
                "compile",
                f"the {engine} warm-up did not finish within {timeout_s}s (log: {_keep_log(log_path)})",
                key="compile.timeout_s",
                fix="raise compile.timeout_s",
            ) from None
        finally:
            _stop_group(proc)
    data: dict[str, Any] = json.loads(report.read_text()) if report.is_file() else {}
    if proc.returncode != 0 or "key" not in data:
        why = data.get("error", "no report")
        kept = _keep_log(log_path)
        raise StageError(
            "compile", f"the {engine} warm-up failed (exit code {proc.returncode}): {why} (log: {kept})", fix=fix
        )
    for err in data.get("request_errors", []):
        log.warning("compile: a warm-up request failed (its code path was still warmed): %s", err)
    print(f"kiln: compile: done in {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
    return data


def _wait(proc: subprocess.Popen[bytes], start: float, timeout_s: float, engine: str) -> None:
    """Wait for the warm-up, showing the elapsed time on a terminal (compiling takes minutes)."""
    tty = sys.stderr.isatty()
    while True:
        try:
            proc.wait(timeout=max(0.1, min(5.0, start + timeout_s - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() - start >= timeout_s:
                raise
            if tty:
                print(f"\rkiln: compile: warming up {engine}… {time.monotonic() - start:.0f}s", end="", file=sys.stderr)
            continue
        if tty:
            print(file=sys.stderr)
        return


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """End the warm-up and the engine processes it started, if they are still running."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
            return


def _keep_log(log_path: Path) -> Path:
    """The staging directory goes away with a failed stage: keep its warm-up log under the kiln cache."""
    kept = cache_root() / "logs" / f"compile-warmup-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log_path, kept)
    return kept

"""``compile=vllm``: compile the model for vLLM in the build and package the compile cache into the artifact.

The stage starts the engine on the (converted or quantized) checkpoint in a child process that runs the runtime's
own warm-up (``python -m runtime.warmup``). The warm-up derives the engine settings from the target and serving
blocks this build will write, with the same function ``serve`` uses, and calls the engine's warm-up hook, so the
cache it fills is the one serving looks up. The output is the checkpoint plus ``compile_cache/``; the result's
``target.compile`` is the compatibility key (vLLM and torch versions, device, CPU ISA and architecture or GPU
capability, install paths, dtype) that the runtime checks against its host.

This module imports only ``artifacts/``: the warm-up is a separate process, started from the stage's interpreter
(the toolchain's Python, which has vLLM). The warm-up leaves only cache content (no lock files, no bytecode).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts.errors import StageError
from artifacts.manifest import COMPILE_CACHE_DIR
from artifacts.ops import link_tree
from artifacts.paths import cache_root
from compile.config import CompileConfig

log = logging.getLogger("kiln.compile.vllm")
COMPILE_DEVICES = ("auto", "cpu", "cuda")
REPO_ROOT = Path(__file__).resolve().parents[1]  # the runtime's warm-up is started from this checkout


@dataclass
class VllmCompileConfig(CompileConfig):
    """``compile=vllm``: start vLLM in the build and package its torch.compile cache."""

    backend: str = "vllm"
    # KV cache of the warm-up engine (None: what serve would use). It does not change the compiled graph.
    kv_cache_gib: float | None = None
    timeout_s: int = 3600  # the tiny model compiles in about a minute on 2 CPU cores; large models take longer
    # Package vLLM's AOT function too, where kiln's guard for its reload applies (runtime/engines/vllm/patches.py):
    # a start then loads the compiled model instead of tracing it again. false: inductor's cache only.
    aot: bool = True
    # The device the cache is compiled for: "auto" is the build host's NVIDIA GPU when it has one, else its CPU.
    # "cuda" runs the warm-up in the vllm-cuda toolchain (vLLM and torch built for CUDA). A cache serves only on
    # the device kind (and, on GPUs, the compute capability) it was compiled for.
    device: str = "auto"

    def problems(self, build: Any) -> list[tuple[str, str]]:
        out = []
        if build.target.engine != "vllm":
            out.append(("target.engine", f"compile=vllm compiles for vLLM, not {build.target.engine!r}"))
        if build.serving.enforce_eager:
            out.append(
                (
                    "serving.enforce_eager",
                    "true makes vLLM skip torch.compile: nothing to precompile (use compile=none)",
                )
            )
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            out.append(("compile.kv_cache_gib", "must be > 0"))
        if self.timeout_s <= 0:
            out.append(("compile.timeout_s", "must be > 0"))
        if self.device not in COMPILE_DEVICES:
            out.append(("compile.device", f"{self.device!r} is not one of {list(COMPILE_DEVICES)}"))
        elif self.device != "auto" and self.device not in build.target.devices:
            out.append(("compile.device", f"{self.device} is not in target.devices {list(build.target.devices)}"))
        return out

    def build_device(self, host_devices: tuple[str, ...]) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if "cuda" in host_devices else "cpu"


def run(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path) -> dict[str, Any]:
    """Stage entry: link the checkpoint into ``out``, warm vLLM up into ``out/compile_cache``, report the key.

    ``params`` hold the artifact's target block as far as the stages before this one determined it, and its
    serving block: what ``serve`` will derive the engine settings from."""
    cfg = VllmCompileConfig(**params["config"])
    model = inputs["model"]
    link_tree(model, out)
    device = params.get("device") or cfg.build_device(("cpu",))
    report = _warm_up(out, params["target"], params["serving"], cfg, device, log_path=out.parent / "warmup.log")
    files = [p for p in (out / COMPILE_CACHE_DIR).rglob("*") if p.is_file()]
    log.info("compile: %d cache files", len(files))
    return {
        "target": {"compile": report["key"]},
        "cache_files": len(files),
        "cache_bytes": sum(p.stat().st_size for p in files),
        "warmup": {k: report[k] for k in ("engine_start_s", "total_s")},
    }


def _warm_up(
    out: Path,
    target: Mapping[str, Any],
    serving: Mapping[str, Any],
    cfg: VllmCompileConfig,
    device: str,
    log_path: Path,
) -> dict[str, Any]:
    """Run ``python -m runtime.warmup`` (vLLM needs a process with a ``__main__`` guard to spawn its engine)."""
    report = out.parent / "warmup.json"
    cmd = [
        sys.executable,
        "-m",
        "runtime.warmup",
        str(out),
        "--target",
        json.dumps(dict(target)),
        "--serving",
        json.dumps(dict(serving)),
        "--cache-dir",
        str(out / COMPILE_CACHE_DIR),
        "--report",
        str(report),
    ]
    if cfg.kv_cache_gib is not None:
        cmd += ["--option", f"kv_cache_gib={cfg.kv_cache_gib}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("KILN_LOG_FORMAT", "text")
    # read by the runtime's compile_cache.point_engine_at; set either way, so the caller's environment cannot
    # make the cache disagree with the stage key
    env["KILN_VLLM_AOT"] = "1" if cfg.aot else "0"
    if device == "cpu":  # the runtime would pick a GPU where it sees one: hide it, the cache is for the CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    print(
        f"kiln: compile: starting vLLM on {device} to compile the model (about a minute for the tiny one)",
        file=sys.stderr,
    )
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        # its own process group, so that a timeout or an interrupt also stops vLLM's engine processes
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True
        )
        try:
            _wait(proc, start, cfg.timeout_s)
        except subprocess.TimeoutExpired:
            raise StageError(
                "compile",
                f"the vLLM warm-up did not finish within {cfg.timeout_s}s (log: {_keep_log(log_path)})",
                key="compile.timeout_s",
                fix="raise compile.timeout_s",
            ) from None
        finally:
            _stop_group(proc)
    data: dict[str, Any] = json.loads(report.read_text()) if report.is_file() else {}
    if proc.returncode != 0 or "key" not in data:
        kept = _keep_log(log_path)
        raise StageError(
            "compile",
            f"the vLLM warm-up failed (exit code {proc.returncode}): {data.get('error', 'no report')} (log: {kept})",
            fix="check that the model loads in vLLM with these serving settings",
        )
    for err in data["request_errors"]:
        log.warning("compile: a warm-up request failed (its code path was still compiled): %s", err)
    print(f"kiln: compile: done in {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
    return data


def _wait(proc: subprocess.Popen[bytes], start: float, timeout_s: float) -> None:
    """Wait for the warm-up, showing the elapsed time on a terminal (compiling takes minutes)."""
    tty = sys.stderr.isatty()
    while True:
        try:
            proc.wait(timeout=max(0.1, min(5.0, start + timeout_s - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() - start >= timeout_s:
                raise
            if tty:
                print(f"\rkiln: compile: warming up vLLM… {time.monotonic() - start:.0f}s", end="", file=sys.stderr)
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

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

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts.manifest import COMPILE_CACHE_DIR
from artifacts.ops import link_tree
from compile import warmup
from compile.config import CompileConfig

log = logging.getLogger("kiln.compile.vllm")
COMPILE_DEVICES = ("auto", "cpu", "cuda")


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
    """Run the runtime's warm-up of vLLM (compile/warmup.py) into ``out/compile_cache``."""
    options = [f"kv_cache_gib={cfg.kv_cache_gib}"] if cfg.kv_cache_gib is not None else []
    # read by the runtime's compile_cache.point_engine_at; set either way, so the caller's environment cannot
    # make the cache disagree with the stage key
    env = {"KILN_VLLM_AOT": "1" if cfg.aot else "0"}
    return warmup.run(
        out,
        target,
        serving,
        engine="vLLM",
        cache_dir=out / COMPILE_CACHE_DIR,
        device=device,
        timeout_s=cfg.timeout_s,
        log_path=log_path,
        options=options,
        env=env,
        fix="check that the model loads in vLLM with these serving settings",
    )

"""The compatibility key of a ``compile=tensorrt_llm`` artifact, checked against this host before anything loads,
and the build's GPU warm-up that fills the autotuner cache.

TensorRT-LLM's autotuner saves the tactics it measured to the file ``TLLM_AUTOTUNER_CACHE_PATH`` names and loads
them at the next start's warm-up (``autotune(cache_path=...)`` around the model engine's warm-up, read in
NVIDIA/TensorRT-LLM ``tensorrt_llm/_torch/pyexecutor/model_engine.py``). The file records the library version and
the GPU, but nothing checks them on load: kiln's key does. The rules:

* ``tensorrt_llm``: an artifact with an autotuner cache needs the exact version it was tuned with (tactics name
  kernels of that build); options alone need the same release series (major.minor: TorchLlmArgs refuses keys it
  does not know, and the fields kiln writes are stable within a series).
* ``tp`` x ``pp``: the GPUs the artifact's parallelism needs, against this host's GPUs.
* with a cache, ``cuda``, ``gpu_capability``, ``gpu_name`` (the SKU the tactics were measured on) and
  ``cuda_driver`` (a newer driver is fine), and ``dtype`` (an operator's dtype override is a mismatch).
* the quantization and the limits are recorded for the operator; kiln's settings may change the limits at serve
  time (TensorRT-LLM tunes the shapes the cache lacks at start).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifacts.devices import Gpu
from artifacts.manifest import AUTOTUNER_CACHE
from runtime.engines import compiled
from runtime.engines.base import EngineDeadError, EngineError, EngineSettings, SamplingSpec
from runtime.host import Host, TargetMismatchError

if TYPE_CHECKING:
    from artifacts.manifest import Manifest

log = logging.getLogger("kiln.runtime.tensorrt_llm")
CACHE_ENV = "TLLM_AUTOTUNER_CACHE_PATH"
INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm=={version}"
RULES = compiled.KeyRules(
    order=("device", "tensorrt_llm", "cuda", "gpu_capability", "gpu_name", "cuda_driver", "dtype"),
    why={
        "device": "TensorRT-LLM serves on NVIDIA GPUs only",
        "cuda": "the tuned kernels are tied to the CUDA version",
        "gpu_capability": "the autotuner's tactics name kernels built for that compute capability",
        "gpu_name": "the autotuner's tactics were measured on that GPU model",
        "cuda_driver": "kernels built under a newer driver may use PTX an older driver cannot load",
        "dtype": "the options and the tactics are for another dtype",
    },
    at_least=frozenset({"cuda_driver"}),
    informational=frozenset({"tp", "pp", "quantization", "max_seq_len", "max_batch_size", "max_num_tokens"}),
)
FIT = "rebuild on this host (compile=tensorrt_llm) or pass --ignore-compile-cache to serve without the autotuner cache"


def tuned(key: Mapping[str, str]) -> bool:
    """Whether the artifact carries an autotuner cache (its key then holds the GPU it was tuned on)."""
    return "gpu_capability" in key


def gpu_key(torch_cuda: str | None, gpus: tuple[Gpu, ...]) -> dict[str, str]:
    return compiled.cuda_key(torch_cuda, gpus, "install TensorRT-LLM's own torch build") | {"gpu_name": gpus[0].name}


def check_key(
    recorded: Mapping[str, str], host: Host, dtype: str, installed: str | None, torch_cuda: str | None
) -> tuple[str, str] | None:
    """The first key field this host cannot serve, with why and what would fit (None: it fits)."""
    if (why := _version_problem(recorded.get("tensorrt_llm", ""), installed, tuned(recorded))) is not None:
        return "tensorrt_llm", why
    need = int(recorded.get("tp", "1")) * int(recorded.get("pp", "1"))
    if need > host.gpu_count:
        return "tp", (
            f"the artifact runs on tp={recorded.get('tp', '1')} x pp={recorded.get('pp', '1')} = {need} GPUs, this "
            f"host has {host.gpu_count}; serve it on a host with {need} GPUs, or rebuild with "
            f"target.tensor_parallel_degree x compile.pipeline_parallel_size <= {host.gpu_count}"
        )
    here = {"device": "cuda" if host.gpus else host.devices[0], "dtype": dtype, "tensorrt_llm": installed or ""}
    if tuned(recorded):
        here |= gpu_key(torch_cuda, host.gpus)
    checked = {k: v for k, v in recorded.items() if k != "tensorrt_llm"}  # compared above, by its own rule
    bad = compiled.mismatch(checked, here, RULES)
    return (bad[0], f"{bad[1]}; {FIT}") if bad else None


def _version_problem(built: str, installed: str | None, exact: bool) -> str | None:
    if installed is None:
        return f"TensorRT-LLM is not installed here: {INSTALL.format(version=built)}"
    series = ".".join(built.split(".")[:2])
    if installed == built or (not exact and installed.startswith(series + ".")):
        return None
    what = "its autotuner cache was tuned with" if exact else "its LLM-API options were written for"
    return (
        f"{what} tensorrt_llm {built}, this host has {installed}; install it ({INSTALL.format(version=built)}) or "
        f"rebuild the artifact with this host's TensorRT-LLM"
    )


def prepare(model_dir: Path, manifest: Manifest, settings: EngineSettings, ignore: bool) -> EngineSettings:
    """Check the key against this host; return settings whose ``compile_cache`` is a writable copy of the
    artifact's cache (None: no cache, or ``ignore``). Raises TargetMismatchError naming ``compile.<field>``."""
    from runtime.engines.tensorrt_llm import SPEC
    from runtime.host import detect

    recorded = manifest.target.compile
    bad = check_key(recorded, detect(), settings.dtype, SPEC.installed_version(), _torch_cuda(recorded))
    if ignore:
        reason = f" (target.compile.{bad[0]}: {bad[1]})" if bad else ""
        log.warning("--ignore-compile-cache: serving without the artifact's autotuner cache%s", reason)
        return replace(settings, compile_cache=None)
    if bad:
        raise TargetMismatchError(f"compile.{bad[0]}", bad[1])
    if not tuned(recorded):
        return settings
    return replace(settings, compile_cache=compiled.writable_copy(model_dir, manifest))


def _torch_cuda(recorded: Mapping[str, str]) -> str | None:
    """torch's CUDA version, needed only for a tuned artifact (torch is TensorRT-LLM's dependency)."""
    if not tuned(recorded):
        return None
    import torch

    return torch.version.cuda


def point_engine_at(cache_dir: Path) -> None:
    """TensorRT-LLM's autotuner reads and writes the file this names (its start loads it, tunes what is missing and
    saves it)."""
    os.environ[CACHE_ENV] = str(cache_dir / AUTOTUNER_CACHE)


# Exercised after the start (the start itself runs the autotuner over the shapes the options allow): greedy,
# sampled, logprobs, a batch.
REQUESTS = (
    SamplingSpec(max_tokens=8, temperature=0.0),
    SamplingSpec(max_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=1),
    SamplingSpec(max_tokens=8, temperature=0.7, logprobs=2),
)


async def warm(settings: EngineSettings, cache_dir: Path) -> dict[str, Any]:
    """The build's GPU warm-up: start the engine with ``cache_dir`` holding its autotuner cache, send a few
    requests, stop; report this host's key (the installed version and the GPU fields)."""
    import torch

    from artifacts.devices import nvidia_gpus
    from runtime.engines.tensorrt_llm import SPEC
    from runtime.engines.tensorrt_llm.engine import TensorrtLlmEngine

    cache_dir.mkdir(parents=True, exist_ok=True)
    point_engine_at(cache_dir)
    engine = TensorrtLlmEngine(replace(settings, compile_cache=None))
    start = time.monotonic()
    await engine.start()
    started = time.monotonic() - start
    errors: list[str] = []
    try:
        for i, spec in enumerate(REQUESTS):
            await _request(engine, f"warmup-{i}", [1 + (i * 7 + j) % 250 for j in range(12 + 5 * i)], spec, errors)
    finally:
        await engine.shutdown()
    key = {"tensorrt_llm": SPEC.installed_version() or ""} | gpu_key(torch.version.cuda, nvidia_gpus())
    return {
        "key": key,
        "engine_start_s": round(started, 3),
        "total_s": round(time.monotonic() - start, 3),
        "files": sum(1 for p in cache_dir.rglob("*") if p.is_file()),
        "request_errors": errors,
    }


async def _request(engine: Any, request_id: str, prompt: list[int], spec: SamplingSpec, errors: list[str]) -> None:
    try:
        async for _ in engine.generate(request_id, prompt, spec):
            pass
    except EngineDeadError:
        raise
    except EngineError as exc:
        log.warning("warm-up request %s failed: %s", request_id, exc)
        errors.append(f"{request_id}: {exc}")

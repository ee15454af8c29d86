"""The engine settings, derived once: one function of (model, target block, configuration, host) that ``serve``,
``python -m runtime config`` and the build's compile warm-up all call, so a packaged compile cache is filled with
exactly the settings a later ``serve`` of the artifact starts with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from artifacts.manifest import Target
from artifacts.prequantized import FormatError, identify_dir
from artifacts.targets import EMBED_ARCHITECTURES, runs_on
from runtime import engines
from runtime.config.schema import ServeConfig
from runtime.engines.base import EngineDefault, EngineSettings, EngineSpec, LoraSettings
from runtime.host import Host, TargetMismatchError, check_target


@dataclass(frozen=True)
class Plan:
    """Which engine serves, with which settings, and the values its ``defaults`` hook chose (for ``config``)."""

    spec: EngineSpec
    settings: EngineSettings
    chosen: Mapping[str, EngineDefault]
    quantization: str = "none"  # target.quantization, or a plain checkpoint's pre-quantized scheme


def derive(model_dir: Path, target: Target | None, cfg: ServeConfig, host: Host) -> Plan:
    """Check the target block against this host and derive the engine settings; the target fills what the
    configuration leaves open, then the engine's defaults. ``target`` None: a plain Hugging Face directory.
    Raises TargetMismatchError naming the first target field that does not fit."""
    if target is None:
        spec = _plain_dir_engine(cfg.engine or engines.DEFAULT)
        device, quantization = _plain_dir_device(model_dir, spec, host)
        dtype, tp, max_len = str(cfg.dtype), cfg.tensor_parallel_degree or 1, cfg.max_model_len
        if tp > host.count(device):
            raise TargetMismatchError(
                "tensor_parallel_degree", f"{tp} {device} devices wanted, this host has {host.count(device)}"
            )
    else:
        device = check_target(target, host)
        spec = engines.get(target.engine)
        quantization = target.quantization
        dtype = target.dtype if cfg.dtype == "auto" else str(cfg.dtype)
        tp, max_len = target.tensor_parallel_degree, cfg.max_model_len or target.max_model_len
    settings = EngineSettings(
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        max_model_len=max_len,
        max_num_seqs=cfg.max_num_seqs,
        tensor_parallel_degree=tp,
        enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enable_chunked_prefill=cfg.enable_chunked_prefill,
        kv_cache_gib=cfg.kv_cache_gib,
        extra=dict(cfg.engine_args),
        lora=_lora(cfg),
        task=_task(model_dir, target, cfg, spec),
    )
    chosen = spec.defaults(settings)
    return Plan(spec, replace(settings, **{k: d.value for k, d in chosen.items()}), chosen, quantization)


def _task(model_dir: Path, target: Target | None, cfg: ServeConfig, spec: EngineSpec) -> str:
    """What the model serves: the artifact's target.task (``task`` may only repeat it), else ``task``, else a plain
    directory's architecture; the engine must serve it."""
    if target is not None:
        if cfg.task is not None and cfg.task != target.task:
            raise TargetMismatchError(
                "task", f"task={cfg.task} is set, and the artifact was built for target.task={target.task}"
            )
        task = target.task
    else:
        task = cfg.task or ("embed" if _architecture(model_dir) in EMBED_ARCHITECTURES else "generate")
    if task not in spec.tasks:
        raise TargetMismatchError("task", f"the {spec.name} engine does not serve task={task}")
    return task


def _architecture(model_dir: Path) -> str | None:
    import json

    try:
        archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or [None]
    except (OSError, ValueError, AttributeError):
        return None
    return str(archs[0]) if archs[0] else None


def _lora(cfg: ServeConfig) -> LoraSettings | None:
    """LoRA sizing, when adapters are enabled (runtime/app.py: lora_problems checked the values)."""
    return LoraSettings(cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras) if cfg.enable_lora else None


def _plain_dir_engine(name: str) -> EngineSpec:
    try:
        spec = engines.get(name)
    except engines.UnknownEngineError as exc:
        raise TargetMismatchError("engine", str(exc)) from None
    if spec.installed_version() is None:
        raise TargetMismatchError("engine", f"{name} is not installed here: {spec.install_hint}")
    return spec


def _plain_dir_device(model_dir: Path, spec: EngineSpec, host: Host) -> tuple[str, str]:
    """The device a plain checkpoint serves on: the host's best, unless it is pre-quantized, when its format is
    checked as a built artifact's target block is (the engine loads it, a device here has its kernels)."""
    try:
        pq = identify_dir(model_dir)
    except FormatError as exc:
        raise TargetMismatchError("quantization", f"{exc}; {exc.fix}") from None
    if pq is None:
        return host.devices[0], "none"
    if spec.name not in pq.engines:
        raise TargetMismatchError(
            "engine", f"{spec.name} does not load {pq.summary()}; engines that do: {', '.join(pq.engines)}"
        )
    devices = runs_on(spec.name, pq.scheme).devices
    target = Target(spec.name, "", devices, "auto", 1, 0, quantization=pq.quantization)
    return check_target(target, host), pq.quantization

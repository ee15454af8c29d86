"""Facts about this host, and the check of an artifact's target block against them."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from artifacts.manifest import Target
from runtime import engines


class TargetMismatchError(Exception):
    """The artifact cannot run here; ``field`` names the first mismatched target field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"target.{field}: {message}")


@dataclass(frozen=True)
class Host:
    devices: tuple[str, ...]  # device kinds present, best first
    gpu_count: int
    numa_nodes: int
    cpu_flags: frozenset[str] = frozenset()  # /proc/cpuinfo flags (x86: avx2, avx512f, …)

    def count(self, device: str) -> int:
        return {"cuda": self.gpu_count, "cpu": self.numa_nodes}.get(device, 1)


@lru_cache(maxsize=1)
def detect() -> Host:
    gpus = _nvidia_gpus()
    devices = ("cuda",) * bool(gpus) + ("neuron",) * bool(glob.glob("/dev/neuron*")) + ("cpu",)
    numa = len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1
    return Host(devices=devices, gpu_count=gpus, numa_nodes=numa, cpu_flags=_cpu_flags())


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def _nvidia_gpus() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def check_target(target: Target, host: Host) -> str:
    """Return the device kind to serve on, or raise TargetMismatchError naming the first field that does not fit."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    if target.unknown:
        key = sorted(target.unknown)[0]
        raise TargetMismatchError(
            key, "this runtime does not know this field (the artifact was built by a newer kiln); upgrade kiln"
        )
    try:
        spec = engines.get(target.engine)
    except engines.UnknownEngineError as exc:
        raise TargetMismatchError("engine", str(exc)) from None
    version = spec.installed_version()
    if version is None:
        raise TargetMismatchError("engine", f"{target.engine} is not installed here: {spec.install_hint}")
    try:
        if target.engine_version and version not in SpecifierSet(target.engine_version):
            raise TargetMismatchError(
                "engine_version", f"the artifact needs {target.engine} {target.engine_version}, this host has {version}"
            )
    except InvalidSpecifier as exc:
        raise TargetMismatchError("engine_version", f"{target.engine_version!r} is not a version specifier") from exc
    device = next((d for d in host.devices if d in target.devices), None)
    if device is None:
        what = "the artifact" if target.quantization == "none" else f"its quantization ({target.quantization})"
        raise TargetMismatchError(
            "devices", f"{what} runs on {list(target.devices)}, this host has {list(host.devices)}"
        )
    if (why := spec.cannot_run(target.quantization, device, host.cpu_flags)) is not None:
        others = [d for d in target.devices if d != device]
        raise TargetMismatchError(
            "quantization",
            f"{target.quantization} cannot run on this host's {device}: {why}"
            + (f"; devices that can run it: {others}" if others else ""),
        )
    if target.tensor_parallel_degree > host.count(device):
        raise TargetMismatchError(
            "tensor_parallel_degree",
            f"the artifact needs {target.tensor_parallel_degree} {device} devices, this host has {host.count(device)}",
        )
    return device  # target.compile (precompiled content) is checked with the engine settings: its compile hook

"""Facts about this host, and the check of an artifact's target block against them."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from artifacts.devices import Gpu as Gpu  # re-exported: Host.gpus holds them
from artifacts.devices import nvidia_gpus
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
    cpu_cores: tuple[int, ...] = ()  # the CPU ids this process may run on (its affinity)
    gpus: tuple[Gpu, ...] = ()
    neuron_devices: int = 0  # /dev/neuron* (one per Inferentia2 / Trainium chip)
    neuron_cores: int = 0  # NeuronCores (the unit Neuron's tensor parallelism counts)
    # EC2 instance type ("inf2.24xlarge"), from KILN_INSTANCE_TYPE, SageMaker's SM_CURRENT_INSTANCE_TYPE or
    # the DMI product name EC2 sets; None where none says.
    instance_type: str | None = None

    def count(self, device: str) -> int:
        """Devices of ``device`` a tensor-parallel group can span: GPUs, NeuronCores, and on a CPU its NUMA nodes or,
        where ranks outnumber them, its cores (one rank per core set; runtime/engines/vllm: cpu_thread_binding)."""
        cpu = max(self.numa_nodes, len(self.cpu_cores))
        return {"cuda": self.gpu_count, "cpu": cpu, "neuron": self.neuron_cores}.get(device, 1)

    @property
    def instance_family(self) -> str | None:
        """``inf2`` for ``inf2.24xlarge`` (and for ``ml.inf2.24xlarge``)."""
        if not self.instance_type:
            return None
        return self.instance_type.removeprefix("ml.").split(".", 1)[0]


# NeuronCores per device by instance family (Inferentia2 and Trainium chips have 2 each, Trainium2 8), for hosts
# where the Neuron tools that report them are absent.
NEURON_CORES_PER_DEVICE = {"inf2": 2, "trn1": 2, "trn1n": 2, "trn2": 8}


@lru_cache(maxsize=1)
def detect() -> Host:
    gpus = nvidia_gpus()
    neuron = len(glob.glob("/dev/neuron[0-9]*"))
    devices = ("cuda",) * bool(gpus) + ("neuron",) * bool(neuron) + ("cpu",)
    numa = len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1
    instance = _instance_type()
    family = instance.removeprefix("ml.").split(".", 1)[0] if instance else ""
    cores = neuron * NEURON_CORES_PER_DEVICE.get(family, 2)
    return Host(
        devices=devices,
        gpu_count=len(gpus),
        numa_nodes=numa,
        cpu_flags=_cpu_flags(),
        cpu_cores=tuple(sorted(os.sched_getaffinity(0))),
        gpus=gpus,
        neuron_devices=neuron,
        neuron_cores=int(os.environ.get("NEURON_RT_NUM_CORES") or cores),
        instance_type=instance,
    )


def _instance_type() -> str | None:
    for var in ("KILN_INSTANCE_TYPE", "SM_CURRENT_INSTANCE_TYPE"):
        if os.environ.get(var):
            return os.environ[var]
    try:  # EC2 writes the instance type as the DMI product name (no metadata-service call needed)
        name = Path("/sys/devices/virtual/dmi/id/product_name").read_text().strip()
    except OSError:
        return None
    return name if "." in name and " " not in name else None


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


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

"""What an artifact needs from a SageMaker instance, and which instance types give it.

The need: the weights at their stored dtype and quantization (the artifact's weight files, as stored), the KV cache
for ``max_model_len`` x ``max_num_seqs`` full-length sequences (the worst case the engine admits), and a fixed
allowance per device for what is neither (activations, CUDA graphs and context; on CPU the server, engine and
tokenizer processes). Sharded over ``tensor_parallel_degree`` devices, it must fit in the share of each device's
memory an engine takes (vLLM's ``gpu_memory_utilization`` default, 0.9).

The instance table is data (``instances.json``, with its source and the date it was read); an instance fits when
the artifact's target block allows it — device kind, the compile key's device and GPU capability or Neuron
instance family, the tensor-parallel degree — and the need fits its memory. The same fields the runtime checks on
the host, checked before any API call is made.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from artifacts.manifest import COMPILE_CACHE_DIR, Manifest, Target

GIB = 1 << 30
MIB = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
UTILIZATION = 0.9  # the share of a device's memory the engine may take (vLLM's gpu_memory_utilization default)
# Memory per device that is neither weights nor KV cache: activations and CUDA graphs/context on a GPU, the
# compiled graphs' scratch on a NeuronCore; on CPU the server, engine-core and worker processes and the tokenizer.
OVERHEAD_GIB = {"cuda": 1.5, "neuron": 1.0, "cpu": 4.0}


@dataclass(frozen=True)
class Instance:
    """One row of the instance table."""

    type: str
    usd_per_hour: float
    vcpus: int
    memory_gib: float
    device: str  # the device kind an engine serves on: "cpu", "cuda" or "neuron" (artifacts/targets.py)
    accelerator: str = ""
    accelerators: int = 0  # GPUs, or NeuronCores (what a tensor-parallel rank runs on)
    accelerator_memory_gib: float = 0.0  # per accelerator
    gpu_capability: str = ""
    family: str = ""  # Neuron instance family (inf2, trn1): what a NEFF is compiled for

    @property
    def devices(self) -> int:
        """How many devices a model can be sharded over (CPU instances: one, as the runtime counts NUMA nodes)."""
        return self.accelerators if self.device != "cpu" else 1

    @property
    def device_memory(self) -> float:
        return (self.accelerator_memory_gib if self.device != "cpu" else self.memory_gib) * GIB

    def describe(self) -> str:
        if self.device == "cpu":
            return f"{self.vcpus} vCPU, {self.memory_gib:g} GiB"
        return f"{self.accelerators} x {self.accelerator} {self.accelerator_memory_gib:g} GiB"


@dataclass(frozen=True)
class Table:
    source: str
    read: str
    region: str
    instances: tuple[Instance, ...]

    def get(self, instance_type: str) -> Instance | None:
        return next((i for i in self.instances if i.type == instance_type), None)


def table() -> Table:
    doc = json.loads(resources.files("runtime.deploy").joinpath("instances.json").read_text())
    known = {f.name for f in fields(Instance)}
    rows = tuple(Instance(**{k: v for k, v in row.items() if k in known}) for row in doc["instances"])
    return Table(doc["source"], doc["read"], doc["region"], rows)


@dataclass(frozen=True)
class Need:
    """What serving the artifact takes, before it is spread over devices."""

    weights: int  # bytes
    kv: int  # bytes, for max_num_seqs sequences of max_model_len tokens
    tensor_parallel_degree: int
    max_model_len: int
    max_num_seqs: int
    kv_budget: bool = False  # the engine allocates a fixed KV budget (vLLM on CPU), whatever the limits

    def per_device(self, device: str) -> float:
        return (self.weights + self.kv) / self.tensor_parallel_degree + OVERHEAD_GIB[device] * GIB

    def summary(self) -> str:
        kv = (
            "the engine's fixed budget"
            if self.kv_budget
            else f"{self.max_num_seqs} sequences x {self.max_model_len} tokens"
        )
        return f"weights {self.weights / GIB:.2f} GiB + KV cache {self.kv / GIB:.2f} GiB ({kv})" + (
            f", over {self.tensor_parallel_degree} devices" if self.tensor_parallel_degree > 1 else ""
        )


def weight_bytes(manifest: Manifest) -> int:
    """The artifact's weight files as stored (quantized weights at their packed size); compile caches excluded."""
    return sum(
        e.size
        for e in manifest.files
        if e.path.endswith(WEIGHT_SUFFIXES) and not e.path.startswith(COMPILE_CACHE_DIR + "/")
    )


def estimate(manifest: Manifest, config: Mapping[str, Any], max_model_len: int, max_num_seqs: int) -> Need:
    """The need of ``manifest``'s artifact, whose ``config.json`` is ``config``."""
    from runtime.engines.base import kv_bytes_per_token_of

    target = manifest.target
    per_token = 0 if target.task == "embed" else kv_bytes_per_token_of(dict(config), target.dtype) or 0
    return Need(
        weights=weight_bytes(manifest),
        kv=per_token * max_model_len * max_num_seqs,
        tensor_parallel_degree=target.tensor_parallel_degree,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
    )


def problem(instance: Instance, target: Target, need: Need) -> tuple[str, str] | None:
    """The first target field (or "memory") that rules ``instance`` out, with why; None when it fits."""
    key = target.compile
    if instance.device not in target.devices:
        return "devices", f"the artifact runs on {list(target.devices)}; {instance.type} has {instance.device}"
    if key.get("device") and key["device"] != instance.device:
        return "compile.device", f"the artifact's precompiled content is for {key['device']}, not {instance.device}"
    if key.get("gpu_capability") and key["gpu_capability"] != instance.gpu_capability:
        return "compile.gpu_capability", (
            f"compiled for compute capability {key['gpu_capability']}; {instance.type}'s {instance.accelerator} "
            f"is {instance.gpu_capability}"
        )
    if key.get("instance_family") and key["instance_family"] != instance.family:
        return "compile.instance_family", (
            f"Neuron graphs compiled for {key['instance_family']}; {instance.type} is {instance.family}"
        )
    if target.tensor_parallel_degree > instance.devices:
        return "tensor_parallel_degree", (
            f"the artifact is sharded over {target.tensor_parallel_degree} devices; {instance.type} has "
            f"{instance.devices}"
        )
    wanted, room = need.per_device(instance.device), instance.device_memory * UTILIZATION
    if wanted > room:
        return "memory", (
            f"needs {wanted / GIB:.1f} GiB per device; {instance.type} gives {room / GIB:.1f} GiB "
            f"({UTILIZATION:.0%} of {instance.describe()})"
        )
    return None


def fitting(instances: tuple[Instance, ...], target: Target, needs: Mapping[str, Need]) -> list[Instance]:
    """The instance types that fit, cheapest first; ``needs`` holds the need on each device kind considered."""
    ok = (i for i in instances if i.device in needs and problem(i, target, needs[i.device]) is None)
    return sorted(ok, key=lambda i: i.usd_per_hour)


def memory_mb(need: Need, device: str) -> int:
    """An inference component's MinMemoryRequiredInMb (host memory): on CPU all of the need; with accelerators the
    server's processes and one copy of a shard of the weights, which loading passes through host memory."""
    if device == "cpu":
        return int(need.per_device("cpu") / MIB)
    return int((need.weights / need.tensor_parallel_degree + OVERHEAD_GIB["cpu"] * GIB) / MIB)

"""The Neuron graphs an artifact built with ``compile=neuron`` carries: what they were compiled for, and the check of
its compatibility key (``target.compile``) against this host, before anything is loaded.

Two records hold the same facts: ``neuron_config.json``, which NxD Inference writes beside ``model.pt`` and loads the
graphs by (``InferenceConfig.save`` / ``to_dict`` at aws-neuron/neuronx-distributed-inference @ 4bcdc54: a JSON
object whose ``neuron_config`` holds ``batch_size``, ``seq_len``, ``tp_degree``, ``torch_dtype`` as a name, and
``on_device_sampling_config`` as an object or null), and ``target.compile``, which kiln's build wrote because NxD
Inference records neither the compiler nor the SDK it compiled with. The serving limits come from the first (what
the graphs really are); the host check from the second. Imports no Neuron library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from runtime.host import Host

COMPILED_CONFIG = "neuron_config.json"
COMPILED_GRAPHS = "model.pt"
# Key fields naming an installed package, and the package (compile/neuron.py: KEY_PACKAGES).
PACKAGES = {"neuronx_cc": "neuronx-cc", "nxdi": "neuronx-distributed-inference", "torch_neuronx": "torch-neuronx"}
CHIP_FAMILY = {"inf2": "inf2", "trn1": "trn1", "trn1n": "trn1", "trn2": "trn2"}  # instance family -> NEFF target
_WHY = {
    "neuronx_cc": "the NEFFs were compiled by another Neuron compiler",
    "nxdi": "model.pt is NxD Inference's TorchScript bundle, loaded by the NxD Inference that wrote it",
    "torch_neuronx": "model.pt's graphs are torch-neuronx's traced modules",
}


class NotCompiledError(Exception):
    """The directory holds no compiled Neuron graphs."""


@dataclass(frozen=True)
class Compiled:
    """The static shapes and options the graphs were compiled with (neuron_config.json)."""

    batch_size: int
    seq_len: int
    max_context_length: int
    tp_degree: int
    dtype: str
    on_device_sampling: bool
    global_topk: int

    @classmethod
    def read(cls, model_dir: Path) -> Compiled:
        if not (model_dir / COMPILED_GRAPHS).is_file():
            raise NotCompiledError(
                f"{model_dir} holds no compiled Neuron graphs ({COMPILED_GRAPHS}); the neuron engine serves artifacts "
                "built with compile=neuron"
            )
        try:
            data = json.loads((model_dir / COMPILED_CONFIG).read_text())
            nc = data["neuron_config"]
            sampling = nc.get("on_device_sampling_config")
            return cls(
                batch_size=int(nc["batch_size"]),
                seq_len=int(nc["seq_len"]),
                max_context_length=int(nc.get("max_context_length") or nc["seq_len"]),
                tp_degree=int(nc["tp_degree"]),
                dtype=str(nc.get("torch_dtype", "bfloat16")),
                on_device_sampling=sampling is not None,
                global_topk=int((sampling or {}).get("global_topk", 256)),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NotCompiledError(
                f"{model_dir} holds no readable compiled Neuron graphs ({COMPILED_CONFIG}: {exc}); the neuron engine "
                "serves artifacts built with compile=neuron"
            ) from None


def installed() -> dict[str, str | None]:
    """The key's packages as installed here (None: missing)."""
    out: dict[str, str | None] = {}
    for key, dist in PACKAGES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def mismatch(
    key: Mapping[str, str], host: Host, versions: Mapping[str, str | None], dtype: str
) -> tuple[str, str] | None:
    """The first ``target.compile`` field this host does not fit, with what would fit; None when all fit."""
    if key.get("device", "neuron") != "neuron":
        return "device", f"the artifact holds {key['device']} content, not Neuron graphs"
    if (bad := _family(key, host)) is not None:
        return bad
    sdk = key.get("neuron_sdk", "?")
    for field, dist in PACKAGES.items():
        want, have = key.get(field), versions.get(field)
        if want is not None and want != have:
            here = f"{dist} {have}" if have else f"no {dist}"
            return field, (
                f"compiled with {dist} {want} (Neuron SDK {sdk}), this host has {here} ({_WHY[field]}): install Neuron "
                f"SDK {sdk} ({dist}=={want}), or rebuild the artifact with this host's SDK"
            )
    if (bad := _cores(key, host)) is not None:
        return bad
    if "dtype" in key and dtype not in ("auto", key["dtype"]):
        return "dtype", f"the graphs were compiled for {key['dtype']}, dtype={dtype} is set: unset dtype"
    return None


def _family(key: Mapping[str, str], host: Host) -> tuple[str, str] | None:
    """A NEFF runs only on the chip family it was compiled for."""
    want = key.get("instance_family")
    have = host.instance_family
    if want is None or have is None:  # no instance type known here (KILN_INSTANCE_TYPE sets it): nothing to compare
        return None
    if CHIP_FAMILY.get(have, have) == want:
        return None
    fits = [f for f, chip in CHIP_FAMILY.items() if chip == want]
    return "instance_family", (
        f"the graphs were compiled for {want}, this host is {host.instance_type} ({have}): serve on a {'/'.join(fits)} "
        f"instance, or rebuild with compile.instance_family={have}"
    )


def _cores(key: Mapping[str, str], host: Host) -> tuple[str, str] | None:
    """tp_degree counts logical NeuronCores: logical_nc_config physical cores each."""
    tp, lnc = int(key.get("tp_degree", "1")), int(key.get("logical_nc_config", "1"))
    have = host.neuron_cores // lnc
    if tp <= have:
        return None
    return "tp_degree", (
        f"the graphs are sharded over {tp} NeuronCores (x{lnc} physical each), this host has {have} "
        f"({host.neuron_cores} physical): serve on an instance with at least {tp * lnc} NeuronCores, or rebuild with "
        f"target.tensor_parallel_degree<={max(have, 1)}"
    )

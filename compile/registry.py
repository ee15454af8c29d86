"""The compiler registry, keyed by the ``compile=`` config option name.

``none`` does no ahead-of-time work: the artifact is served as converted (or quantized).
"""

from __future__ import annotations

from dataclasses import dataclass

from compile.config import CompileConfig


@dataclass(frozen=True)
class CompilerSpec:
    config_cls: type[CompileConfig]
    toolchain: str | None  # None: no stage work
    entry: str | None  # "module:function" run inside the toolchain


COMPILERS: dict[str, CompilerSpec] = {
    "none": CompilerSpec(config_cls=CompileConfig, toolchain=None, entry=None),
}

"""The quantizer registry, keyed by the ``quantize=`` config option name.

Each entry names its config schema, the toolchain its work runs in, and the stage function. ``none`` does no
work: the converted checkpoint passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantize.config import QuantizeConfig


@dataclass(frozen=True)
class QuantizerSpec:
    config_cls: type[QuantizeConfig]
    toolchain: str | None  # None: no stage work
    entry: str | None  # "module:function" run inside the toolchain


QUANTIZERS: dict[str, QuantizerSpec] = {
    "none": QuantizerSpec(config_cls=QuantizeConfig, toolchain=None, entry=None),
}


def get_quantizer(name: str) -> QuantizerSpec:
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise KeyError(f"unknown quantization method {name!r}; known: {sorted(QUANTIZERS)}") from None

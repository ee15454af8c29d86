"""Preflight: check the model against the scheme before any calibration, listing every offending layer.

The model is built on the meta device from its ``config.json`` (no weights are read), so the check costs a
second even for a large model. Layer selection follows llm-compressor's rules: a ``targets`` / ``ignore``
entry matches a module by class name, by exact module name, or by ``re:<regex>`` on the module name.

Hard problems (the scheme cannot represent a layer) fail the stage with every layer named and the fix.
Soft ones (one device kind's kernels cannot run a layer) narrow the artifact's device kinds and say why.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantize.config import AwqConfig, CalibratedConfig, GptqConfig
from quantize.errors import QuantizeError
from quantize.registry import Plan

log = logging.getLogger("kiln.quantize.preflight")
MAX_LISTED = 20
VLLM_CPU_WNA16_MULTIPLE = 32  # vLLM's CPUWNA16 kernel: input and output sizes must be multiples of 32


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # module class name
    in_features: int
    out_features: int


@dataclass
class Report:
    layers: list[Layer]
    devices: tuple[str, ...]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "devices": list(self.devices), "notes": list(self.notes)}


def matches(name: str, module: Any, patterns: Iterable[str]) -> bool:
    """llm-compressor's matching: class name, exact module name, or ``re:<regex>`` on the module name."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern in (name, type(module).__name__):
            return True
    return False


def model_layers(model_dir: Path, cfg: CalibratedConfig) -> tuple[list[Layer], list[tuple[str, str]]]:
    """The layers the config targets, and targeted modules that are not linear layers (name, class)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers, unsupported = [], []
    for name, module in model.named_modules():
        if not name or not matches(name, module, cfg.targets) or matches(name, module, cfg.ignore):
            continue
        if isinstance(module, torch.nn.Linear):
            layers.append(Layer(name, type(module).__name__, module.in_features, module.out_features))
        elif not list(module.children()):  # a leaf that is not Linear: no scheme here quantizes it
            unsupported.append((name, type(module).__name__))
    return layers, unsupported


def check(model_dir: Path, cfg: CalibratedConfig, plan: Plan) -> Report:
    """Raise QuantizeError listing every offending layer; return the targeted layers and the device kinds."""
    layers, unsupported = model_layers(model_dir, cfg)
    if unsupported:
        _fail(
            [f"{n}: {kind} is not a linear layer; these schemes quantize nn.Linear only" for n, kind in unsupported],
            "quantize.targets",
            "target linear layers only (quantize.targets=[Linear]) or add these to quantize.ignore",
        )
    if not layers:
        raise QuantizeError(
            f"quantize.targets={cfg.targets} with quantize.ignore={cfg.ignore} selects no layer of this model",
            key="quantize.targets",
            fix="target Linear layers (the default) and ignore only what must stay unquantized (e.g. lm_head)",
        )
    if isinstance(cfg, GptqConfig | AwqConfig):
        _check_weight_packing(layers, cfg)
    report = Report(layers=layers, devices=plan.devices)
    if plan.engine == "vllm" and plan.scheme == "w4a16" and "cpu" in plan.devices:
        _narrow_cpu_wna16(report)
    return report


def _check_weight_packing(layers: list[Layer], cfg: GptqConfig | AwqConfig) -> None:
    """Group quantization needs each layer's input size divisible by the group size; int4 packs 8 per int32."""
    unit = cfg.group_size or 32 // cfg.bits
    what = f"quantize.group_size={cfg.group_size}" if cfg.group_size else f"{unit} ({cfg.bits}-bit values per int32)"
    bad = [layer for layer in layers if layer.in_features % unit]
    if not bad:
        return
    sizes = sorted({layer.in_features for layer in bad} | {layer.in_features for layer in layers})
    common = math.gcd(*sizes)
    divisor = max((g for g in (128, 64, 32, 16, 8) if common % g == 0), default=None)
    fix = (
        f"set quantize.group_size={divisor} (divides every targeted layer's input size), "
        if divisor and cfg.group_size
        else ""
    )
    fix += (
        "or add the layers to quantize.ignore, e.g. quantize.ignore='[lm_head,re:.*"
        + bad[0].name.split(".")[-1]
        + "$]'"
    )
    _fail(
        [f"{layer.name}: in_features={layer.in_features} is not divisible by {what}" for layer in bad],
        "quantize.group_size",
        fix,
    )


def _narrow_cpu_wna16(report: Report) -> None:
    m = VLLM_CPU_WNA16_MULTIPLE
    bad = [layer for layer in report.layers if layer.in_features % m or layer.out_features % m]
    if bad:
        report.devices = tuple(d for d in report.devices if d != "cpu")
        names = ", ".join(layer.name for layer in bad[:3]) + (" …" if len(bad) > 3 else "")
        report.notes.append(
            f"cpu dropped from target.devices: vLLM's CPU W4A16 kernel needs layer sizes divisible by {m} ({names})"
        )
        log.warning("%s", report.notes[-1])


def _fail(lines: list[str], key: str, fix: str) -> None:
    shown = lines[:MAX_LISTED] + ([f"… and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else [])
    raise QuantizeError(
        f"preflight: {len(lines)} layer(s) do not fit the scheme:\n    " + "\n    ".join(shown), key=key, fix=fix
    )

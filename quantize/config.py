"""Quantization config schemas: one dataclass per method, keyed by ``method`` (the ``quantize=`` option name).

These classes are the schema Hydra validates the YAML in ``conf/quantize/`` against; defaults follow the
published recipes of llm-compressor and ModelOpt. They import nothing heavy: the orchestrator (``build/``) and
the stage code inside a toolchain environment both use them.

Fields fall in three groups, and only the first enters the quantize stage's parameters (and so its cache key):

* what the quantized checkpoint depends on (scheme, calibration sizes, ignore list, seed);
* where the calibration text comes from (``calibration``): the orchestrator turns it into a stage *input*,
  keyed by the digest of its content, so a path never enters the manifest;
* the publication gate (``max_kl``, ``min_top1``): checked after the stage, so loosening it reuses the
  quantized output instead of quantizing again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_CALIBRATION = "kiln:corpus"
GATE_KEYS = ("max_kl", "min_top1")
SOURCE_KEYS = ("calibration",)


@dataclass
class QuantizeConfig:
    """Base schema of every ``quantize=`` option; ``method`` is the registry key."""

    method: str = "none"


@dataclass
class CalibratedConfig(QuantizeConfig):
    """What every real method shares: calibration and held-out data, the layers it touches, the gate."""

    # A local .txt / .jsonl / .json file, a directory of them, a hub dataset id (where the hub is reachable),
    # or kiln:corpus (kiln's own deterministic corpus, offline).
    calibration: str = DEFAULT_CALIBRATION
    text_field: str = "text"  # the JSONL / dataset column holding the text
    num_samples: int = 32  # calibration windows
    seq_len: int = 128  # tokens per calibration (and held-out) window
    eval_samples: int = 16  # held-out windows for the fidelity report, taken after the calibration windows
    targets: list[str] = field(default_factory=lambda: ["Linear"])
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    seed: int = 0
    # Publication gate: the build fails, with the figures, when the fidelity report is outside these limits.
    max_kl: float | None = None  # mean KL(source ‖ quantized) over held-out next-token distributions, in nats
    min_top1: float | None = None  # fraction of held-out positions where both models pick the same token


@dataclass
class GptqConfig(CalibratedConfig):
    """GPTQ weight-only integer quantization (W4A16 by default), llm-compressor's GPTQModifier defaults."""

    method: str = "gptq"
    bits: int = 4
    group_size: int | None = 128  # None: one scale per output channel
    symmetric: bool = True
    dampening_frac: float = 0.01
    block_size: int = 128
    actorder: str | None = "static"  # static | group | weight | null


@dataclass
class AwqConfig(CalibratedConfig):
    """AWQ activation-aware scaling, then weight-only integer quantization (W4A16)."""

    method: str = "awq"
    bits: int = 4
    group_size: int | None = 128
    # null: the backend's published default (llm-compressor: asymmetric, W4A16_ASYM; ModelOpt INT4 AWQ:
    # symmetric, the only form it exports).
    symmetric: bool | None = None
    duo_scaling: str = "both"  # true | false | both (llm-compressor)
    n_grid: int = 20  # grid points searched per mapping


@dataclass
class SmoothQuantConfig(CalibratedConfig):
    """SmoothQuant smoothing, then INT8 weights (per channel) and INT8 activations (W8A8).

    Activation scales follow the engine: dynamic per token for vLLM (llm-compressor's W8A8), one calibrated
    scale per tensor for TensorRT-LLM (ModelOpt's INT8 SmoothQuant).
    """

    method: str = "smoothquant"
    smoothing_strength: float = 0.8  # alpha: how much activation range moves into the weights
    weights: str | None = None  # gptq | rtn: how int8 weights are rounded; null: gptq (vLLM), rtn (TensorRT-LLM)
    dampening_frac: float = 0.01  # GPTQ dampening, when weights=gptq


@dataclass
class Fp8Config(CalibratedConfig):
    """FP8 (e4m3) weights and activations. Dynamic per-token activation scales by default; static variant."""

    method: str = "fp8"
    activations: str = "dynamic"  # dynamic: per-channel weights, per-token scales at run time; static: per tensor


_CHOICES: dict[str, tuple[object, ...]] = {
    "bits": (4, 8),
    "actorder": ("static", "group", "weight", None),
    "duo_scaling": ("true", "false", "both"),
    "weights": ("gptq", "rtn", None),
    "activations": ("dynamic", "static"),
}


def problems(cfg: QuantizeConfig) -> list[tuple[str, str]]:
    """Every out-of-range value of a quantize config, as (override key, message) pairs."""
    if not isinstance(cfg, CalibratedConfig):
        return []
    out: list[tuple[str, str]] = []
    for name, choices in _CHOICES.items():
        value = getattr(cfg, name, choices[0])
        if isinstance(value, str):
            value = value.lower()  # Hydra turns `duo_scaling=true` into the string "True"
        if value not in choices:
            shown = [c if c is not None else "null" for c in choices]
            out.append((f"quantize.{name}", f"{value!r} is not one of {shown}"))
    for name in ("num_samples", "seq_len", "eval_samples", "n_grid", "block_size"):
        if getattr(cfg, name, 1) < 1:
            out.append((f"quantize.{name}", "must be >= 1"))
    group_size = getattr(cfg, "group_size", None)
    if isinstance(group_size, int) and (group_size < 1 or group_size % 2):
        out.append(("quantize.group_size", f"{group_size} must be a positive even number (or null: per channel)"))
    for name in ("smoothing_strength", "dampening_frac"):
        value = float(getattr(cfg, name, 0.5))
        if not 0 < value <= 1:
            out.append((f"quantize.{name}", f"{value} must be in (0, 1]"))
    if cfg.max_kl is not None and cfg.max_kl < 0:
        out.append(("quantize.max_kl", "must be >= 0"))
    if cfg.min_top1 is not None and not 0 <= cfg.min_top1 <= 1:
        out.append(("quantize.min_top1", f"{cfg.min_top1} must be a fraction in [0, 1]"))
    if not cfg.targets:
        out.append(("quantize.targets", "must name at least one module type or name pattern (e.g. Linear)"))
    return out


def stage_config(plain: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved quantize config the quantized checkpoint depends on (the stage's params)."""
    return {k: v for k, v in plain.items() if k not in GATE_KEYS + SOURCE_KEYS}


def from_plain(cls: type[QuantizeConfig], data: dict[str, Any]) -> QuantizeConfig:
    """Rebuild a config from the stage's params (unknown keys are an error: the schema drifted)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    return cls(**data)

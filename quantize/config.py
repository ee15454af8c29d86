"""Quantization config schemas: one frozen-at-validation dataclass per method, keyed by ``method``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QuantizeConfig:
    """Base schema of every ``quantize=`` option; ``method`` is the registry key."""

    method: str = "none"

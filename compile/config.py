"""Compile config schemas: one dataclass per backend, keyed by ``backend``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompileConfig:
    """Base schema of every ``compile=`` option; ``backend`` is the registry key."""

    backend: str = "none"

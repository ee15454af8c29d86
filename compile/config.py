"""Compile config schemas: one dataclass per backend, keyed by ``backend``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class CompileConfig:
    """Base schema of every ``compile=`` option; ``backend`` is the registry key."""

    backend: str = "none"

    def problems(self, build: Any) -> list[tuple[str, str]]:
        """``(override key, message)`` for each value this option cannot work with, given the whole build config.

        Checked once, at the edge, with the rest of the build config (build/config.py: validate).
        """
        return []

    def build_device(self, host_devices: tuple[str, ...]) -> str | None:
        """The device kind the stage compiles for on a build host with ``host_devices`` (best first); None when the
        stage's output is not tied to one (no toolchain choice depends on it)."""
        return None

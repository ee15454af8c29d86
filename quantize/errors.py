"""The quantize stage's user-facing error: it names the config key at fault and the fix.

A :class:`artifacts.errors.StageError`, so the build reports it like any build error, never as a crash with a
traceback (``quantize/`` may import ``artifacts/`` only).
"""

from __future__ import annotations

from artifacts.errors import StageError


class QuantizeError(StageError):
    def __init__(
        self, message: str, *, key: str | None = None, fix: str | None = None, stage: str = "quantize"
    ) -> None:
        super().__init__(stage, message, key=key, fix=fix)

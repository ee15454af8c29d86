"""The quantize stage's user-facing error: it names the config key at fault and the fix.

``quantize/`` may not import ``build/``, so this is its own class; the stage runner recognizes it by its
``user_facing`` marker (see ``build.errors.as_build_error``) and reports it like any build error, never as a
crash with a traceback.
"""

from __future__ import annotations


class QuantizeError(Exception):
    user_facing = True

    def __init__(
        self, message: str, *, key: str | None = None, fix: str | None = None, stage: str = "quantize"
    ) -> None:
        self.stage = stage
        self.message = message
        self.key = key
        self.fix = fix
        super().__init__(message)

"""kiln's user-facing errors: the shared base, the stage error that build, quantize and compile raise, and the
artifact layer's own.

Every class here is user-facing: its message names the object at fault (a file, a URI, a digest, a config key)
and, where there is one, the fix. Callers at a CLI boundary print ``str(err)`` and exit non-zero; they never need
a traceback. The base lives here because ``artifacts/`` is the one package every other kiln package may import.
"""

from __future__ import annotations

import errno


class KilnError(Exception):
    """Root of every error kiln raises on purpose. ``key`` names the setting at fault, ``fix`` what to do."""

    def __init__(self, message: str, *, key: str | None = None, fix: str | None = None) -> None:
        self.message = message
        self.key = key
        self.fix = fix
        super().__init__(message)


class StageError(KilnError):
    """A build stage failed in a way the user can act on (bad input, a refused setting). The build reports it as
    ``[stage] key: message`` with the fix; stage code in ``quantize/`` and ``compile/`` raises it directly."""

    def __init__(self, stage: str, message: str, *, key: str | None = None, fix: str | None = None) -> None:
        self.stage = stage
        super().__init__(message, key=key, fix=fix)


class ArtifactError(KilnError):
    """Root of every error the artifact layer raises on purpose."""


class ManifestError(ArtifactError):
    """A manifest is malformed, from an unknown schema, or names unsafe paths."""


class UriError(ArtifactError):
    """An artifact URI cannot be parsed or names an unknown store."""


class NotFoundError(ArtifactError):
    """An artifact, tag or blob does not exist in the store."""


class VerificationError(ArtifactError):
    """File contents do not match the manifest (size or sha256), or a file is missing or unsafe."""


class StoreError(ArtifactError):
    """The store itself failed: permissions, I/O, network."""


class DiskFullError(StoreError):
    """The disk filled up while kiln wrote to it (nothing partial is kept); the message names where and the fix."""


def is_out_of_space(exc: BaseException | str) -> bool:
    """ENOSPC anywhere in ``exc``'s chain, or in its text (safetensors and remote stage tracebacks carry the OS error
    only as text: "No space left on device (os error 28)")."""
    if isinstance(exc, str):
        return "No space left on device" in exc or "os error 28" in exc
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "errno", None) == errno.ENOSPC or is_out_of_space(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False

"""Errors raised by the artifact layer.

Every class here is user-facing: its message names the object at fault (a file, a URI, a digest) and, where there
is one, the fix. Callers at a CLI boundary print ``str(err)`` and exit non-zero; they never need a traceback.
"""

from __future__ import annotations


class ArtifactError(Exception):
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

"""kiln artifacts: the manifest format, digests and stores shared by the build and the runtime.

This package is the only thing the two halves of kiln share. It imports the standard library only (plus
boto3 for S3, lazily), so the slim runtime can depend on it.
"""

from artifacts.errors import (
    ArtifactError,
    ManifestError,
    NotFoundError,
    StoreError,
    UriError,
    VerificationError,
)
from artifacts.manifest import MANIFEST_NAME, SCHEMA, FileEntry, Manifest, Target
from artifacts.uri import ArtifactRef, parse_ref

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA",
    "ArtifactError",
    "ArtifactRef",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "NotFoundError",
    "StoreError",
    "Target",
    "UriError",
    "VerificationError",
    "parse_ref",
]

__version__ = "0.1.0"

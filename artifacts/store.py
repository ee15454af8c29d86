"""The store interface and the store registry.

A store holds content-addressed blobs (every file of every artifact, and each manifest's canonical bytes),
names that point at manifests, and tags that point at digests. The same key layout is used by every store:

    blobs/sha256/<hex>                    file contents and manifest bytes
    names/<name>/manifests/<hex>          marker: artifact <name> has manifest sha256:<hex>
    names/<name>/tags/<tag>               text "sha256:<hex>"
    names/<name>/records/<hex>.json       build record (time, host, ...): volatile, outside the digest
    names/<name>/signatures/<hex>/<key>.json   a signature of manifest sha256:<hex> (artifacts/signing.py)

Publishing writes blobs first, then the manifest and its marker, then its signature, then tags, so a reader never
sees a name or tag that points at missing content (or, with a signing key, at a manifest not yet signed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from artifacts.errors import UriError
from artifacts.uri import scheme_of

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class ArtifactInfo:
    """One name in a store: its manifests and its tags."""

    name: str
    digests: tuple[str, ...]
    tags: Mapping[str, str] = field(default_factory=dict)


class Store(Protocol):
    """What the artifact operations need from a store."""

    uri: str

    def has_blob(self, digest: str) -> bool: ...

    def put_blob(self, digest: str, src: Path, size: int, progress: ProgressFn | None = None) -> None:
        """Store ``src`` (whose content hashes to ``digest``) unless present. Must re-verify while writing."""
        ...

    def fetch_blob(self, digest: str, size: int, dest: Path, progress: ProgressFn | None = None) -> None:
        """Write the blob to ``dest`` atomically, verifying size and sha256 while streaming."""
        ...

    def check_blob(self, digest: str, size: int) -> None:
        """Re-hash a stored blob; raise VerificationError if it is missing or differs."""
        ...

    def read_blob(self, digest: str, size: int) -> Iterator[bytes]:
        """The blob's bytes in order, verified while streaming: VerificationError comes before the last chunk."""
        ...

    def put_stream(self, digest: str, size: int, chunks: Iterable[bytes], progress: ProgressFn | None = None) -> None:
        """Store a blob from a stream of chunks, verified before it becomes visible (for copies between stores)."""
        ...

    def preflight(self) -> None:
        """Fail fast, before a long build, if the store cannot be reached or written."""
        ...

    def put_manifest(self, name: str, data: bytes) -> str: ...

    def get_manifest(self, name: str, digest: str) -> bytes: ...

    def set_tag(self, name: str, tag: str, digest: str) -> None: ...

    def resolve_tag(self, name: str, tag: str) -> str: ...

    def put_record(self, name: str, digest: str, record: Mapping[str, Any]) -> None: ...

    def list_artifacts(self) -> list[ArtifactInfo]: ...

    def put_signature(self, name: str, digest: str, doc: bytes) -> None:
        """Store a signature document of manifest ``digest`` (one per signing key: a new one replaces it)."""
        ...

    def get_signatures(self, name: str, digest: str) -> list[bytes]:
        """Every signature document stored for manifest ``digest`` (none: an empty list)."""
        ...


def signature_leaf(doc: bytes) -> str:
    """The file name a signature document is stored under: its key id, ``ed25519-<hex>.json``."""
    from artifacts.signing import doc_key

    return doc_key(doc).replace(":", "-") + ".json"


def _local(uri: str) -> Store:
    from artifacts.local import LocalStore

    return LocalStore(uri)


def _s3(uri: str) -> Store:
    from artifacts.s3 import S3Store

    return S3Store(uri)


# Registry keyed by the `publish=` config option name; `SCHEME_TO_STORE` maps URI schemes onto it.
STORES: dict[str, Callable[[str], Store]] = {"local": _local, "s3": _s3}
SCHEME_TO_STORE = {"file": "local", "s3": "s3"}


def open_store(uri: str) -> Store:
    """Open the store named by a store URI (``file:///…`` or ``s3://…``)."""
    scheme = scheme_of(uri)
    kind = SCHEME_TO_STORE.get(scheme)
    if kind is None:
        raise UriError(f"{uri!r}: no store for {scheme}:// URIs is available (known: {sorted(SCHEME_TO_STORE)})")
    return STORES[kind](uri)

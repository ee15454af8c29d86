"""sha256 helpers shared by the stores, the verifier and the build's stage cache."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from artifacts.errors import VerificationError
from artifacts.names import DIGEST_RE

CHUNK = 4 * 1024 * 1024


def is_digest(text: str) -> bool:
    """True for ``sha256:<64 lowercase hex>``."""
    return bool(DIGEST_RE.match(text))


def hex_of(digest: str) -> str:
    """The hex part of ``sha256:<hex>``; raises ValueError on anything else."""
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.split(":", 1)[1]


def sha256_bytes(data: bytes) -> str:
    """``sha256:<hex>`` of a byte string."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_stream(stream: BinaryIO) -> tuple[str, int]:
    """Digest and length of everything left in ``stream``."""
    h = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def sha256_file(path: Path) -> tuple[str, int]:
    """Digest and size of a file, read once in large chunks (hashlib releases the GIL on them)."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def file_chunks(path: Path, chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of a file, read once, in large chunks."""
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data


def verify_stream(chunks: Iterable[bytes], digest: str, size: int, name: str) -> Iterator[bytes]:
    """Pass ``chunks`` through, hashing them; raise VerificationError naming ``name`` if they are not the blob.

    The digest is checked *before* the chunk that completes ``size`` bytes is handed on, so a consumer that
    commits only after reading everything (a multipart upload, a rename) never commits wrong bytes.
    """
    h = hashlib.sha256()
    seen = 0
    checked = False
    for chunk in chunks:
        seen += len(chunk)
        if seen > size:
            raise VerificationError(f"{name} is corrupt: longer than the expected {size} bytes")
        h.update(chunk)
        if seen == size:
            _check(h, digest, size, name)
            checked = True
        yield chunk
    if seen < size:
        raise VerificationError(f"{name} is corrupt: {seen} bytes, expected {size} (truncated)")
    if not checked:  # an empty blob: no chunk completed it
        _check(h, digest, size, name)


def _check(h: Any, digest: str, size: int, name: str) -> None:
    got = "sha256:" + h.hexdigest()
    if got != digest:
        raise VerificationError(f"{name} is corrupt: expected {digest} ({size} bytes), got {got} ({size} bytes)")

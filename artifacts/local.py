"""The local, content-addressed store (the default ``publish=local``)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from artifacts.digest import file_chunks, hex_of, sha256_bytes, sha256_file, verify_stream
from artifacts.errors import DiskFullError, NotFoundError, StoreError, VerificationError, is_out_of_space
from artifacts.names import check_digest, check_name, check_tag
from artifacts.store import ArtifactInfo, ProgressFn, signature_leaf
from artifacts.uri import normalize_store_uri


class LocalStore:
    """A store rooted at a local directory; see :mod:`artifacts.store` for the layout."""

    def __init__(self, uri: str) -> None:
        self.uri = normalize_store_uri(uri)
        self.root = Path(self.uri[len("file://") :])

    # -- blobs ---------------------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / hex_of(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def put_blob(self, digest: str, src: Path, size: int, progress: ProgressFn | None = None) -> None:
        if self.has_blob(digest):
            if progress:
                progress(size)
            return
        write_verified(src, self.blob_path(digest), digest, size, progress, name=str(src))
        self.blob_path(digest).chmod(0o444)

    def fetch_blob(self, digest: str, size: int, dest: Path, progress: ProgressFn | None = None) -> None:
        blob = self.blob_path(digest)
        if not blob.is_file():
            raise NotFoundError(f"blob {digest} is missing from store {self.uri}")
        write_verified(blob, dest, digest, size, progress, name=f"{self.uri} blob {digest}")

    def check_blob(self, digest: str, size: int) -> None:
        blob = self.blob_path(digest)
        if not blob.is_file():
            raise VerificationError(f"blob {digest} is missing from store {self.uri}")
        got, got_size = sha256_file(blob)
        if got != digest or got_size != size:
            raise VerificationError(
                f"blob {blob} is corrupt: expected {digest} ({size} bytes), found {got} ({got_size} bytes)"
            )

    def read_blob(self, digest: str, size: int) -> Iterator[bytes]:
        blob = self.blob_path(digest)
        if not blob.is_file():
            raise NotFoundError(f"blob {digest} is missing from store {self.uri}")
        return verify_stream(file_chunks(blob), digest, size, name=f"{self.uri} blob {digest}")

    def put_stream(self, digest: str, size: int, chunks: Iterable[bytes], progress: ProgressFn | None = None) -> None:
        write_chunks(chunks, self.blob_path(digest), digest, size, progress, name=f"blob {digest} for {self.uri}")
        self.blob_path(digest).chmod(0o444)

    def preflight(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store {self.uri}: {exc.strerror}") from exc
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"store {self.uri} is not writable")

    # -- manifests, tags, records --------------------------------------------------------------------------
    def put_manifest(self, name: str, data: bytes) -> str:
        digest = sha256_bytes(data)
        if not self.has_blob(digest):
            self._write_bytes(self.blob_path(digest), data)
        self._write_bytes(self._name_dir(name) / "manifests" / hex_of(digest), b"")
        return digest

    def get_manifest(self, name: str, digest: str) -> bytes:
        marker = self._name_dir(name) / "manifests" / hex_of(check_digest(digest))
        blob = self.blob_path(digest)
        if not marker.exists() or not blob.is_file():
            raise NotFoundError(f"{self.uri}/{name}@{digest} does not exist")
        data = blob.read_bytes()
        if sha256_bytes(data) != digest:
            raise VerificationError(f"manifest {self.uri}/{name}@{digest} is corrupt in the store")
        return data

    def set_tag(self, name: str, tag: str, digest: str) -> None:
        self._write_bytes(self._name_dir(name) / "tags" / check_tag(tag), f"{check_digest(digest)}\n".encode())

    def resolve_tag(self, name: str, tag: str) -> str:
        path = self._name_dir(name) / "tags" / check_tag(tag)
        if not path.is_file():
            raise NotFoundError(f"{self.uri}/{name}:{tag} does not exist")
        return path.read_text().strip()

    def put_record(self, name: str, digest: str, record: Mapping[str, Any]) -> None:
        data = json.dumps(dict(record), indent=2, sort_keys=True).encode()
        self._write_bytes(self._name_dir(name) / "records" / f"{hex_of(check_digest(digest))}.json", data)

    def put_signature(self, name: str, digest: str, doc: bytes) -> None:
        self._write_bytes(self._signature_dir(name, digest) / signature_leaf(doc), doc)

    def get_signatures(self, name: str, digest: str) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self._signature_dir(name, digest).glob("*.json"))]

    def _signature_dir(self, name: str, digest: str) -> Path:
        return self._name_dir(name) / "signatures" / hex_of(check_digest(digest))

    def list_artifacts(self) -> list[ArtifactInfo]:
        names_dir = self.root / "names"
        if not names_dir.is_dir():
            return []
        infos = []
        for name_dir in sorted(p for p in names_dir.iterdir() if p.is_dir()):
            digests = tuple(sorted(f"sha256:{m.name}" for m in (name_dir / "manifests").glob("*")))
            tags = {t.name: t.read_text().strip() for t in sorted((name_dir / "tags").glob("*"))}
            infos.append(ArtifactInfo(name=name_dir.name, digests=digests, tags=tags))
        return infos

    # -- helpers -------------------------------------------------------------------------------------------
    def _name_dir(self, name: str) -> Path:
        return self.root / "names" / check_name(name)

    def _tmp_file(self, near: Path) -> tuple[int, str]:
        try:
            near.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=near.parent, prefix=".tmp-")
        except OSError as exc:
            raise StoreError(f"cannot write to store {self.uri}: {exc.strerror} ({near.parent})") from exc

    def _write_bytes(self, dest: Path, data: bytes) -> None:
        fd, tmp = self._tmp_file(dest)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if is_out_of_space(exc):
                raise DiskFullError(f"no space left on the disk of store {self.uri}: free space there") from None
            raise


def write_verified(src: Path, dest: Path, digest: str, size: int, progress: ProgressFn | None, name: str) -> None:
    """Copy ``src`` to ``dest`` through a temporary file, hashing while copying; rename only if it matches.

    On mismatch the temporary file is removed and VerificationError names ``name``.
    """
    write_chunks(file_chunks(src), dest, digest, size, progress, name)


def write_chunks(
    chunks: Iterable[bytes], dest: Path, digest: str, size: int, progress: ProgressFn | None, name: str
) -> None:
    """Write a stream to ``dest`` through a temporary file, hashing while writing; rename only if it matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fout:
            for chunk in verify_stream(chunks, digest, size, name):
                fout.write(chunk)
                if progress:
                    progress(len(chunk))
        os.replace(tmp, dest)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_out_of_space(exc):
            raise DiskFullError(f"no space left on device writing {size} bytes of {name} into {dest.parent}") from None
        raise

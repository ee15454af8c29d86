"""A Hugging Face checkpoint stored as a plain S3 prefix (the build's ``model.source=s3://bucket/prefix/``, LMI's
``HF_MODEL_ID=s3://bucket/prefix/``), mirrored into the kiln cache. It lives in ``artifacts/`` so that the build
and the runtime share it without the runtime importing the build.

The prefix is mirrored into ``<cache>/sources/s3/<digest of the URI>/files`` (``source.txt`` beside it names the
prefix). Objects come down with parallel
ranged GETs pinned to the ETag the listing gave (an object replaced mid-download fails), are checked against the
listed size, hashed while they are written and, where the object carries a full-object SHA-256 checksum in S3,
checked against it. Each file lands through a temporary file and a rename, and the mirror's state records each
file's ETag, size and sha256 as soon as that file is complete, so a killed fetch resumes with the files it had
finished. A later fetch downloads only objects whose ETag or size changed and re-hashes the files it keeps: one
whose sha256 is not the recorded one (a damaged mirror) is downloaded again, never used.

:func:`open_prefix` lists without downloading; :meth:`Mirror.fetch` brings some or all files (the runtime fetches
the small ones first, then the weights while the engine starts); :func:`fetch_prefix` does both.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from artifacts.digest import sha256_bytes, sha256_file
from artifacts.errors import ManifestError, VerificationError
from artifacts.manifest import MANIFEST_NAME, FileEntry, check_relpath
from artifacts.ops import JOBS
from artifacts.paths import cache_root
from artifacts.progress import byte_progress
from artifacts.s3 import S3Location, S3Transport

log = logging.getLogger("kiln.artifacts.s3_mirror")


@dataclass(frozen=True)
class Listed:
    rel: str  # path inside the checkpoint
    key: str
    size: int
    etag: str
    sha256_checksum: bool = False  # S3 holds a SHA-256 checksum for the object


@dataclass
class Mirror:
    """One S3 prefix and its mirror directory. ``listed``: every object under the prefix (for messages);
    ``objects``: those the patterns select, which the mirror holds."""

    uri: str
    files: Path
    listed: list[Listed]
    objects: list[Listed]
    _s3: S3Transport
    _root: Path
    _state: dict[str, dict[str, object]]
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fetch(self, select: Callable[[str], bool] = lambda rel: True) -> list[FileEntry]:
        """Make the mirror hold every selected object, verified; return their entries (sorted by path).

        Raises ArtifactError (store, network, integrity); nothing unverified is left under its final name.
        """
        objects = [o for o in self.objects if select(o.rel)]
        kept = [o for o in objects if _unchanged(self.files / o.rel, self._state.get(o.rel), o)]
        with ThreadPoolExecutor(JOBS) as pool:
            rehashed = list(pool.map(lambda o: _rehash(self.files, o.rel), kept))
        intact = [e for o, e in zip(kept, rehashed, strict=True) if e.sha256 == self._state[o.rel].get("sha256")]
        damaged = sorted({o.rel for o in kept} - {e.path for e in intact})
        if damaged:
            log.warning(
                "%s: the mirror's %s no longer match what was downloaded; fetching them again", self.uri, damaged[:5]
            )
        missing = [o for o in objects if o.rel not in {e.path for e in intact}]
        total = sum(o.size for o in missing)
        log.info("%s: %d files to download (%d bytes), %d already here", self.uri, len(missing), total, len(intact))
        with byte_progress(total, f"download {self.uri}", log) as advance, ThreadPoolExecutor(JOBS) as pool:
            fetched = list(pool.map(lambda o: self._download(o, advance), missing))
        return sorted(fetched + intact, key=lambda e: e.path)

    def _download(self, obj: Listed, advance: Callable[[int], None]) -> FileEntry:
        entry = _download(self._s3, obj, self.files / obj.rel, advance)
        with self._lock:  # recorded at once: a killed fetch resumes from the files it had finished
            self._state[obj.rel] = {"etag": obj.etag, "size": obj.size, "sha256": entry.sha256}
            _save_state(self._root, self._state)
        return entry


def open_prefix(uri: str, patterns: list[str]) -> Mirror:
    """List ``uri`` (no download): the mirror of the objects whose relative path matches ``patterns``.

    Raises ArtifactError (store, network) and ManifestError for keys that are not safe paths.
    """
    loc = S3Location.parse(uri)
    s3 = S3Transport(loc.bucket)
    listed = _listing(s3, loc)
    objects = [o for o in listed if o.rel != MANIFEST_NAME and any(fnmatch.fnmatch(o.rel, p) for p in patterns)]
    root = cache_root() / "sources" / "s3" / sha256_bytes(uri.rstrip("/").encode()).split(":")[1][:32]
    files = root / "files"
    state = _load_state(root)
    _note_source(root, uri)
    selected = {o.rel for o in objects}
    state = {rel: v for rel, v in state.items() if rel in selected}
    _prune(files, selected)
    return Mirror(uri, files, listed, objects, s3, root, state)


def fetch_prefix(uri: str, patterns: list[str]) -> tuple[Path, list[FileEntry]]:
    """Mirror the objects under ``uri`` whose relative path matches ``patterns``; return the directory and files."""
    mirror = open_prefix(uri, patterns)
    if not mirror.objects:
        raise ManifestError(f"{uri}: no objects matching {patterns} under this prefix")
    return mirror.files, mirror.fetch()


def _listing(s3: S3Transport, loc: S3Location) -> list[Listed]:
    base = f"{loc.prefix}/" if loc.prefix else ""
    out = []
    for obj in s3.list(base):
        rel = obj["Key"][len(base) :]
        if not rel or rel.endswith("/"):  # folder markers
            continue
        try:
            check_relpath(rel)
        except ManifestError:
            raise ManifestError(f"{loc.url(obj['Key'])}: the key is not a safe relative path; refusing it") from None
        sha = "SHA256" in (obj.get("ChecksumAlgorithm") or [])
        out.append(Listed(rel, obj["Key"], int(obj["Size"]), str(obj["ETag"]), sha))
    return out


def _unchanged(path: Path, known: dict[str, object] | None, obj: Listed) -> bool:
    if known is None or (known.get("etag"), known.get("size")) != (obj.etag, obj.size):
        return False
    if path.is_symlink() or not path.is_file():
        return False
    return path.stat().st_size == obj.size


def _download(s3: S3Transport, obj: Listed, dest: Path, advance: Callable[[int], None]) -> FileEntry:
    """Stream one object to ``dest`` through a temporary file, hashing as it is written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    h = hashlib.sha256()
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in s3.iter_object(obj.key, obj.size, etag=obj.etag):
                h.update(chunk)
                f.write(chunk)
                written += len(chunk)
                advance(len(chunk))
        if written != obj.size:
            raise VerificationError(f"{s3.url(obj.key)}: got {written} bytes, the listing says {obj.size}")
        if obj.sha256_checksum:
            _check_s3_checksum(s3, obj, h.digest())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return FileEntry(obj.rel, obj.size, "sha256:" + h.hexdigest())


def _check_s3_checksum(s3: S3Transport, obj: Listed, digest: bytes) -> None:
    """Compare with S3's own SHA-256 of the object, where it is a full-object one (a multipart upload's composite
    checksum, ``…-N``, is a hash of the parts' hashes and says nothing comparable)."""
    with s3.errors("check", obj.key):
        head = s3.client.head_object(Bucket=s3.bucket, Key=obj.key, IfMatch=obj.etag, ChecksumMode="ENABLED")
    stored = str(head.get("ChecksumSHA256") or "")
    if not stored or "-" in stored or head.get("ChecksumType") == "COMPOSITE":
        return
    if stored != base64.b64encode(digest).decode():
        raise VerificationError(
            f"{s3.url(obj.key)} is corrupt: its bytes do not match the SHA-256 checksum S3 holds for it; "
            "nothing was kept: upload the file again"
        )


def _rehash(files: Path, rel: str) -> FileEntry:
    digest, size = sha256_file(files / rel)
    return FileEntry(rel, size, digest)


def _prune(files: Path, wanted: set[str]) -> None:
    """Remove files the prefix no longer holds (and leftovers of interrupted downloads)."""
    if not files.is_dir():
        return
    for path in sorted(files.rglob("*"), reverse=True):
        rel = path.relative_to(files).as_posix()
        if (path.is_file() or path.is_symlink()) and rel not in wanted:
            path.unlink()
        elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


def _note_source(root: Path, uri: str) -> None:
    """``source.txt``: which prefix this cache directory mirrors (its name is a digest), for operators."""
    if not (root / "source.txt").is_file():
        root.mkdir(parents=True, exist_ok=True)
        (root / "source.txt").write_text(uri.rstrip("/") + "/\n")


def _load_state(root: Path) -> dict[str, dict[str, object]]:
    try:
        return dict(json.loads((root / "state.json").read_text()))
    except (OSError, ValueError):
        return {}


def _save_state(root: Path, state: dict[str, dict[str, object]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, root / "state.json")

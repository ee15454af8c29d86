"""A Hugging Face checkpoint stored as a plain S3 prefix (the build's ``model.source=s3://bucket/prefix/``), mirrored
into the kiln cache. It lives in ``artifacts/`` so that the runtime can serve such a prefix too (LMI's
``HF_MODEL_ID=s3://…/``) without importing the build.

The prefix is mirrored into the kiln cache (``<cache>/sources/s3/<digest of the URI>/files``). Objects come down
with parallel ranged GETs pinned to the ETag the listing gave (an object replaced mid-download fails), are
checked against the listed size, and are hashed while they are written, so the source digest needs no second
pass. Each file lands through a temporary file and a rename, and the mirror's state records each file's ETag, size
and sha256. A re-run downloads only objects whose ETag or size changed, and re-hashes the files it keeps: one whose
sha256 is not the recorded one (a damaged mirror) is downloaded again, never used.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from artifacts.digest import sha256_bytes, sha256_file
from artifacts.errors import ManifestError, VerificationError
from artifacts.manifest import MANIFEST_NAME, FileEntry, check_relpath
from artifacts.ops import JOBS
from artifacts.paths import cache_root
from artifacts.progress import byte_progress
from artifacts.s3 import S3Location, S3Transport

log = logging.getLogger("kiln.build.source")


@dataclass(frozen=True)
class _Object:
    rel: str  # path inside the checkpoint
    key: str
    size: int
    etag: str


def fetch_prefix(uri: str, patterns: list[str]) -> tuple[Path, list[FileEntry]]:
    """Mirror the objects under ``uri`` whose relative path matches ``patterns``; return the directory and files.

    Raises ArtifactError (store, network, integrity) and ManifestError for keys that are not safe paths.
    """
    loc = S3Location.parse(uri)
    s3 = S3Transport(loc.bucket)
    objects = _listing(s3, loc, patterns, uri)
    root = cache_root() / "sources" / "s3" / sha256_bytes(uri.encode()).split(":")[1][:32]
    files = root / "files"
    known = _load_state(root)
    kept = [o for o in objects if _unchanged(files / o.rel, known.get(o.rel), o)]
    _prune(files, {o.rel for o in objects})
    with ThreadPoolExecutor(JOBS) as pool:
        rehashed = list(pool.map(lambda o: _rehash(files, o.rel), kept))
    intact = [e for o, e in zip(kept, rehashed, strict=True) if e.sha256 == known[o.rel].get("sha256")]
    damaged = sorted({o.rel for o in kept} - {e.path for e in intact})
    if damaged:
        log.warning("%s: the mirror's %s no longer match what was downloaded; fetching them again", uri, damaged[:5])
    missing = [o for o in objects if o.rel not in {e.path for e in intact}]
    total = sum(o.size for o in missing)
    log.info("%s: %d files to download (%d bytes), %d already here", uri, len(missing), total, len(intact))
    with byte_progress(total, f"download {uri}") as advance, ThreadPoolExecutor(JOBS) as pool:
        entries = list(pool.map(lambda o: _download(s3, o, files / o.rel, advance), missing)) + intact
    by_path = {e.path: e.sha256 for e in entries}
    _save_state(root, {o.rel: {"etag": o.etag, "size": o.size, "sha256": by_path[o.rel]} for o in objects})
    return files, sorted(entries, key=lambda e: e.path)


def _listing(s3: S3Transport, loc: S3Location, patterns: list[str], uri: str) -> list[_Object]:
    base = f"{loc.prefix}/" if loc.prefix else ""
    out = []
    for obj in s3.list(base):
        rel = obj["Key"][len(base) :]
        if rel.endswith("/") or rel == MANIFEST_NAME or not any(fnmatch.fnmatch(rel, p) for p in patterns):
            continue
        try:
            check_relpath(rel)
        except ManifestError:
            raise ManifestError(f"{loc.url(obj['Key'])}: the key is not a safe relative path; refusing it") from None
        out.append(_Object(rel, obj["Key"], int(obj["Size"]), str(obj["ETag"])))
    if not out:
        raise ManifestError(f"{uri}: no objects matching {patterns} under this prefix")
    return out


def _unchanged(path: Path, known: dict[str, object] | None, obj: _Object) -> bool:
    if known is None or (known.get("etag"), known.get("size")) != (obj.etag, obj.size):
        return False
    if path.is_symlink() or not path.is_file():
        return False
    return path.stat().st_size == obj.size


def _download(s3: S3Transport, obj: _Object, dest: Path, advance: Callable[[int], None]) -> FileEntry:
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
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return FileEntry(obj.rel, obj.size, "sha256:" + h.hexdigest())


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
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


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

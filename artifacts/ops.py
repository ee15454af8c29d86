"""Operations on artifacts that work the same on every store: publish, pull, verify, copy."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from artifacts import signing
from artifacts.digest import sha256_file
from artifacts.errors import ArtifactError, DiskFullError, ManifestError, VerificationError, is_out_of_space
from artifacts.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath
from artifacts.names import check_tag
from artifacts.progress import byte_progress
from artifacts.store import Store, open_store
from artifacts.uri import ArtifactRef

log = logging.getLogger("kiln.artifacts")
JOBS = min(8, (os.cpu_count() or 2) * 2)


def link_tree(src: Path, dest: Path) -> None:
    """Hard-link the files under ``src`` into ``dest`` (a copy across filesystems): stages that add to a checkpoint
    (the compile cache, a draft model) make no second copy of its weights."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)


def scan_dir(directory: Path) -> list[FileEntry]:
    """Hash every regular file under ``directory`` (except the manifest and its signatures) into manifest entries.

    Symlinks are refused: an artifact is plain files, so what is verified is what is served.
    """
    paths = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise ManifestError(f"{path} is a symlink; artifacts hold regular files only")
        if path.is_file() and rel not in (MANIFEST_NAME, signing.SIGNATURES_NAME):
            paths.append((rel, path))
    with ThreadPoolExecutor(JOBS) as pool:
        digests = list(pool.map(lambda item: sha256_file(item[1]), paths))
    return [
        FileEntry(path=rel, size=size, sha256=digest) for (rel, _), (digest, size) in zip(paths, digests, strict=True)
    ]


def read_dir_manifest(directory: Path) -> Manifest:
    """Parse ``directory/manifest.json``."""
    path = directory / MANIFEST_NAME
    if path.is_symlink():
        raise VerificationError(f"{path} is a symlink; refusing it")
    return Manifest.from_bytes(path.read_bytes())


def verify_dir(directory: Path, manifest: Manifest) -> list[str]:
    """Check every file of ``manifest`` under ``directory`` (size, then sha256). Returns unlisted files.

    Raises VerificationError naming the first bad file. Unlisted files are returned (not refused) so a
    caller can warn: users add ``serving.properties`` beside an artifact on purpose.
    """
    verify_files(directory, manifest.files)
    listed = {e.path for e in manifest.files} | {MANIFEST_NAME, signing.SIGNATURES_NAME}
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() not in listed
    )


def verify_files(directory: Path, files: Iterable[FileEntry], *, contents: bool = True) -> None:
    """Check that each entry exists under ``directory`` as a regular file with its size and sha256.

    ``contents=False`` skips the sha256 (for callers that hash while copying anyway, e.g. publish).
    """
    root = directory.resolve()

    def check(entry: FileEntry) -> None:
        path = directory / entry.path
        _refuse_symlinks(directory, entry.path)
        if not path.is_file():
            raise VerificationError(f"{entry.path}: missing from {directory}")
        if not path.resolve().is_relative_to(root):
            raise VerificationError(f"{entry.path}: resolves outside {directory}")
        if path.stat().st_size != entry.size:
            raise VerificationError(
                f"{entry.path}: size {path.stat().st_size} does not match the manifest ({entry.size}); "
                "the file is truncated or was modified"
            )
        if not contents:
            return
        digest, _ = sha256_file(path)
        if digest != entry.sha256:
            raise VerificationError(f"{entry.path}: sha256 {digest} does not match the manifest ({entry.sha256})")

    with ThreadPoolExecutor(JOBS) as pool:
        list(pool.map(check, files))


def _refuse_symlinks(directory: Path, rel: str) -> None:
    current = directory
    for part in rel.split("/"):
        current = current / part
        if current.is_symlink():
            raise VerificationError(f"{rel}: {current} is a symlink; refusing it")


def resolve(ref: ArtifactRef, store: Store | None = None) -> ArtifactRef:
    """Turn a tag reference into a digest reference."""
    if ref.digest:
        return ref
    store = store or open_store(ref.store)
    assert ref.tag is not None
    return ref.with_digest(store.resolve_tag(ref.name, ref.tag))


def load_manifest(ref: ArtifactRef, store: Store | None = None) -> tuple[ArtifactRef, Manifest]:
    """Resolve ``ref`` and fetch its manifest, checking that the bytes hash to the digest."""
    store = store or open_store(ref.store)
    ref = resolve(ref, store)
    assert ref.digest is not None
    manifest = Manifest.from_bytes(store.get_manifest(ref.name, ref.digest))
    if manifest.digest != ref.digest:
        raise VerificationError(f"{ref}: manifest bytes are not canonical (digest {manifest.digest})")
    if manifest.name != ref.name:
        raise VerificationError(f"{ref}: manifest is for artifact {manifest.name!r}, not {ref.name!r}")
    return ref, manifest


def publish(
    directory: Path,
    manifest: Manifest,
    store_uri: str,
    tags: Iterable[str] = (),
    record: Mapping[str, Any] | None = None,
    signing_key: Path | None = None,
    signature_docs: Iterable[bytes] = (),
) -> ArtifactRef:
    """Upload what the store lacks, then the manifest, its signatures (made with ``signing_key``, and
    ``signature_docs`` carried from elsewhere, e.g. a pulled directory), then the tags. Safe to re-run."""
    tags = [check_tag(t) for t in tags]  # before any upload: a bad tag must not leave a half-published artifact
    signer = signing.load_private(signing_key) if signing_key is not None else None  # a bad key fails before uploads
    store = open_store(store_uri)
    with ThreadPoolExecutor(JOBS) as pool:
        missing = _missing_blobs(store, manifest, pool)
        total = sum(e.size for e in missing)
        log.info("publish %s: %d blobs to upload (%d bytes)", manifest.name, len(missing), total)
        start = time.monotonic()
        with byte_progress(total, f"publish {manifest.name}", log) as advance:
            list(pool.map(lambda e: store.put_blob(e.sha256, directory / e.path, e.size, advance), missing))
    docs = [*signature_docs, *([signing.sign(manifest.digest, signer)] if signer else [])]
    ref = _finish(store, manifest, tags, record, docs)
    _log_rate("published", ref, total, start)
    return ref


def sign(ref: ArtifactRef, signing_key: Path) -> tuple[ArtifactRef, str]:
    """Sign a stored artifact's manifest (verified as it is read) with ``signing_key``; returns the ref and key id."""
    private = signing.load_private(signing_key)
    store = open_store(ref.store)
    ref, manifest = load_manifest(ref, store)
    doc = signing.sign(manifest.digest, private)
    store.put_signature(manifest.name, manifest.digest, doc)
    return ref, signing.doc_key(doc)


def signatures(ref: ArtifactRef, store: Store | None = None) -> list[bytes]:
    """The signature documents stored for a resolved ref (``ref.digest`` set)."""
    assert ref.digest is not None
    return (store or open_store(ref.store)).get_signatures(ref.name, ref.digest)


def pull(ref: ArtifactRef, dest: Path) -> Manifest:
    """Materialize an artifact into ``dest`` (which must not exist), verified, via an atomic rename."""
    store = open_store(ref.store)
    ref, manifest = load_manifest(ref, store)
    if dest.exists():
        raise VerificationError(f"{dest} already exists; pull into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _check_space(dest.parent, manifest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".pull-{manifest.name}-"))
    start = time.monotonic()
    try:
        with (
            byte_progress(manifest.total_size, f"pull {manifest.name}", log) as advance,
            ThreadPoolExecutor(JOBS) as pool,
        ):
            list(pool.map(lambda e: _fetch(store, e, tmp, advance), manifest.files))
        (tmp / MANIFEST_NAME).write_bytes(manifest.to_bytes())
        if docs := store.get_signatures(manifest.name, manifest.digest):  # the directory carries them
            (tmp / signing.SIGNATURES_NAME).write_bytes(signing.to_dir_bytes(docs))
        try:
            os.rename(tmp, dest)
        except OSError as exc:  # a concurrent pull of the same artifact renamed its copy there first
            if dest.is_dir() and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise VerificationError(f"{dest} already exists; another pull of it finished first") from None
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(exc):  # another writer took the space after the check: nothing partial is kept
            why = _space_message(dest.parent, manifest)
            raise DiskFullError(f"{why} (the disk filled up during the pull)") from None
        raise
    _log_rate("pulled", ref, manifest.total_size, start)
    return manifest


def _check_space(where: Path, manifest: Manifest) -> None:
    """Refuse a pull that cannot fit before downloading any of it."""
    if shutil.disk_usage(where).free < manifest.total_size:
        raise DiskFullError(_space_message(where, manifest))


def _space_message(where: Path, manifest: Manifest) -> str:
    free = shutil.disk_usage(where).free
    return (
        f"not enough space to pull {manifest.name}@{manifest.digest} ({manifest.total_size / 1e6:.1f} MB) into "
        f"{where}: {free / 1e6:.1f} MB free; free space there, or pull to a larger disk (serve pulls into "
        "$KILN_CACHE/pulled)"
    )


def _fetch(store: Store, entry: FileEntry, root: Path, advance: Callable[[int], None]) -> None:
    try:
        store.fetch_blob(entry.sha256, entry.size, root / check_relpath(entry.path), advance)
    except ArtifactError as exc:
        raise type(exc)(f"{entry.path}: {exc}") from None


def verify_ref(ref: ArtifactRef) -> tuple[ArtifactRef, Manifest]:
    """Check the manifest and every blob of a stored artifact."""
    store = open_store(ref.store)
    ref, manifest = load_manifest(ref, store)
    with ThreadPoolExecutor(JOBS) as pool:
        list(pool.map(lambda e: store.check_blob(e.sha256, e.size), _unique_blobs(manifest.files)))
    return ref, manifest


def copy(ref: ArtifactRef, dest_store_uri: str, tags: Iterable[str] = ()) -> ArtifactRef:
    """Copy an artifact between stores, streaming each missing blob from one to the other (no local staging).

    Both ends verify: the source stream fails before its last bytes if they are wrong, and the destination
    re-hashes before the blob becomes visible. Blobs first, manifest next, tags last, as in :func:`publish`.
    """
    tags = [check_tag(t) for t in tags]
    src = open_store(ref.store)
    dest = open_store(dest_store_uri)
    ref, manifest = load_manifest(ref, src)
    start = time.monotonic()
    with ThreadPoolExecutor(JOBS) as pool:
        missing = _missing_blobs(dest, manifest, pool)
        total = sum(e.size for e in missing)
        with byte_progress(total, f"copy {manifest.name}", log) as advance:
            list(pool.map(lambda e: _stream(src, dest, e, advance), missing))
    out = _finish(dest, manifest, tags, None, src.get_signatures(manifest.name, manifest.digest))
    _log_rate("copied", out, total, start)
    return out


def _stream(src: Store, dest: Store, entry: FileEntry, advance: Callable[[int], None]) -> None:
    dest.put_stream(entry.sha256, entry.size, src.read_blob(entry.sha256, entry.size), advance)


def _missing_blobs(store: Store, manifest: Manifest, pool: ThreadPoolExecutor) -> list[FileEntry]:
    blobs = _unique_blobs(manifest.files)
    present = list(pool.map(lambda e: store.has_blob(e.sha256), blobs))
    return [e for e, has in zip(blobs, present, strict=True) if not has]


def _finish(
    store: Store,
    manifest: Manifest,
    tags: Iterable[str],
    record: Mapping[str, Any] | None,
    signature_docs: Iterable[bytes] = (),
) -> ArtifactRef:
    """Write the manifest once every blob is in, then the record and signatures, then the tags (the only mutable
    names: a tag never points at an artifact whose signature is still to come)."""
    digest = store.put_manifest(manifest.name, manifest.to_bytes())
    if record:
        store.put_record(manifest.name, digest, record)
    for doc in signature_docs:
        store.put_signature(manifest.name, digest, doc)
    for tag in tags:
        store.set_tag(manifest.name, tag, digest)
    return ArtifactRef(store=store.uri, name=manifest.name, digest=digest)


def _log_rate(what: str, ref: ArtifactRef, nbytes: int, start: float) -> None:
    seconds = max(time.monotonic() - start, 1e-6)
    log.info("%s %s: %d bytes in %.1fs (%.1f MiB/s)", what, ref, nbytes, seconds, nbytes / seconds / 2**20)


def _unique_blobs(files: Iterable[FileEntry]) -> list[FileEntry]:
    seen: dict[str, FileEntry] = {}
    for entry in files:
        seen.setdefault(entry.sha256, entry)
    return list(seen.values())

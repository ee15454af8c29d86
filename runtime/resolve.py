"""Resolve what ``python -m runtime serve`` was given into a verified local model directory.

Accepted: an artifact URI (``file://…``, a bare ``name:tag`` / ``name@sha256:…`` in the default store), a
directory holding ``manifest.json`` (verified in place), or a plain Hugging Face checkpoint directory (served
as is, with no manifest to verify). Pulled artifacts live in the pull cache keyed by digest; a cache entry is
re-verified on every start and re-fetched if damaged, never served.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from artifacts import ops
from artifacts.digest import hex_of, sha256_bytes
from artifacts.errors import ArtifactError, UriError, VerificationError
from artifacts.manifest import MANIFEST_NAME, Manifest
from artifacts.paths import default_store_uri, pull_cache_root
from artifacts.uri import parse_ref

log = logging.getLogger("kiln.runtime")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str
    manifest: Manifest | None
    source: str  # what the operator passed, for logs


def resolve(target: str) -> ResolvedModel:
    path = Path(target).expanduser()
    if path.is_dir():
        return _from_dir(path, target)
    if path.exists():
        raise UriError(f"{target} is a file; pass an artifact URI or a model directory")
    if target.startswith(("/", "./", "../", "~")):
        raise UriError(f"{target}: no such directory")
    ref = parse_ref(target, default_store_uri())
    if ref.digest and (cached := _cached(pull_cache_root() / hex_of(ref.digest), ref.digest, target)):
        return cached  # a digest names immutable content: an intact cache entry needs no store at all
    ref, manifest = ops.load_manifest(ref)
    assert ref.digest is not None
    entry = pull_cache_root() / hex_of(ref.digest)
    if entry.is_dir():
        try:
            _verify(entry, manifest)
            log.info("using cached %s from %s", ref, entry)
            return ResolvedModel(entry, manifest.name, manifest, target)
        except VerificationError as exc:
            log.warning("pull cache entry %s is damaged (%s); fetching it again", entry, exc)
            _discard(entry)
    try:
        ops.pull(ref, entry)
    except VerificationError:
        if not entry.is_dir():  # not a concurrent pull of the same artifact that won the rename
            raise
    _verify(entry, manifest)
    return ResolvedModel(entry, manifest.name, manifest, target)


def _cached(entry: Path, digest: str, source: str) -> ResolvedModel | None:
    """The cache entry for ``digest`` if its manifest has that digest and every file verifies, else None."""
    try:
        data = (entry / MANIFEST_NAME).read_bytes()
        if (entry / MANIFEST_NAME).is_symlink() or sha256_bytes(data) != digest:
            return None
        manifest = Manifest.from_bytes(data)
        _verify(entry, manifest)
    except (OSError, ArtifactError) as exc:
        if entry.exists():
            log.warning("pull cache entry %s cannot be used (%s); resolving through the store", entry, exc)
        return None
    log.info("using cached %s from %s", digest, entry)
    return ResolvedModel(entry, manifest.name, manifest, source)


def _from_dir(path: Path, source: str) -> ResolvedModel:
    if not (path / MANIFEST_NAME).exists():
        if not (path / "config.json").is_file():
            raise ArtifactError(f"{path} holds neither {MANIFEST_NAME} nor a Hugging Face config.json")
        log.warning("%s has no %s: serving it unverified as a plain Hugging Face checkpoint", path, MANIFEST_NAME)
        return ResolvedModel(path.resolve(), _dir_name(path), None, source)
    manifest = ops.read_dir_manifest(path)
    _verify(path, manifest)
    return ResolvedModel(path.resolve(), manifest.name, manifest, source)


def _verify(path: Path, manifest: Manifest) -> None:
    extra = ops.verify_dir(path, manifest)
    if extra:
        log.warning("files not listed in the manifest (ignored by verification): %s", ", ".join(extra[:10]))


def _discard(entry: Path) -> None:
    """Move a damaged entry aside atomically, then delete it, so no reader sees it half-removed."""
    trash = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".discard-"))
    entry.rename(trash / "entry")
    shutil.rmtree(trash, ignore_errors=True)


def _dir_name(path: Path) -> str:
    return path.resolve().name.lower() or "model"

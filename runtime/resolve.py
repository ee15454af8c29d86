"""Resolve what ``python -m runtime serve`` was given into a verified local model directory.

Accepted: an artifact URI (``file://…``, ``s3://…``, a bare ``name:tag`` / ``name@sha256:…`` in the default store),
a directory holding ``manifest.json`` (verified in place), a plain Hugging Face checkpoint directory (served as is,
with no manifest to verify), an ``s3://`` prefix holding a plain Hugging Face checkpoint (mirrored and verified,
see :mod:`runtime.s3_checkpoint`), or a Hugging Face hub id (``owner/name``, downloaded with huggingface_hub where the
hub is reachable). Pulled artifacts live in the pull cache keyed by digest; a cache entry is re-verified on every
start and re-fetched if damaged, never served.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from artifacts import ops, signing
from artifacts.digest import hex_of, sha256_bytes
from artifacts.errors import ArtifactError, NotFoundError, UriError, VerificationError
from artifacts.manifest import MANIFEST_NAME, Manifest
from artifacts.paths import default_store_uri, pull_cache_root
from artifacts.uri import ArtifactRef, parse_ref
from runtime.config.location import is_hub_id
from runtime.s3_checkpoint import KIND as S3_CHECKPOINT
from runtime.s3_checkpoint import WeightFetch, nothing_there, open_checkpoint

log = logging.getLogger("kiln.runtime")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str
    manifest: Manifest | None
    source: str  # what the operator passed, for logs
    kind: str = "kiln artifact"  # what the location held (shown by ``python -m runtime config``)
    weights: WeightFetch | None = None  # weights still to fetch (a plain S3 checkpoint): start, then wait
    ref: ArtifactRef | None = None  # the store artifact it was pulled from (None: a directory, hub or S3 checkpoint)

    def refresh_signatures(self) -> None:
        """Bring the pulled copy's signatures up to the store's (one added after the pull; the digest-cached path
        does not ask the store). Raises ArtifactError when the store cannot be read."""
        if self.ref is not None:
            _sync_signatures(self.path, self.ref)


# Files a hub download fetches: the checkpoint (safetensors only), its config, tokenizer and templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


OnManifest = Callable[[Manifest], None]


def resolve(
    target: str, revision: str | None = None, allow_pickle: bool = False, on_manifest: OnManifest | None = None
) -> ResolvedModel:
    """``on_manifest`` is called with an artifact's manifest as soon as it is read, before its files are pulled or
    verified (serve starts importing the engine then, so the import overlaps the hashing and the download)."""
    seen = on_manifest or (lambda m: None)
    path = Path(target).expanduser()
    if target.startswith("s3://") and not names_an_artifact(target):
        return _from_s3(target, allow_pickle, seen)
    if path.is_dir():
        return _from_dir(path, target, seen)
    if is_hub_id(target):
        return _from_hub(target, revision)
    if path.exists():
        raise UriError(f"{target} is a file; pass an artifact URI or a model directory")
    if target.startswith(("/", "./", "../", "~")):
        raise UriError(f"{target}: no such directory")
    if "://" not in target and "/" in target:
        raise UriError(
            f"{target!r} is not a model location kiln knows: pass an artifact URI (file://…, s3://…, <name>:<tag>), "
            "a local directory, or a Hugging Face hub id (<owner>/<name>)"
        )
    ref = parse_ref(target, default_store_uri())
    if ref.digest and (cached := _cached(pull_cache_root() / hex_of(ref.digest), ref.digest, target, seen)):
        return replace(cached, ref=ref)  # a digest names immutable content: an intact cache entry needs no store
    ref, manifest = ops.load_manifest(ref)
    assert ref.digest is not None
    seen(manifest)
    entry = pull_cache_root() / hex_of(ref.digest)
    if entry.is_dir():
        try:
            _verify(entry, manifest)
            log.info("using cached %s from %s", ref, entry)
            _sync_signatures(entry, ref)
            return ResolvedModel(entry, manifest.name, manifest, target, ref=ref)
        except VerificationError as exc:
            log.warning("pull cache entry %s is damaged (%s); fetching it again", entry, exc)
            _discard(entry)
    try:
        ops.pull(ref, entry)
    except VerificationError:
        if not entry.is_dir():  # not a concurrent pull of the same artifact that won the rename
            raise
    # Every byte was hashed as it was fetched, then the directory renamed into place whole (by this pull or a
    # concurrent one): sizes and presence suffice here, hashing it all again would only double the first start.
    ops.verify_files(entry, manifest.files, contents=False)
    return ResolvedModel(entry, manifest.name, manifest, target, ref=ref)


def _sync_signatures(entry: Path, ref: ArtifactRef) -> None:
    """Bring the cache entry's ``signatures.json`` up to the store's (a signature added after the pull)."""
    docs = ops.signatures(ref)
    if not docs or sorted(docs) == sorted(signing.read_dir(entry)):
        return
    fd, tmp = tempfile.mkstemp(dir=entry, prefix=".signatures-")
    with os.fdopen(fd, "wb") as f:
        f.write(signing.to_dir_bytes(docs))
    os.replace(tmp, entry / signing.SIGNATURES_NAME)


def names_an_artifact(uri: str) -> bool:
    """``s3://store/llama:latest`` and ``…/llama@sha256:…`` name a kiln artifact; a bare prefix may be either."""
    last = uri.rstrip("/").rpartition("/")[2]
    return "@" in last or ":" in last


def _from_s3(uri: str, allow_pickle: bool, seen: OnManifest) -> ResolvedModel:
    """What the prefix holds decides: a Hugging Face checkpoint (config.json at its top), else a kiln artifact."""
    found = open_checkpoint(uri, allow_pickle)
    if found is not None:
        path, weights = found
        name = uri.rstrip("/").rpartition("/")[2].lower() or "model"
        log.info("%s holds a plain Hugging Face checkpoint: serving its verified mirror %s", uri, path)
        return ResolvedModel(path, name, None, uri, S3_CHECKPOINT, weights)
    try:
        return resolve(uri.rstrip("/") + ":latest", on_manifest=seen)
    except (UriError, NotFoundError) as exc:
        raise nothing_there(uri, str(exc)) from None


def _cached(entry: Path, digest: str, source: str, seen: OnManifest) -> ResolvedModel | None:
    """The cache entry for ``digest`` if its manifest has that digest and every file verifies, else None."""
    try:
        data = (entry / MANIFEST_NAME).read_bytes()
        if (entry / MANIFEST_NAME).is_symlink() or sha256_bytes(data) != digest:
            return None
        manifest = Manifest.from_bytes(data)
        seen(manifest)
        _verify(entry, manifest)
    except (OSError, ArtifactError) as exc:
        if entry.exists():
            log.warning("pull cache entry %s cannot be used (%s); resolving through the store", entry, exc)
        return None
    log.info("using cached %s from %s", digest, entry)
    return ResolvedModel(entry, manifest.name, manifest, source)


def _from_dir(path: Path, source: str, seen: OnManifest) -> ResolvedModel:
    if not (path / MANIFEST_NAME).exists():
        if not (path / "config.json").is_file():
            raise ArtifactError(f"{path} holds neither {MANIFEST_NAME} nor a Hugging Face config.json")
        log.warning("%s has no %s: serving it unverified as a plain Hugging Face checkpoint", path, MANIFEST_NAME)
        return ResolvedModel(path.resolve(), _dir_name(path), None, source, "plain Hugging Face directory")
    manifest = ops.read_dir_manifest(path)
    seen(manifest)
    _verify(path, manifest)
    return ResolvedModel(path.resolve(), manifest.name, manifest, source, "kiln artifact directory")


def _from_hub(repo_id: str, revision: str | None) -> ResolvedModel:
    """Download a hub checkpoint (safetensors only) into huggingface_hub's cache, or say at once why not."""
    import os

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    alternatives = (
        "copy the checkpoint to a local directory or an s3:// prefix and point HF_MODEL_ID (or the serve argument) "
        "there, or build it into a kiln artifact (python -m build model=hf model.source=…)"
    )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:
        raise ArtifactError(f"{repo_id!r} is a Hugging Face hub id, and huggingface_hub is not installed") from exc
    at = f" at revision {revision!r}" if revision else ""
    try:
        local = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline, etag_timeout=10
        )
    except RepositoryNotFoundError:
        raise ArtifactError(f"{repo_id!r}: no such repository on the Hugging Face hub (or it needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ArtifactError(
            f"{repo_id!r} has no revision {revision!r}: fix HF_MODEL_REVISION (a branch, tag or commit of the "
            "repository), or unset it for main"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        cached = _cached_revisions(repo_id) if offline and revision else []
        if cached:
            raise ArtifactError(
                f"{repo_id!r}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; the cache holds "
                f"{', '.join(cached)}: fix HF_MODEL_REVISION, or download it where the hub is reachable"
            ) from None
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub cannot be reached ({type(exc).__name__})"
        raise ArtifactError(f"{repo_id!r} is a Hugging Face hub id, and {why}: {alternatives}") from None
    path = Path(local)
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{repo_id!r} holds no config.json: it is not a Hugging Face model checkpoint")
    log.warning("%s: serving the hub checkpoint %s unverified (no kiln manifest)", repo_id, path)
    return ResolvedModel(path, _dir_name(Path(repo_id)), None, repo_id, "Hugging Face hub checkpoint")


def _cached_revisions(repo_id: str) -> list[str]:
    """The refs (branches, tags) the local hub cache holds for ``repo_id``."""
    from huggingface_hub import constants

    refs = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs"
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def _verify(path: Path, manifest: Manifest) -> None:
    start = time.monotonic()
    extra = ops.verify_dir(path, manifest)
    log.info(
        "verified %d files (%.1f MB) in %.2fs", len(manifest.files), manifest.total_size / 1e6, time.monotonic() - start
    )
    if extra:
        log.warning("files not listed in the manifest (ignored by verification): %s", ", ".join(extra[:10]))


def _discard(entry: Path) -> None:
    """Move a damaged entry aside atomically, then delete it, so no reader sees it half-removed."""
    trash = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".discard-"))
    entry.rename(trash / "entry")
    shutil.rmtree(trash, ignore_errors=True)


def _dir_name(path: Path) -> str:
    return path.resolve().name.lower() or "model"

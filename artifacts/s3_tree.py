"""An artifact laid out as a plain directory tree under an S3 prefix: what SageMaker's ``ModelDataSource`` (an
uncompressed ``S3Prefix``) copies into ``/opt/ml/model``, and, packed as a ``.tar.gz``, what an adapter inference
component's ``ArtifactUrl`` names.

A store keeps files as content-addressed blobs (:mod:`artifacts.store`), which SageMaker cannot use as a model
directory. The tree lives beside them in the same store, at ``trees/<name>/<hex>/`` (``<hex>`` is the manifest
digest), written by server-side copies of the blobs (no bytes pass through this machine), ``manifest.json``
last. A tree is a function of the digest, so staging again is a no-op; and a tree without its ``manifest.json``
(an interrupted staging) is one the runtime refuses at start-up, naming the missing manifest. The runtime
verifies every file against the manifest when it serves the directory, as it does for any artifact directory.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

from artifacts import signing
from artifacts.digest import hex_of
from artifacts.manifest import MANIFEST_NAME, Manifest
from artifacts.s3 import S3Store

log = logging.getLogger("kiln.artifacts.s3")
TREES = "trees"


@dataclass(frozen=True)
class StagedTree:
    """Where an artifact's tree is (or would be), and what staging it copied."""

    uri: str  # s3://bucket/prefix/trees/<name>/<hex>/  (ends with '/', as ModelDataSource's S3Uri wants)
    copied: int  # objects copied by this call (0: the tree was complete already, or a dry run)
    bytes: int  # the artifact's size


def tree_prefix(store: S3Store, manifest: Manifest) -> str:
    """The key prefix of ``manifest``'s tree in ``store`` (no trailing slash)."""
    return store.loc.key(f"{TREES}/{manifest.name}/{hex_of(manifest.digest)}")


def tree_uri(store: S3Store, manifest: Manifest) -> str:
    return store.loc.url(tree_prefix(store, manifest)) + "/"


def stage_tree(store: S3Store, manifest: Manifest, *, dry_run: bool = False) -> StagedTree:
    """Lay ``manifest``'s artifact out as a directory tree in ``store`` (see the module docstring)."""
    prefix = tree_prefix(store, manifest)
    uri = tree_uri(store, manifest)
    done = store.s3.exists(f"{prefix}/{MANIFEST_NAME}")
    if dry_run:
        return StagedTree(uri, 0, manifest.total_size)
    # The tree carries the artifact's signatures (for a runtime with trusted_keys), refreshed on every staging: a
    # signature added after the first staging reaches the tree too.
    if docs := store.get_signatures(manifest.name, manifest.digest):
        store.s3.put_bytes(f"{prefix}/{signing.SIGNATURES_NAME}", signing.to_dir_bytes(docs))
    if done:
        return StagedTree(uri, 0, manifest.total_size)
    client = store.s3.client
    for entry in manifest.files:
        with store.s3.errors("copy", store.blob_key(entry.sha256), where=uri):
            # s3transfer's managed copy: multipart UploadPartCopy above its threshold (CopyObject's limit is 5 GB)
            client.copy(
                {"Bucket": store.loc.bucket, "Key": store.blob_key(entry.sha256)},
                store.loc.bucket,
                f"{prefix}/{entry.path}",
            )
    store.s3.put_bytes(f"{prefix}/{MANIFEST_NAME}", manifest.to_bytes())
    log.info("staged %s as a directory tree at %s (%d objects)", manifest.name, uri, len(manifest.files))
    return StagedTree(uri, len(manifest.files) + 1, manifest.total_size)


def tarball_uri(store: S3Store, manifest: Manifest) -> str:
    return store.loc.url(tree_prefix(store, manifest) + ".tar.gz")


def stage_tarball(store: S3Store, manifest: Manifest, *, dry_run: bool = False) -> str:
    """The artifact (its files and ``manifest.json`` at the archive's root) as one ``.tar.gz`` beside its tree: an
    adapter inference component's ``Container.ArtifactUrl``. Built in memory, so only for small artifacts
    (adapters); the blobs are verified while read."""
    uri = tarball_uri(store, manifest)
    key = tree_prefix(store, manifest) + ".tar.gz"
    if dry_run or store.s3.exists(key):
        return uri
    store.s3.put_bytes(key, _pack(store, manifest))
    log.info("staged %s as %s", manifest.name, uri)
    return uri


def _pack(store: S3Store, manifest: Manifest) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in manifest.files:
            _add(tar, entry.path, store.read_blob(entry.sha256, entry.size), entry.size)
        data = manifest.to_bytes()
        _add(tar, MANIFEST_NAME, [data], len(data))
        if docs := store.get_signatures(manifest.name, manifest.digest):
            sigs = signing.to_dir_bytes(docs)
            _add(tar, signing.SIGNATURES_NAME, [sigs], len(sigs))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, chunks: Iterable[bytes], size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    tar.addfile(info, io.BytesIO(b"".join(chunks)))

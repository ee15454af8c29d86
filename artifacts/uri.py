"""Artifact references: ``<store>/<name>@sha256:<hex>`` or ``<store>/<name>:<tag>``.

A store is a ``file:///abs/dir`` or ``s3://bucket/prefix`` URI. A bare ``name@sha256:…`` or ``name:tag``
refers to the default local store (see :func:`artifacts.paths.default_store_uri`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from artifacts.digest import is_digest
from artifacts.errors import UriError
from artifacts.names import NAME_RULE, TAG_RULE, name_problem, tag_problem

DEFAULT_TAG = "latest"
SCHEMES = ("file", "s3")


@dataclass(frozen=True)
class ArtifactRef:
    """A parsed artifact reference; exactly one of ``digest`` and ``tag`` is set."""

    store: str
    name: str
    digest: str | None = None
    tag: str | None = None

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{self.store}/{self.name}{suffix}"

    def with_digest(self, digest: str) -> ArtifactRef:
        return ArtifactRef(store=self.store, name=self.name, digest=digest)


def scheme_of(uri: str) -> str:
    """The store scheme of a URI (``file`` or ``s3``); raises UriError for anything else."""
    scheme, sep, _ = uri.partition("://")
    if not sep or scheme not in SCHEMES:
        raise UriError(f"{uri!r} is not a store URI: expected file:///path or s3://bucket/prefix")
    return scheme


def normalize_store_uri(uri: str) -> str:
    """Canonical store URI: ``file://`` with an absolute path, no trailing slash."""
    if "://" not in uri:
        return "file://" + str(Path(uri).expanduser().resolve())
    scheme = scheme_of(uri)
    rest = uri.split("://", 1)[1].rstrip("/")
    if scheme == "file":
        if not rest.startswith("/"):
            raise UriError(f"{uri!r}: file store URIs need an absolute path (file:///abs/dir)")
        return "file://" + str(Path(rest).resolve())
    if not rest:
        raise UriError(f"{uri!r}: missing bucket name")
    return f"{scheme}://{rest}"


def parse_ref(text: str, default_store: str | None = None) -> ArtifactRef:
    """Parse an artifact reference. Raises UriError naming what is wrong."""
    if "://" in text:
        store, _, last = text.rstrip("/").rpartition("/")
        if store.endswith(":/") or store.endswith(":"):
            raise UriError(f"{text!r}: missing artifact name after the store (…/<name>@sha256:<hex> or …/<name>:<tag>)")
        store = normalize_store_uri(store)
    else:
        if "/" in text:
            raise UriError(f"{text!r} is neither a store URI nor a bare <name>[@sha256:<hex>|:<tag>]")
        if default_store is None:
            raise UriError(f"{text!r} has no store and no default store is configured")
        store, last = default_store, text
    name, digest, tag = _split_last(last, text)
    return ArtifactRef(store=store, name=name, digest=digest, tag=tag)


def _split_last(last: str, text: str) -> tuple[str, str | None, str | None]:
    if "@" in last:
        name, _, digest = last.partition("@")
        if not is_digest(digest):
            raise UriError(f"{text!r}: digest must be sha256:<64 lowercase hex>, got {digest!r}")
        tag = None
    else:
        name, _, tag_text = last.partition(":")
        digest, tag = None, tag_text or DEFAULT_TAG
        if tag_problem(tag):
            raise UriError(f"{text!r}: invalid tag {tag!r} ({TAG_RULE})")
    if name_problem(name):
        raise UriError(f"{text!r}: invalid artifact name {name!r} ({NAME_RULE})")
    return name, digest, tag

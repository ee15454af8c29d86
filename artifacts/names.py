"""The one rule for artifact names, tags and digests, checked at every store entry point.

Names and tags become path components in every store (``names/<name>/tags/<tag>``), so a value that is not a
single plain component must never reach a store: ``../../escaped`` as a tag would write outside the store's
``names/`` tree. Every store method that takes a name, tag or digest checks it with these functions, and so do
the CLIs and the build's ``publish.tags`` before any work starts.
"""

from __future__ import annotations

import re

from artifacts.errors import UriError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
NAME_RULE = "lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, at most 128 characters"
TAG_RULE = "letters, digits, '.', '_' or '-', starting with a letter, digit or '_', at most 128 characters"
DIGEST_RULE = "'sha256:' followed by 64 lowercase hex digits"


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid artifact name (None: it is)."""
    if isinstance(name, str) and NAME_RE.match(name):
        return None
    return f"artifact name {name!r} is invalid: use {NAME_RULE}"


def tag_problem(tag: object) -> str | None:
    if isinstance(tag, str) and TAG_RE.match(tag):
        return None
    return f"tag {tag!r} is invalid: use {TAG_RULE}"


def check_name(name: str) -> str:
    if (why := name_problem(name)) is not None:
        raise UriError(why)
    return name


def check_tag(tag: str) -> str:
    if (why := tag_problem(tag)) is not None:
        raise UriError(why)
    return tag


def check_digest(digest: str) -> str:
    if not (isinstance(digest, str) and DIGEST_RE.match(digest)):
        raise UriError(f"digest {digest!r} is invalid: use {DIGEST_RULE}")
    return digest

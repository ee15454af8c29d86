"""The runtime's signature requirement (``trusted_keys``): the served model and every adapter it loads must be an
artifact one of the operator's keys signed (artifacts/signing.py). Checked before anything of it is loaded."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from artifacts import signing
from artifacts.manifest import Manifest

Trusted = Mapping[str, signing.TrustedKey]


def load_trusted(paths: Iterable[str]) -> dict[str, signing.TrustedKey]:
    """The operator's public keys by key id; SigningError naming a file that is not one."""
    return {k.id: k for k in (signing.load_public(Path(p).expanduser()) for p in paths)}


def trusted_signer(
    path: Path,
    manifest: Manifest | None,
    trusted: Trusted,
    what: str,
    refresh: Callable[[], None] | None = None,
) -> str:
    """The trusted key that signed the artifact in ``path`` (``what`` names it in errors). ``refresh`` brings the
    directory's signatures up to its store's and is tried once when none verifies (a signature made after the pull).
    Raises SignatureError (unsigned, or no trusted signature) and ArtifactError (no manifest, a store failure)."""
    if manifest is None:
        raise signing.SignatureError(
            f"trusted_keys is set, and {what} has no kiln manifest to sign: build it into an artifact signed with "
            "publish.signing_key"
        )
    try:
        return signing.check(signing.read_dir(path), manifest.digest, trusted, what)
    except signing.SignatureError:
        if refresh is None:
            raise
    refresh()
    return signing.check(signing.read_dir(path), manifest.digest, trusted, what)

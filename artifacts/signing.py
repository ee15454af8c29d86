"""Signed artifacts: Ed25519 signatures over an artifact's manifest digest.

A directory verifies only against its own ``manifest.json``, so whoever can edit both passes verification. A
signature closes that: it is made with a private key the publisher holds, over the manifest's digest, and a runtime
that trusts only some public keys (``trusted_keys``) refuses an artifact no trusted key signed.

Why plain Ed25519 keys (the ``cryptography`` package) rather than Sigstore or OpenSSF ``model-signing``: the manifest
already names the sha256 of every file, so one signature over its digest covers the whole artifact; a key pair
works offline, on build hosts in CI and on SageMaker endpoints in VPCs without internet, where Sigstore's keyless
flow needs an OIDC identity and its online services (Fulcio, Rekor) at signing and verification; and model-signing
would hash every file again into a second manifest format of its own. The cost: key distribution and revocation
are the operator's (a compromised key is removed from ``trusted_keys``).

A signature document is JSON: ``{"format": FORMAT, "manifest": "sha256:<hex>", "key": "ed25519:<id>", "signature":
"<base64>"}``. The signed bytes are ``PAYLOAD_PREFIX`` + the manifest digest (domain-separated, so no other
signature made with the key can pass as one). A key id is ``ed25519:`` + the first 16 hex digits of the sha256 of
the raw public key. Stores keep one document per (artifact, key); a pulled or staged artifact directory carries
them as ``signatures.json`` (a list) beside ``manifest.json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from artifacts.errors import ArtifactError, VerificationError
from artifacts.manifest import SIGNATURES_NAME as SIGNATURES_NAME
from artifacts.names import check_digest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT = "kiln-ed25519-v1"
PAYLOAD_PREFIX = b"kiln artifact manifest v1\n"
INSTALL_HINT = "pip install 'cryptography>=42' (it comes with kiln's runtime and build extras)"


class SigningError(ArtifactError):
    """A key cannot be read or used (missing file, not an Ed25519 key, no cryptography)."""


class SignatureError(VerificationError):
    """No trusted key signed the artifact (unsigned, signed by another key, or a signature that does not verify)."""


@dataclass(frozen=True)
class TrustedKey:
    id: str
    source: str  # where the operator gave it (a file path), for messages
    key: Ed25519PublicKey


def _require() -> None:
    """Signing is optional: the artifacts package needs only the standard library until a key is used."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise SigningError(f"signing needs the cryptography package: {INSTALL_HINT}") from None


def key_id(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate(private_path: Path) -> tuple[str, Path]:
    """Write a new key pair: ``private_path`` (PKCS#8 PEM, mode 0600) and ``<private_path>.pub``. Returns the key id
    and the public key's path. Refuses to overwrite an existing key."""
    _require()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} already exists; choose another path (kiln never overwrites a key)")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = private.public_key()
    public_path.write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key_id(public), public_path


def load_private(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path`` (PEM); SigningError naming the file otherwise (never its content)."""
    _require()
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise SigningError(f"cannot read signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise SigningError(
            f"{path} is not an unencrypted PEM private key; make one with `python -m artifacts keygen {path}`"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 key; make one with `python -m artifacts keygen <path>`")
    return key


def load_public(path: Path) -> TrustedKey:
    """The Ed25519 public key in ``path`` (PEM, as ``keygen`` writes it)."""
    _require()
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise SigningError(f"cannot read trusted key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise SigningError(
            f"{path} is not a PEM public key (give the .pub file `python -m artifacts keygen` wrote)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningError(f"{path} is not an Ed25519 public key")
    return TrustedKey(key_id(key), str(path), key)


def sign(manifest_digest: str, private: Ed25519PrivateKey) -> bytes:
    """The signature document (JSON bytes) for the artifact whose manifest hashes to ``manifest_digest``."""
    digest = check_digest(manifest_digest)
    signature = private.sign(PAYLOAD_PREFIX + digest.encode())
    doc = {
        "format": FORMAT,
        "manifest": digest,
        "key": key_id(private.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }
    return json.dumps(doc, sort_keys=True).encode()


def doc_key(doc: bytes) -> str:
    """The key id a signature document claims (for naming it in a store); SignatureError when malformed."""
    return _parse(doc)["key"]


def doc_manifest(doc: bytes) -> str:
    """The manifest digest a signature document claims to sign; SignatureError when malformed."""
    return _parse(doc)["manifest"]


def check(docs: Iterable[bytes], manifest_digest: str, trusted: Mapping[str, TrustedKey], what: str) -> str:
    """The id of a trusted key whose signature over ``manifest_digest`` is among ``docs``; SignatureError naming the
    keys expected and what was found otherwise. ``what`` names the artifact in the message."""
    from cryptography.exceptions import InvalidSignature

    found = []
    for raw in docs:
        try:
            doc = _parse(raw)
        except SignatureError as exc:
            found.append(str(exc))
            continue
        key = trusted.get(doc["key"])
        if key is None:
            found.append(f"{doc['key']} (not a trusted key)")
        elif doc["manifest"] != manifest_digest:
            found.append(f"{doc['key']} (signs another manifest, {doc['manifest']})")
        else:
            try:
                key.key.verify(base64.b64decode(doc["signature"]), PAYLOAD_PREFIX + manifest_digest.encode())
                return key.id
            except (InvalidSignature, ValueError):
                found.append(f"{doc['key']} (the signature does not verify: altered, or made with another key)")
    expected = ", ".join(f"{k.id} ({k.source})" for k in trusted.values())
    raise SignatureError(
        f"{what} is not signed by a trusted key: expected a signature by {expected}; found "
        + ("; ".join(found) if found else "no signature")
        + ". Sign it with `python -m artifacts sign <artifact URI> --key <private key>`, or trust its signer's key"
    )


def _parse(raw: bytes) -> dict[str, str]:
    try:
        doc = json.loads(raw)
        fields = {k: doc[k] for k in ("format", "manifest", "key", "signature")}
    except (ValueError, KeyError, TypeError):
        raise SignatureError("a malformed signature document") from None
    if fields["format"] != FORMAT or not all(isinstance(v, str) for v in fields.values()):
        raise SignatureError(f"a signature of unknown format {str(fields['format'])[:40]!r}")
    return fields


def read_dir(directory: Path) -> list[bytes]:
    """The signature documents an artifact directory carries (``signatures.json``; none when absent)."""
    path = directory / SIGNATURES_NAME
    if not path.is_file():
        return []
    try:
        docs = json.loads(path.read_bytes())
    except ValueError:
        raise SignatureError(f"{path} is not JSON") from None
    if not isinstance(docs, list):
        raise SignatureError(f"{path} must hold a list of signature documents")
    return [json.dumps(d, sort_keys=True).encode() for d in docs]


def to_dir_bytes(docs: Iterable[bytes]) -> bytes:
    """``signatures.json``'s content for ``docs``."""
    return json.dumps([json.loads(d) for d in docs], indent=2, sort_keys=True).encode()

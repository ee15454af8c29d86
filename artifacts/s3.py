"""The S3 store (``publish=s3``) and the verified, parallel S3 transfers behind it.

A store at ``s3://bucket/prefix`` uses the key layout every store uses (see :mod:`artifacts.store`) under
``prefix``. boto3 is imported lazily, so ``artifacts`` imports without it.

Uploads read the source once, hashing as they go, into s3transfer's parallel multipart upload. The bytes that
complete a blob are handed over only if its sha256 matches (:func:`artifacts.digest.verify_stream`), so a wrong
source fails before CompleteMultipartUpload and s3transfer aborts the upload: a blob key never holds other
bytes, and an unfinished upload is never visible. Blobs below the part size go in one PUT that carries their
SHA-256 as S3's own checksum, which S3 verifies on receipt.

Downloads issue parallel ranged GETs pinned to the object's ETag (``If-Match``: a replaced object cannot be mixed
in), reassemble them in order through a bounded buffer, and hash them sequentially while they are written.

Credentials, region and endpoint come from boto3's standard chain (environment, profile, container or instance
role, ``AWS_ENDPOINT_URL``). Errors become :class:`~artifacts.errors.ArtifactError` subclasses whose messages
name the object and the fix, and never carry credentials (:func:`redact`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from artifacts.digest import file_chunks, hex_of, is_digest, sha256_bytes, verify_stream
from artifacts.errors import (
    ArtifactError,
    DiskFullError,
    NotFoundError,
    StoreError,
    UriError,
    VerificationError,
    is_out_of_space,
)
from artifacts.names import check_digest, check_name, check_tag
from artifacts.store import ArtifactInfo, ProgressFn, signature_leaf
from artifacts.uri import normalize_store_uri

log = logging.getLogger("kiln.artifacts.s3")

MiB = 1024 * 1024
PART_SIZE = 16 * MiB  # multipart threshold and part size for uploads (S3's minimum part is 5 MiB)
# Ranged GETs for downloads: an object is spread over every connection, in ranges of at least MIN_RANGE (below
# that, per-request latency and cost dominate) and at most RANGE_SIZE (which bounds the buffer). Objects up to
# MIN_RANGE come in one GET.
MIN_RANGE = 8 * MiB
RANGE_SIZE = 32 * MiB
CONCURRENCY = 8  # parallel requests per store (download ranges, upload parts)
BUFFER_CHUNKS = 8  # ranges held in memory per store while waiting to be hashed in order: at most 256 MiB
SMALL_OBJECT_LIMIT = 64 * MiB  # manifests, tags, records: refuse to read anything larger into memory
SIGNATURE_LIMIT = 4096  # a signature document is about 250 bytes
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# Error codes S3 (and STS-backed credentials) answer with, grouped by what the user has to do.
_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired"}
_REJECTED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "InvalidClientTokenId", "AuthFailure"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_REGION = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"}
_PERMISSION = {
    "HeadObject": "s3:GetObject",
    "GetObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "ListObjectsV2": "s3:ListBucket",
    "DeleteObject": "s3:DeleteObject",
}


# -- secrets never leave through messages --------------------------------------------------------------------
_KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA|ANPA|AGPA)[A-Z0-9]{12,}\b")
_SIGNED_QUERY_RE = re.compile(
    r"(?i)\b(x-amz-signature|x-amz-credential|x-amz-security-token|signature|awsaccesskeyid|x-amz-session-token)=[^&\s\"'<>]+"
)
_USERINFO_RE = re.compile(r"://[^/@\s]+@")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without credentials: key ids, presigned-URL signatures and tokens, URL passwords, known secrets."""
    known = [s for s in (*secrets, *(os.environ.get(k, "") for k in _SECRET_ENV)) if len(s) >= 8]
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    text = _SIGNED_QUERY_RE.sub(lambda m: f"{m.group(1)}=<redacted>", text)
    text = _USERINFO_RE.sub("://<redacted>@", text)
    return _KEY_ID_RE.sub("<redacted-key-id>", text)


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix ("" or "a/b", no slashes at either end)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise UriError(f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET_RE.match(bucket):
            raise UriError(
                f"{uri!r}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, digits, '.' and '-')"
            )
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise UriError(f"{uri!r}: the key prefix {prefix!r} has empty, '.' or '..' components")
        return cls(bucket, prefix)

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


class _IterReader:
    """A non-seekable file-like ``read(n)`` over an iterator of byte chunks (s3transfer's streaming upload input)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int | None = -1) -> bytes:
        parts: list[bytes] = []
        want = -1 if n is None or n < 0 else n
        while want != 0:
            if not self._buf:
                nxt = next(self._it, None)
                if nxt is None:
                    break
                self._buf = memoryview(nxt)
            take = len(self._buf) if want < 0 else min(want, len(self._buf))
            parts.append(bytes(self._buf[:take]))
            self._buf = self._buf[take:]
            if want > 0:
                want -= take
        return b"".join(parts)


_CLIENTS: dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def shared_client(pool_size: int) -> Any:
    """A boto3 S3 client, one per process and AWS configuration (creating one costs ~0.2 s; they are thread-safe).

    Keyed by the ``AWS_*`` environment, so a changed endpoint, region or credential variable gets a new client.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise StoreError("s3:// stores need boto3: pip install 'kiln[runtime]' (or boto3)") from exc
    aws_env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    key = sha256_bytes(repr((aws_env, pool_size)).encode())
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            config = Config(
                max_pool_connections=pool_size,
                retries={
                    "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                    "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
                },
                connect_timeout=10,
                read_timeout=60,
                user_agent_appid="kiln",
            )
            _CLIENTS[key] = boto3.session.Session().client("s3", config=config)
        return _CLIENTS[key]


class S3Transport:
    """One bucket through one boto3 client: verified parallel transfers and error mapping. Thread-safe."""

    def __init__(
        self,
        bucket: str,
        *,
        part_size: int = PART_SIZE,
        range_size: int = RANGE_SIZE,
        concurrency: int = CONCURRENCY,
        buffer_chunks: int = BUFFER_CHUNKS,
    ) -> None:
        self.bucket = bucket
        self.part_size = part_size
        self.range_size = range_size
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(max(1, buffer_chunks))
        self._lock = threading.Lock()
        self._client: Any = None
        self._tm: Any = None
        self._pool: ThreadPoolExecutor | None = None

    # -- the client, created on first use -------------------------------------------------------------------
    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        with self.errors("connect to", None):
            return shared_client(self.concurrency + 8)

    @property
    def endpoint(self) -> str:
        """The endpoint for messages: without any ``user:password@`` part."""
        if self._client is None:
            return "(not connected)"
        url = urlsplit(str(self._client.meta.endpoint_url))
        host = f"{url.hostname}:{url.port}" if url.port else str(url.hostname)
        return urlunsplit((url.scheme, host, url.path, "", ""))

    @property
    def region(self) -> str:
        return str(self._client.meta.region_name) if self._client is not None else "(unknown)"

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="kiln-s3")
                weakref.finalize(self, self._pool.shutdown, wait=False)
            return self._pool

    def _transfer_manager(self) -> Any:
        client = self.client
        with self._lock:
            if self._tm is None:
                from s3transfer.manager import TransferConfig, TransferManager

                config = TransferConfig(
                    multipart_threshold=self.part_size,
                    multipart_chunksize=self.part_size,
                    max_request_concurrency=self.concurrency,
                    max_in_memory_upload_chunks=self.concurrency + 2,
                )
                self._tm = TransferManager(client, config)
                weakref.finalize(self, self._tm.shutdown)
            return self._tm

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- small objects --------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        try:
            with self.errors("check", key):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except NotFoundError:
            return False
        return True

    def get_bytes(self, key: str, limit: int = SMALL_OBJECT_LIMIT) -> bytes:
        with self.errors("read", key):
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            if resp["ContentLength"] > limit:
                raise StoreError(f"{self.url(key)} is {resp['ContentLength']} bytes; expected a small object")
            return bytes(resp["Body"].read())

    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> None:
        extra = {"ChecksumSHA256": _b64(sha256)} if sha256 else {}
        with self.errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)

    def list(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` (``Key``, ``Size``, ``ETag``)."""
        with self.errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    # -- streams --------------------------------------------------------------------------------------------
    def upload(self, key: str, chunks: Iterable[bytes], size: int, sha256: str, progress: ProgressFn | None) -> None:
        """Stream ``chunks`` to ``key`` with a parallel multipart upload (one PUT below the part size).

        ``chunks`` must raise before yielding the last bytes if they are wrong (see ``verify_stream``): the
        upload then fails before completion and is aborted, so the key never holds a partial or wrong object.
        """
        from s3transfer.subscribers import BaseSubscriber

        class Subscriber(BaseSubscriber):
            def on_queued(self, future: Any, **kwargs: Any) -> None:
                future.meta.provide_transfer_size(size)

            def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
                if progress:
                    progress(bytes_transferred)

        # S3 verifies a whole-object SHA-256 only on single PUTs; multipart parts carry botocore's CRC32.
        extra = {"ChecksumSHA256": _b64(sha256)} if size < self.part_size else {}
        tm = self._transfer_manager()
        with self.errors("upload", key):
            future = tm.upload(_IterReader(chunks), self.bucket, key, extra_args=extra, subscribers=[Subscriber()])
            try:
                future.result()
            except KeyboardInterrupt:
                future.cancel()  # s3transfer aborts the multipart upload
                raise

    def iter_object(self, key: str, size: int, etag: str | None = None) -> Iterator[bytes]:
        """The object's bytes in order; raises VerificationError if it is not ``size`` bytes long.

        Small: a single GET. Larger: parallel ranged GETs pinned to the ETag (``etag``, e.g. from a listing,
        else a HEAD's), reassembled in order.
        """
        smallest = min(MIN_RANGE, self.range_size)
        if size <= smallest:
            yield from self._small_object(key, size, etag)
            return
        if etag is None:
            with self.errors("download", key):
                head = self.client.head_object(Bucket=self.bucket, Key=key)
            if head["ContentLength"] != size:
                raise _size_mismatch(self.url(key), head["ContentLength"], size)
            etag = str(head["ETag"])
        span = min(self.range_size, max(smallest, -(-size // self.concurrency)))
        yield from self._ranges(key, size, etag, span)

    def _small_object(self, key: str, size: int, etag: str | None) -> Iterator[bytes]:
        if size == 0:
            with self.errors("download", key):
                length = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            if length:
                raise _size_mismatch(self.url(key), length, 0)
            return
        # Ask for one byte more than expected: a longer object shows in Content-Range without being read.
        with self.errors("download", key):
            data, total = self._get_range(key, 0, size, etag)
        if total != size:
            raise _size_mismatch(self.url(key), total, size)
        yield data

    def _ranges(self, key: str, size: int, etag: str, span: int) -> Iterator[bytes]:
        starts = deque(range(0, size, span))
        pending: deque[Future[tuple[bytes, int]]] = deque()
        pool = self._executor()
        try:
            while starts or pending:
                # Keep ranges in flight while buffer slots are free; block for a slot only when holding none,
                # so downloads sharing the slots always make progress.
                while starts and len(pending) < self.concurrency and self._slots.acquire(blocking=not pending):
                    start = starts.popleft()
                    end = min(start + span, size) - 1
                    pending.append(pool.submit(self._get_range, key, start, end, etag))
                with self.errors("download", key):
                    data, _ = pending[0].result()
                pending.popleft()
                self._slots.release()
                yield data
        finally:
            for fut in pending:
                fut.cancel()
            wait(pending)
            for _ in pending:
                self._slots.release()

    def _get_range(self, key: str, start: int, end: int, etag: str | None) -> tuple[bytes, int]:
        """GET bytes ``start..end``; returns them and the object's total size. Broken streams are retried."""
        from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

        extra = {"IfMatch": etag} if etag else {}
        problem = ""
        for _ in range(3):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}", **extra)
                data = bytes(resp["Body"].read())
            except S3_RETRYABLE_DOWNLOAD_ERRORS as exc:
                problem = type(exc).__name__
                continue
            total = int(str(resp.get("ContentRange") or "").rpartition("/")[2] or resp["ContentLength"])
            if len(data) == min(end, total - 1) - start + 1:
                return data, total
            problem = f"short read: {len(data)} bytes"
        raise StoreError(
            f"cannot download {self.url(key)}: the connection to {self.endpoint} kept breaking ({problem}); "
            "nothing partial was kept: re-run"
        )

    # -- errors ---------------------------------------------------------------------------------------------
    @contextmanager
    def errors(self, action: str, key: str | None, where: str | None = None) -> Iterator[None]:
        """Turn boto errors into ArtifactErrors naming the object (or ``where``) and the fix, never a credential."""
        try:
            yield
        except ArtifactError:
            raise
        except Exception as exc:
            where = where or (self.url(key) if key is not None else f"s3://{self.bucket}")
            mapped = self._map(exc, action, where)
            if mapped is None:
                raise
            raise mapped from None

    def _map(self, exc: Exception, action: str, where: str) -> ArtifactError | None:
        from botocore import exceptions as bx

        if isinstance(exc, bx.ClientError):
            return self._map_client_error(exc, action, where)
        head = f"cannot {action} {where}"
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return StoreError(
                f"{head}: no usable AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or run with a container or instance role)"
            )
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
            return StoreError(
                f"{head}: the S3 endpoint {self.endpoint} cannot be reached ({type(exc).__name__}); "
                "check AWS_ENDPOINT_URL, AWS_REGION and the network"
            )
        if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.ResponseStreamingError):
            return StoreError(
                f"{head}: the connection to {self.endpoint} failed mid-transfer ({type(exc).__name__}), retries "
                "included; nothing partial was kept: re-run to resume"
            )
        if _is_expired(exc):
            return StoreError(f"{head}: the AWS credentials have expired; refresh them and re-run")
        if isinstance(exc, bx.BotoCoreError):
            return StoreError(f"{head}: {redact(str(exc))}")
        return None

    def _map_client_error(self, exc: Any, action: str, where: str) -> ArtifactError:
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(error.get("Code") or meta.get("HTTPStatusCode") or "")
        head = f"cannot {action} {where}"
        if code == "NoSuchBucket":
            return StoreError(
                f"{head}: bucket {self.bucket!r} does not exist at {self.endpoint}; create it or fix the URI"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFoundError(f"{where} does not exist")
        if code in ("PreconditionFailed", "412"):
            return VerificationError(f"{where} changed while it was being read; nothing was kept: re-run")
        if code in ("InvalidRange", "416"):
            return VerificationError(f"{where} is corrupt: shorter than the manifest says (empty or truncated)")
        if code in _EXPIRED:
            return StoreError(f"{head}: the AWS credentials have expired ({code}); refresh them and re-run")
        if code in _REJECTED:
            return StoreError(
                f"{head}: {self.endpoint} rejected the AWS credentials ({code}); check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE"
            )
        if code in _DENIED:
            needed = _PERMISSION.get(exc.operation_name, f"permission for {exc.operation_name}")
            return StoreError(f"{head}: access denied ({code}); the credentials in use need {needed} on it")
        if code in _REGION:
            region = error.get("Region") or meta.get("HTTPHeaders", {}).get("x-amz-bucket-region")
            fix = f"it is in {region!r}: set AWS_REGION={region}" if region else "set AWS_REGION or AWS_ENDPOINT_URL"
            return StoreError(f"{head}: bucket {self.bucket!r} is not served by region {self.region!r}; {fix}")
        message = redact(str(error.get("Message", "")))
        return StoreError(f"{head}: {code} {message}".rstrip())


def _b64(digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_of(digest))).decode()


def _size_mismatch(url: str, got: int, want: int) -> VerificationError:
    what = "truncated" if got < want else "longer than expected"
    return VerificationError(f"{url} is corrupt: {got} bytes, expected {want} ({what})")


def _is_expired(exc: Exception) -> bool:
    # botocore raises a bare RuntimeError when refreshed credentials are already expired.
    return isinstance(exc, RuntimeError) and "expired" in str(exc).lower()


class S3Store:
    """A content-addressed store in ``s3://bucket/prefix``; see :mod:`artifacts.store` for the layout."""

    def __init__(self, uri: str, **transfer: int) -> None:
        self.uri = normalize_store_uri(uri)
        self.loc = S3Location.parse(self.uri)
        self.s3 = S3Transport(self.loc.bucket, **transfer)

    def preflight(self) -> None:
        """Fail fast when the bucket is missing or unreachable, or the credentials unusable.

        A GET of a key that does not exist: "no such key" is success, and so is "access denied", since
        credentials allowed to write need not be allowed to read.
        """
        try:
            with self.s3.errors("use", None, where=self.uri):
                self.s3.client.get_object(Bucket=self.loc.bucket, Key=self.loc.key("names/.kiln-preflight"))
        except NotFoundError:
            return
        except StoreError as exc:
            if "access denied" not in str(exc):
                raise

    # -- blobs ---------------------------------------------------------------------------------------------
    def blob_key(self, digest: str) -> str:
        return self.loc.key(f"blobs/sha256/{hex_of(digest)}")

    def has_blob(self, digest: str) -> bool:
        return self.s3.exists(self.blob_key(digest))

    def put_blob(self, digest: str, src: Path, size: int, progress: ProgressFn | None = None) -> None:
        try:
            chunks = verify_stream(file_chunks(src), digest, size, name=f"{src} (changed since it was hashed?)")
            self.s3.upload(self.blob_key(digest), chunks, size, digest, progress)
        except OSError as exc:
            raise StoreError(f"cannot read {src}: {exc.strerror}") from exc

    def put_stream(self, digest: str, size: int, chunks: Iterable[bytes], progress: ProgressFn | None = None) -> None:
        key = self.blob_key(digest)
        checked = verify_stream(chunks, digest, size, name=f"upload of {self.s3.url(key)}")
        self.s3.upload(key, checked, size, digest, progress)

    def read_blob(self, digest: str, size: int) -> Iterator[bytes]:
        key = self.blob_key(digest)
        return verify_stream(self.s3.iter_object(key, size), digest, size, name=self.s3.url(key))

    def fetch_blob(self, digest: str, size: int, dest: Path, progress: ProgressFn | None = None) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self.read_blob(digest, size):
                    f.write(chunk)
                    if progress:
                        progress(len(chunk))
            os.replace(tmp, dest)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if is_out_of_space(exc):
                why = f"no space left on device writing {size} bytes of {digest} into {dest.parent}"
                raise DiskFullError(why) from None
            raise

    def check_blob(self, digest: str, size: int) -> None:
        try:
            for _ in self.read_blob(digest, size):
                pass
        except NotFoundError as exc:
            raise VerificationError(f"blob {digest} is missing from store {self.uri} ({exc})") from None

    # -- manifests, tags, records --------------------------------------------------------------------------
    def put_manifest(self, name: str, data: bytes) -> str:
        digest = sha256_bytes(data)
        if not self.has_blob(digest):
            self.s3.put_bytes(self.blob_key(digest), data, sha256=digest)
        self.s3.put_bytes(self._name_key(name, f"manifests/{hex_of(digest)}"), b"")
        return digest

    def get_manifest(self, name: str, digest: str) -> bytes:
        try:
            self.s3.get_bytes(self._name_key(name, f"manifests/{hex_of(check_digest(digest))}"))
            data = self.s3.get_bytes(self.blob_key(digest))
        except NotFoundError:
            raise NotFoundError(f"{self.uri}/{name}@{digest} does not exist") from None
        if sha256_bytes(data) != digest:
            raise VerificationError(f"manifest {self.uri}/{name}@{digest} is corrupt in the store")
        return data

    def set_tag(self, name: str, tag: str, digest: str) -> None:
        self.s3.put_bytes(self._name_key(name, f"tags/{check_tag(tag)}"), f"{check_digest(digest)}\n".encode())

    def resolve_tag(self, name: str, tag: str) -> str:
        try:
            raw = self.s3.get_bytes(self._name_key(name, f"tags/{check_tag(tag)}"), limit=1024)
            text = raw.decode(errors="replace").strip()
        except NotFoundError:
            raise NotFoundError(f"{self.uri}/{name}:{tag} does not exist") from None
        if not is_digest(text):
            raise VerificationError(f"tag {self.uri}/{name}:{tag} is corrupt: it holds {text[:80]!r}, not a digest")
        return text

    def put_record(self, name: str, digest: str, record: Mapping[str, Any]) -> None:
        data = json.dumps(dict(record), indent=2, sort_keys=True).encode()
        self.s3.put_bytes(self._name_key(name, f"records/{hex_of(check_digest(digest))}.json"), data)

    def put_signature(self, name: str, digest: str, doc: bytes) -> None:
        self.s3.put_bytes(self._signature_prefix(name, digest) + signature_leaf(doc), doc)

    def get_signatures(self, name: str, digest: str) -> list[bytes]:
        prefix = self._signature_prefix(name, digest)
        try:
            keys = sorted(o["Key"] for o in self.s3.list(prefix))
        except StoreError as exc:
            if "access denied" not in str(exc):
                raise
            # Pulls read with GETs only; a role without s3:ListBucket must still pull unsigned artifacts. A server that
            # requires signatures then reports none found, and this line says why.
            log.warning("cannot list the signatures under %s (%s): treating the artifact as unsigned", prefix, exc)
            return []
        return [self.s3.get_bytes(k, limit=SIGNATURE_LIMIT) for k in keys if k.endswith(".json")]

    def _signature_prefix(self, name: str, digest: str) -> str:
        return self._name_key(name, f"signatures/{hex_of(check_digest(digest))}/")

    def list_artifacts(self) -> list[ArtifactInfo]:
        root = self.loc.key("names/")
        digests: dict[str, set[str]] = {}
        tag_keys: dict[str, dict[str, str]] = {}
        for obj in self.s3.list(root):
            name, _, rest = obj["Key"][len(root) :].partition("/")
            kind, _, leaf = rest.partition("/")
            if kind == "manifests":
                digests.setdefault(name, set()).add(f"sha256:{leaf}")
            elif kind == "tags":
                tag_keys.setdefault(name, {})[leaf] = obj["Key"]
        pool = self.s3._executor()
        tags = {
            name: dict(zip(keys, pool.map(self._read_tag, keys.values()), strict=True))
            for name, keys in tag_keys.items()
        }
        return [
            ArtifactInfo(name, tuple(sorted(digests.get(name, ()))), dict(sorted(tags.get(name, {}).items())))
            for name in sorted(digests.keys() | tags.keys())
        ]

    def _read_tag(self, key: str) -> str:
        return self.s3.get_bytes(key, limit=1024).decode(errors="replace").strip()

    def _name_key(self, name: str, rest: str) -> str:
        return self.loc.key(f"names/{check_name(name)}/{rest}")

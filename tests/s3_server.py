"""Real S3 endpoints on loopback for the S3 tests: moto's server mode, a fault-injecting TCP proxy in front of it,
and a tiny HTTP server answering what S3 answers in cases moto cannot produce (expired tokens, wrong region).

Every client talks to these over HTTP exactly as production talks to S3 (``AWS_ENDPOINT_URL``); nothing in
boto3 is patched.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Credentials the tests use; distinctive so a test can prove they never show up in output.
ACCESS_KEY = "AKIAKILNTESTKEY12345"
SECRET_KEY = "kilnTestSecretKey/DoNotPrint+0123456789"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/kiln-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/kiln-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_MAX_ATTEMPTS": "3",
}
_AWS_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
_counter = itertools.count()
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)((?:GET|HEAD|PUT|POST|DELETE) \S+) HTTP/1\.1\r\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoS3:
    endpoint: str

    def client(self, endpoint: str | None = None) -> Any:
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=endpoint or self.endpoint)

    def bucket(self, stem: str = "kiln") -> str:
        """A fresh, empty bucket."""
        name = f"{stem}-{os.getpid()}-{next(_counter)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def set_auth(self, enabled: bool) -> None:
        """Turn moto's IAM authentication on or off (its own control endpoint, over HTTP)."""
        import httpx

        value = "0" if enabled else "inf"
        httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=value, timeout=10).raise_for_status()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's S3 server on a free loopback port; AWS_* environment pointing at it for this session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, *_AWS_UNSET, "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    for key in _AWS_UNSET:
        os.environ.pop(key, None)
    try:
        yield MotoS3(endpoint)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class FaultProxy:
    """A TCP proxy on loopback: counts bytes sent upstream, and can cut connections or slow them down.

    ``cut_after``: reset any connection once it has carried this many bytes upstream (``cuts`` times; -1 for
    every connection). ``rate``: upstream bytes per second; ``down_rate``: downstream (responses) bytes per second.
    ``requests``: the request lines seen
    (``GET /bucket/key?…``), to prove what a client did or did not fetch.
    """

    upstream: int
    cut_after: int | None = None
    cuts: int = -1
    rate: float | None = None
    down_rate: float | None = None
    sent: int = 0
    resets: int = 0
    requests: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def heal(self) -> None:
        self.cut_after, self.rate, self.down_rate = None, None, None

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump_up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(server, client), daemon=True).start()

    def _pump_up(self, src: socket.socket, dst: socket.socket) -> None:
        carried = 0
        try:
            while data := src.recv(65536):
                if self.cut_after is not None and carried + len(data) > self.cut_after and self._take_cut():
                    dst.sendall(data[: max(0, self.cut_after - carried)])
                    _reset(src)
                    _reset(dst)
                    return
                if self.rate:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
                carried += len(data)
                with self._lock:
                    self.sent += len(data)
                    self.requests += [m.decode() for m in _REQUEST_LINE.findall(data)]
        except OSError:
            pass
        _close(src, dst)

    def _pump_down(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.down_rate:
                    time.sleep(len(data) / self.down_rate)
                dst.sendall(data)
        except OSError:
            pass
        _close(src, dst)

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts == 0:
                return False
            self.cuts -= 1 if self.cuts > 0 else 0
            self.resets += 1
            return True


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a dropped network connection looks to the peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


@pytest.fixture
def fault_proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream=int(moto_s3.endpoint.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()


class CannedS3:
    """An HTTP server on loopback answering every request as S3 does in one situation (status, headers, XML)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: str):
        fields = "".join(f"<{k}>{v}</{k}>" for k, v in extra.items())
        body = f"<Error><Code>{code}</Code><Message>{message}</Message>{fields}</Error>"
        payload = ('<?xml version="1.0" encoding="UTF-8"?>\n' + body).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer  # noqa: N815 (http.server's names)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ContainerCredentials:
    """The ECS/EKS container credentials endpoint on loopback, handing out credentials that expired in 2020."""

    TOKEN = "kilnExpiredSessionToken/DoNotPrint+abcdef"
    SECRET = "kilnExpiredSecret/DoNotPrint+abcdef0123"

    def __init__(self) -> None:
        creds = {
            "AccessKeyId": "ASIAKILNEXPIRED00001",
            "SecretAccessKey": self.SECRET,
            "Token": self.TOKEN,
            "Expiration": "2020-01-01T00:00:00Z",
        }
        payload = json.dumps(creds).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}/v2/credentials"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

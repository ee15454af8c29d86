"""A SageMaker runtime endpoint on loopback: checks each request's SigV4 signature with botocore, then forwards the
body to a container's ``/invocations`` (a kiln server), as SageMaker's front end does.

``POST /endpoints/{name}/invocations`` answers whole; ``…/invocations-response-stream`` re-frames the container's
streamed bytes as AWS event-stream ``PayloadPart`` messages (the binary framing botocore parses for
``InvokeEndpointWithResponseStream``). A bad signature is refused 403 ``InvalidSignatureException``; a container
error becomes 424 ``ModelError``, as SageMaker answers them. What each request carried is recorded for the tests.
"""

from __future__ import annotations

import binascii
import http.server
import json
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.s3_server import ACCESS_KEY, SECRET_KEY, free_port

REGION = "us-east-1"
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                   r"SignedHeaders=([^,]+), Signature=([0-9a-f]+)")  # fmt: skip
_PATH = re.compile(r"^/endpoints/([^/]+)/(invocations|invocations-response-stream)$")


@dataclass
class Seen:
    endpoint: str
    streamed: bool
    signed: bool
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class SageMakerStandIn:
    url: str
    seen: list[Seen] = field(default_factory=list)


def signature_ok(method: str, url: str, headers: dict[str, str], body: bytes) -> bool:
    """Recompute the request's SigV4 signature with botocore from the test's secret key and compare."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    m = _AUTH.fullmatch(headers.get("authorization", ""))
    if not m or m.group(1) != ACCESS_KEY or m.group(3) != REGION or m.group(4) != "sagemaker":
        return False
    signed = m.group(5).split(";")
    request = AWSRequest(method=method, url=url, data=body, headers={h: headers.get(h, "") for h in signed})
    request.context["timestamp"] = headers.get("x-amz-date", "")
    signer = SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "sagemaker", REGION)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    return bool(expected == m.group(6) and signer.signed_headers(signer.headers_to_sign(request)) == m.group(5))


def event(payload: bytes, headers: dict[str, str]) -> bytes:
    """One AWS event-stream message: prelude (lengths + CRC), string headers, payload, message CRC."""
    head = b"".join(
        struct.pack("!B", len(k)) + k.encode() + struct.pack("!BH", 7, len(v)) + v.encode() for k, v in headers.items()
    )
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack("!II", total, len(head))
    prelude += struct.pack("!I", binascii.crc32(prelude))
    message = prelude + head + payload
    return message + struct.pack("!I", binascii.crc32(message))


JSON = {"content-type": "application/json"}
PART = {":message-type": "event", ":event-type": "PayloadPart", ":content-type": "application/octet-stream"}


@contextmanager
def sagemaker_endpoint(container: str) -> Iterator[SageMakerStandIn]:
    """The stand-in on a free loopback port, forwarding to ``container`` (a base URL)."""
    port = free_port()
    stand_in = SageMakerStandIn(f"http://127.0.0.1:{port}")
    upstream = httpx.Client(base_url=container, timeout=120)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            match = _PATH.match(self.path)
            signed = signature_ok("POST", f"http://{headers.get('host', '')}{self.path}", headers, body)
            if match:
                stand_in.seen.append(
                    Seen(match.group(1), match.group(2).endswith("stream"), signed, headers, json.loads(body or b"{}"))
                )
            if not match:
                return self._error(404, "UnknownOperationException", "no such operation")
            if not signed:
                return self._error(403, "InvalidSignatureException", "The request signature we calculated does not "
                                   "match the signature you provided.")  # fmt: skip
            if match.group(2).endswith("stream"):
                return self._stream(body)
            answer = upstream.post("/invocations", content=body, headers=JSON)
            if answer.status_code != 200:
                return self._model_error(answer.status_code, answer.text)
            self._reply(200, answer.content, "application/json")
            return None

        def _stream(self, body: bytes) -> None:
            req = upstream.build_request(
                "POST", "/invocations", content=body, headers={"content-type": "application/json"}
            )
            answer = upstream.send(req, stream=True)
            try:
                if answer.status_code != 200:
                    return self._model_error(answer.status_code, answer.read().decode())
                self.send_response(200)
                self.send_header("content-type", "application/vnd.amazon.eventstream")
                self.send_header("x-amzn-invoked-production-variant", "AllTraffic")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for chunk in answer.iter_raw():
                    self._chunk(event(chunk, PART))
                self._chunk(b"")
            finally:
                answer.close()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _model_error(self, status: int, text: str) -> None:
            message = f'Received client error ({status}) from primary with message "{text[:200]}".'
            self._error(424, "ModelError", message, OriginalStatusCode=status, OriginalMessage=text[:200])

        def _error(self, status: int, kind: str, message: str, **extra: Any) -> None:
            doc = json.dumps({"message": message, **extra}).encode()
            self._reply(status, doc, "application/json", {"x-amzn-errortype": kind})

        def _reply(self, status: int, data: bytes, kind: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(data)))
            self.send_header("x-amzn-invoked-production-variant", "AllTraffic")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="sagemaker-stand-in", daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()
        upstream.close()

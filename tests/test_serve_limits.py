"""The server under pressure, with the real vLLM CPU engine over real HTTP: a bounded queue (job_queue_size),
per-request timeouts (predict_timeout) reported in-band once a stream started and failing only that request,
SIGTERM draining in-flight requests, and an engine death turning /ping 503 and the process non-zero.

The tiny model cannot generate 1900 tokens within the 4 s predict_timeout below (that is 1900 engine steps of
several milliseconds each), while an 8-token request takes a few tens of milliseconds.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress

import httpx
import psutil
import pytest

from tests.conftest import Server, start_server
from tests.test_serve import metrics, wait_engine_idle

pytestmark = pytest.mark.integration
CHAT = [{"role": "user", "content": "Tell me a long story."}]
LONG = {"max_tokens": 1900, "ignore_eos": True, "temperature": 0}
QUEUE = 3
TIMEOUT_S = 4


@pytest.fixture(scope="module")
def server(tiny_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tiny_uri, tmp_path_factory.mktemp("limits"), "--job-queue-size", str(QUEUE), "--predict-timeout", str(TIMEOUT_S)
    )
    yield srv
    srv.stop(signal.SIGKILL if srv.proc.poll() is None else signal.SIGTERM)


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, object] | str]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def test_queue_full_is_refused_at_once_with_503(server: Server) -> None:
    with ExitStack() as stack, httpx.Client(base_url=server.base, timeout=30) as c:
        streams = []  # keep each line iterator: dropping one closes its response (and so the connection)
        for _ in range(QUEUE):
            r = stack.enter_context(
                c.stream("POST", "/v1/chat/completions", json={"messages": CHAT, **LONG, "stream": True})
            )
            streams.append(r.iter_lines())
            assert next(streams[-1]).startswith("data: ")  # admitted and streaming
        assert metrics(server.base)["kiln_requests_in_flight"] == QUEUE
        t0 = time.monotonic()
        full = httpx.post(server.base + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        refused_in = time.monotonic() - t0
        lmi = httpx.post(server.base + "/invocations", json={"inputs": "x"}, timeout=30)
        assert httpx.get(server.base + "/v1/models").status_code == 200  # only generation requests are gated
    assert full.status_code == 503, full.text
    assert "job_queue_size" in full.json()["error"]["message"]
    assert refused_in < 1.0  # immediately, not after waiting for a slot
    assert lmi.status_code == 503
    assert lmi.json()["code"] == 503
    wait_engine_idle(server.base)
    again = httpx.post(server.base + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert again.status_code == 200, again.text
    assert metrics(server.base)['kiln_requests_total{route="/v1/completions",status="503"}'] >= 1


def test_predict_timeout_fails_only_the_slow_request_in_band(server: Server) -> None:
    events: list[dict[str, object] | str] = []

    def slow() -> None:
        body = {"messages": CHAT, **LONG, "stream": True}
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events.extend(sse_events(r.iter_lines()))

    t = threading.Thread(target=slow)
    t.start()
    others = []
    while t.is_alive():  # the rest of the batch keeps being served while the slow request runs and fails
        r = httpx.post(server.base + "/v1/completions", json={"prompt": "The cat", "max_tokens": 8}, timeout=30)
        others.append(r.status_code)
        time.sleep(0.2)
    t.join()
    assert events[-1] == "[DONE]"
    error = events[-2]
    assert isinstance(error, dict)
    assert error["error"]["code"] == 408  # type: ignore[index]
    assert error["error"]["param"] == "predict_timeout"  # type: ignore[index]
    assert any(isinstance(e, dict) and "choices" in e and e["choices"] for e in events[:-2])  # it had started
    assert len(others) >= 3
    assert set(others) == {200}
    wait_engine_idle(server.base, timeout=10)  # the timed-out request was aborted in the engine


def test_predict_timeout_lmi_stream_and_non_streaming(server: Server) -> None:
    body = {"inputs": "The cat", "parameters": {"max_new_tokens": 1900, "ignore_eos_token": True}, "stream": True}
    with httpx.stream("POST", server.base + "/invocations", json=body, timeout=60) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert r.status_code == 200
    last = lines[-1]
    assert last["details"]["finish_reason"] == "error"
    assert last["token"]["id"] == -1
    assert last["code"] == 408
    assert "predict_timeout" in last["error"]
    assert all(line["token"]["id"] >= 0 for line in lines[:-1])  # what streamed before the deadline were tokens
    t0 = time.monotonic()
    r2 = httpx.post(server.base + "/v1/completions", json={"prompt": "The cat", **LONG}, timeout=60)
    assert r2.status_code == 408, r2.text
    assert r2.json()["error"]["param"] == "predict_timeout"
    assert time.monotonic() - t0 < TIMEOUT_S + 5
    wait_engine_idle(server.base, timeout=10)


def test_sigterm_drains_in_flight_requests_then_exits_0(server: Server) -> None:
    body = {
        "prompt": "The cat",
        "max_tokens": 80,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        server.proc.send_signal(signal.SIGTERM)  # mid-stream: stop accepting, finish this one, exit 0
        events = list(sse_events(iter([first, *lines])))
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert isinstance(usage, dict)
    assert usage["usage"]["completion_tokens"] == 80  # type: ignore[index]
    assert server.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base + "/ping", timeout=5)


def test_engine_death_turns_ping_503_and_exits_non_zero(
    tiny_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    srv = start_server(tiny_uri, tmp_path_factory.mktemp("death"))
    try:
        core = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "EngineCore" in _name(p)]
        assert core, "no vLLM engine core process found"
        for p in core:
            p.kill()
        codes = []
        while srv.proc.poll() is None and len(codes) < 600:
            with suppress(httpx.TransportError):
                codes.append(httpx.get(srv.base + "/ping", timeout=5).status_code)
            time.sleep(0.1)
        assert srv.proc.wait(timeout=60) == 1, srv.logs()[-3000:]
        assert 503 in codes
        assert "engine died" in srv.logs()
    finally:
        srv.stop(signal.SIGKILL)


def _name(p: psutil.Process) -> str:
    try:
        return p.name() + " " + " ".join(p.cmdline())
    except psutil.Error:
        return ""

"""Request limits, enforced before the expensive part: a body over ``max_request_size`` gets 413 before it is read
(or, chunked, on the first byte past the limit); a prompt no context could hold gets 400 naming
``max_prompt_chars`` before it is tokenized; more stop sequences than ``max_stop_sequences`` get 400 naming it. The
server stays healthy throughout (fake engine: kiln's own behaviour)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FakeServer, fake_server

pytestmark = pytest.mark.unit
LIMIT = 2 << 20  # 2 MiB


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[FakeServer]:
    with fake_server(tiny_dir, f"max_request_size={LIMIT}", "max_stop_sequences=8", "max_model_len_cap=64") as srv:
        yield srv


def _post(srv: FakeServer, path: str, body: object) -> httpx.Response:
    return httpx.post(srv.base + path, json=body, timeout=60)


@pytest.mark.parametrize("path", ["/invocations", "/v1/completions"])
def test_a_body_over_the_limit_is_refused_413_naming_it(server: FakeServer, path: str) -> None:
    prompt = "x" * (LIMIT + 10)
    body = {"inputs": prompt} if path == "/invocations" else {"model": "tiny-llama", "prompt": prompt}
    r = _post(server, path, body)
    assert r.status_code == 413, r.text
    message = r.json()["error"] if path == "/invocations" else r.json()["error"]["message"]
    assert f"max_request_size={LIMIT}" in message
    assert httpx.get(server.base + "/ping", timeout=10).status_code == 200


def test_a_chunked_body_is_cut_at_the_limit_and_a_small_one_replayed(server: FakeServer) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        head = b'{"inputs": "'
        yield head
        for _ in range(total // 65536):
            yield b"y" * 65536
        yield b'", "parameters": {"max_new_tokens": 2}}'

    big = httpx.post(server.base + "/invocations", content=chunks(LIMIT + 65536), timeout=60)  # no Content-Length
    assert big.status_code == 413, big.text
    assert "more than" in big.json()["error"]
    small = httpx.post(
        server.base + "/invocations",
        content=chunks(4 * 65536),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert small.status_code == 400, small.text  # read whole and parsed: its prompt is then too long for this model
    assert "max_prompt_chars" in small.json()["error"]


def test_a_prompt_no_context_holds_is_refused_before_tokenizing(server: FakeServer) -> None:
    # max_model_len is 64 here: the default limit is 64 characters per token of context, 4096 characters
    r = _post(server, "/v1/completions", {"model": "tiny-llama", "prompt": "z" * 1_000_000, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt"
    assert "1000000 characters, more than max_prompt_chars=4096" in err["message"]
    chat = _post(
        server, "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "z" * 5000}]}
    )
    assert chat.status_code == 400, chat.text
    assert chat.json()["error"]["param"] == "messages"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "tiny-llama", "prompt": "hi", "stop": [f"s{i}" for i in range(10_000)]}, "stop"),
        ("/invocations", {"inputs": "hi", "parameters": {"stop_sequences": [f"s{i}" for i in range(9)]}}, None),
    ],
)
def test_too_many_stop_sequences_are_refused_naming_the_limit(
    server: FakeServer, path: str, body: dict[str, object], param: str | None
) -> None:
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    text = json.dumps(r.json())
    assert "more than max_stop_sequences=8" in text
    if param:
        assert r.json()["error"]["param"] == param
    ok = _post(server, "/v1/completions", {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "stop": ["a"] * 8})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny-llama", "prompt": "hi", "n": 5000}, "n"),
        ({"model": "tiny-llama", "prompt": "hi", "max_tokens": 2**63}, "max_tokens"),
        ({"model": "tiny-llama", "prompt": "hi", "temperature": 1e308}, None),
    ],
)
def test_absurd_numbers_are_never_5xx(server: FakeServer, body: dict[str, object], param: str | None) -> None:
    r = _post(server, "/v1/completions", body | {"max_tokens": body.get("max_tokens", 2)})
    assert r.status_code < 500, r.text
    if param:  # refused, naming the field; a huge temperature is a valid (uniform) sampling request, as in vLLM
        assert r.status_code == 400
        assert r.json()["error"]["param"] == param
    assert httpx.get(server.base + "/ping", timeout=10).status_code == 200


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/invocations", "/tokenize"])
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"prompt": ' + NESTED + b', "max_tokens": 2}', "nested"),
        (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "digits"),
        (b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', "NaN"),
        (b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": -Infinity}}', "Infinity"),
        (b'{"prompt": "\xff\xfe", "max_tokens": 2}', "UTF-8"),
    ],
    ids=["nested-100k", "5000-digits", "NaN", "Infinity", "invalid-utf8"],
)
def test_json_that_python_chokes_on_or_that_is_not_json_is_400(
    server: FakeServer, path: str, body: bytes, reason: str
) -> None:
    """JSON nested past the parser's stack, an integer of more digits than Python converts, and the NaN/Infinity
    literals that Python's parser accepts but JSON (RFC 8259) has not: each a 400 saying so, never a 500."""
    r = httpx.post(server.base + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]["message"], r.text
    assert httpx.get(server.base + "/ping", timeout=10).status_code == 200


def test_a_utf8_byte_order_mark_is_accepted(server: FakeServer) -> None:
    """PowerShell and some .NET clients start a UTF-8 body with a BOM; Python's json.loads(bytes) took it, and so
    does kiln's RFC 8259 parser."""
    body = b"\xef\xbb\xbf" + json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    r = httpx.post(server.base + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_duplicate_keys_take_the_last_value_as_vllm_does(server: FakeServer) -> None:
    """Python's parser, vLLM's and kiln's: the last of a duplicated key wins (RFC 8259 leaves it open)."""
    body = b'{"prompt": "hi", "max_tokens": 9, "max_tokens": 1}'
    r = httpx.post(server.base + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1, r.text


@pytest.mark.parametrize(
    "content_type", [None, "application/octet-stream", "text/plain", "application/x-www-form-urlencoded"]
)
@pytest.mark.parametrize("path", ["/invocations", "/v1/completions"])
def test_a_json_body_is_read_whatever_its_content_type(server: FakeServer, path: str, content_type: str | None) -> None:
    """boto3's invoke_endpoint sends application/octet-stream unless told, curl -d form-urlencoded: the body is read as
    JSON either way (vLLM's routes refuse all but application/json with a 400)."""
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    r = httpx.post(server.base + path, content=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2, r.text


def _battery(base: str) -> list[int]:
    """One pass of the hostile requests: each answer's status."""
    bodies = [
        {"prompt": "x" * 1_000_000, "max_tokens": 2},
        {"prompt": "hi", "max_tokens": 2, "stop": [f"s{i}" for i in range(10_000)]},
        {"prompt": "hi", "max_tokens": 2**63},
        {"prompt": "hi", "n": 5000},
        {"messages": [{"role": "user", "content": "hi"}] * 100_000, "max_tokens": 2},
    ]
    raw = [NESTED, b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", b"\xff" * 1000, b"x" * (3 << 20)]
    codes = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for body in bodies:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            codes.append(client.post(path, json=body).status_code)
        for content in raw:
            codes.append(client.post("/invocations", content=content).status_code)
    return codes


@pytest.mark.integration
def test_the_battery_leaves_a_server_process_healthy_and_its_memory_flat(tiny_dir: Path, tmp_path: Path) -> None:
    """The hostile requests against a real server process, five passes after a warm-up one: every answer a 4xx,
    /ping 200 afterwards, RSS grown by less than 5 % over the five (a leak per request would show: each pass sends
    over 5 MB), and SIGTERM exits 0."""
    import psutil

    from tests.conftest import start_fake_process

    server = start_fake_process(tiny_dir, tmp_path, "--option", f"max_request_size={LIMIT}")
    try:
        proc = psutil.Process(server.proc.pid)
        assert all(400 <= c < 500 for c in _battery(server.base))
        warm = proc.memory_info().rss
        for _ in range(5):
            codes = _battery(server.base)
            assert all(400 <= c < 500 for c in codes), codes
        end = proc.memory_info().rss
        assert httpx.get(server.base + "/ping", timeout=10).status_code == 200
    finally:
        code = server.stop()
    assert code == 0, server.logs()[-3000:]
    growth = (end - warm) / warm
    print(f"\nhostile battery x5: RSS {warm / 2**20:.1f} -> {end / 2**20:.1f} MiB ({growth:+.1%})")
    assert growth < 0.05, f"RSS grew {growth:.1%} over five passes ({warm} -> {end} bytes)"

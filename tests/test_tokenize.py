"""vLLM's tokenizer routes (``/tokenize``, ``/detokenize``, ``/tokenizer_info``) against the tokenizer itself, the
routes kiln does not serve answering 404 in OpenAI's error shape, and ``/metrics`` as Prometheus text; all with the
fake engine (kiln's own HTTP layer, in seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FakeServer, fake_server

pytestmark = pytest.mark.unit
MAX_LEN = 512
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[FakeServer]:
    with fake_server(tiny_dir, max_model_len=MAX_LEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def model(server: FakeServer) -> str:
    return str(httpx.get(server.base + "/v1/models", timeout=30).json()["data"][0]["id"])


def post(server: FakeServer, path: str, body: object) -> httpx.Response:
    return httpx.post(server.base + path, json=body, timeout=30)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str)
    assert err["message"]
    assert err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


def test_tokenize_prompt_matches_the_tokenizer(server: FakeServer, tok: Any, model: str) -> None:
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓"
    r = post(server, "/tokenize", {"model": model, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = tok(text, add_special_tokens=True)["input_ids"]
    assert body["tokens"] == expected
    assert body["count"] == len(expected)
    assert body["max_model_len"] == MAX_LEN
    assert body.get("token_strs") is None  # only on request

    r = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert body["tokens"] == plain
    assert body["token_strs"] == tok.convert_ids_to_tokens(plain)
    assert body["count"] == len(plain)


def test_detokenize_round_trip(server: FakeServer, tok: Any, model: str) -> None:
    text = "Round trips: 1, 2, 3 — done."
    ids = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    r = post(server, "/detokenize", {"model": model, "tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": tok.decode(ids)}
    assert r.json()["prompt"] == text
    with_bos = tok(text)["input_ids"]
    assert post(server, "/detokenize", {"tokens": with_bos}).json()["prompt"] == tok.decode(with_bos)


def test_tokenize_chat_messages(server: FakeServer, tok: Any) -> None:
    r = post(server, "/tokenize", {"messages": CHAT})
    assert r.status_code == 200, r.text
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected = tok(text, add_special_tokens=False)["input_ids"]
    assert r.json()["tokens"] == expected
    assert r.json()["count"] == len(expected)
    assert r.json()["max_model_len"] == MAX_LEN

    r = post(server, "/tokenize", {"messages": CHAT, "add_generation_prompt": False})
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    assert r.json()["tokens"] == tok(text, add_special_tokens=False)["input_ids"]

    # The chat form's tokens are exactly what a chat completion's prompt counts.
    chat = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1, "temperature": 0}).json()
    assert chat["usage"]["prompt_tokens"] == len(expected)


def test_tokenizer_info(server: FakeServer, tok: Any) -> None:
    r = httpx.get(server.base + "/tokenizer_info", timeout=30)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["tokenizer_class"] == type(tok).__name__
    assert "vocab_file" not in info
    assert "merges_file" not in info
    for key in ("bos_token", "eos_token", "model_max_length"):
        if key in tok.init_kwargs:
            assert key in info


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "hi", "model": "no-such-model"}, 404, "model"),
        ("/detokenize", {"tokens": [1, 2], "model": "no-such-model"}, 404, "model"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {}, 400, "tokens"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": 3}, 400, "prompt"),
        ("/tokenize", {"messages": "hello"}, 400, "messages"),
        ("/tokenize", {"messages": CHAT, "continue_final_message": True}, 400, "continue_final_message"),
        ("/tokenize", [1, 2], 400, None),
    ],
)
def test_bad_tokenizer_requests_are_openai_errors(
    server: FakeServer, path: str, body: object, status: int, param: str | None
) -> None:
    assert_openai_error(post(server, path, body), status, param)


def test_detokenize_out_of_vocabulary_names_the_field(server: FakeServer, tok: Any) -> None:
    err = assert_openai_error(post(server, "/detokenize", {"tokens": [1, len(tok)]}), 400, "tokens")
    assert str(len(tok)) in err["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/responses"),
        ("GET", "/v1/responses/resp_123"),
        ("POST", "/v1/responses/resp_123/cancel"),
        ("POST", "/v1/audio/transcriptions"),
        ("POST", "/pooling"),
        ("POST", "/score"),
        ("POST", "/rerank"),
        ("POST", "/v1/rerank"),
    ],
)
def test_vllm_routes_kiln_does_not_serve_are_openai_404s(server: FakeServer, method: str, path: str) -> None:
    r = httpx.request(method, server.base + path, json={"model": "x", "input": "hi"}, timeout=30)
    err = assert_openai_error(r, 404)
    assert path in err["message"]
    assert "/v1/chat/completions" in err["message"] or "/v1/completions" in err["message"], err


def test_unknown_route_is_an_openai_404(server: FakeServer) -> None:
    assert_openai_error(httpx.get(server.base + "/no/such/route", timeout=30), 404)


def test_wrong_method_is_405_with_allow(server: FakeServer) -> None:
    r = httpx.get(server.base + "/tokenize", timeout=30)
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = httpx.delete(server.base + "/v1/models", timeout=30)
    assert r.status_code == 405
    assert "GET" in r.headers["allow"]


def test_metrics_is_prometheus_text(server: FakeServer) -> None:
    r = httpx.get(server.base + "/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "kiln_requests_total" in r.text
    doc = httpx.get(server.base + "/openapi.json", timeout=30).json()
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]

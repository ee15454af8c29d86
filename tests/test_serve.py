"""`python -m runtime serve` with the real vLLM CPU engine, through real HTTP and the official openai client."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, build, run_cli, start_server

pytestmark = pytest.mark.integration
CHAT = [{"role": "user", "content": "What color is the sky?"}]


@pytest.fixture(scope="module")
def server(tiny_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tiny_uri, tmp_path_factory.mktemp("serve"))
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]  # SIGTERM: drain and exit 0


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def test_ping_goes_from_503_to_200(server: Server) -> None:
    assert 503 in server.ping_codes
    assert server.ping_codes[-1] == 200
    assert server.ping_codes.index(503) < server.ping_codes.index(200)


def test_models_lists_the_artifact(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny-llama"]


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert r.usage is not None
    assert r.usage.completion_tokens <= 12
    assert r.usage.prompt_tokens > 5


def test_chat_streaming_matches_non_streaming_greedy(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=CHAT,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_completions_n_logprobs_and_seed(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny-llama", prompt="The cat", max_tokens=8, n=2, logprobs=2, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    lp = r.choices[0].logprobs
    assert lp is not None
    assert lp.token_logprobs
    assert len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(t) <= 2 for t in lp.top_logprobs or [])
    again = client.completions.create(
        model="tiny-llama", prompt="The cat", max_tokens=8, n=2, logprobs=2, temperature=1.0, seed=7
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_completions_streaming(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(model="tiny-llama", prompt="A dog", max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_async_client_concurrent_streams(server: Server) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": f"Hello {i}"}], max_tokens=10, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    texts = asyncio.run(main())
    assert len(texts) == 8
    assert all(texts)


def test_invocations_lmi_schema(server: Server) -> None:
    r = httpx.post(
        server.base + "/invocations",
        json={"inputs": "The cat", "parameters": {"max_new_tokens": 6, "details": True, "do_sample": False}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["generated_text"], str)
    details = body["details"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 6
    assert details["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert all({"id", "text", "log_prob"} <= set(t) for t in details["tokens"])


def test_invocations_lmi_streaming_jsonlines(server: Server) -> None:
    with httpx.stream(
        "POST",
        server.base + "/invocations",
        json={"inputs": "The cat", "parameters": {"max_new_tokens": 5}, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/jsonlines")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all("token" in line for line in lines)
    assert "generated_text" in lines[-1]
    assert lines[-1]["details"]["generated_tokens"] == len(lines)
    assert "".join(line["token"]["text"] for line in lines).strip() or lines[-1]["generated_text"] == ""


def test_invocations_routes_openai_bodies(server: Server) -> None:
    chat = httpx.post(server.base + "/invocations", json={"messages": CHAT, "max_tokens": 4}, timeout=60)
    assert chat.json()["object"] == "chat.completion"
    cmpl = httpx.post(server.base + "/invocations", json={"prompt": "A", "max_tokens": 4}, timeout=60)
    assert cmpl.json()["object"] == "text_completion"


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", {"messages": CHAT, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10**6}, 400, "maximum context length"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-9"}, 404, "gpt-9"),
        ("/v1/completions", {"prompt": "word " * 5000, "max_tokens": 1}, 400, "maximum context length"),
        ("/v1/completions", {"prompt": [10**7]}, 400, "token ids"),
        ("/invocations", {"inputs": 42}, 400, "inputs"),
        ("/invocations", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 400, "max_new_tokens"),
        ("/invocations", {"hello": "world"}, 400, "cannot tell the request schema"),
        ("/v1/nope", {}, 404, "no route"),
    ],
)
def test_bad_requests_get_4xx_naming_the_problem(
    server: Server, path: str, body: dict[str, object], status: int, needle: str
) -> None:
    r = httpx.post(server.base + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_malformed_json_is_400(server: Server) -> None:
    for path in ("/v1/chat/completions", "/invocations"):
        r = httpx.post(server.base + path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=CHAT, temperature=-3)
    assert err.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)


def test_tampered_artifact_is_refused_naming_the_file(tiny_uri: str, tmp_path: Path) -> None:
    d = tmp_path / "art"
    assert run_cli("artifacts", "pull", tiny_uri, str(d)).returncode == 0
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(4096)
        f.write(b"\x00\x01\x02\x03")
    proc = run_cli("runtime", "serve", str(d), "--port", "1", timeout=120)
    assert proc.returncode == 1
    assert "model.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_target_is_refused_naming_the_field(tiny_uri: str, tmp_path: Path) -> None:
    neuron = build("target.engine=neuron", "model.name=tiny-neuron")
    proc = run_cli("runtime", "serve", neuron, "--port", "1", timeout=120)
    assert proc.returncode == 1
    assert "target.engine" in proc.stderr
    d = tmp_path / "art"
    assert run_cli("artifacts", "pull", tiny_uri, str(d)).returncode == 0
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["target"]["devices"] = ["cuda"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("runtime", "serve", str(d), "--port", "1", timeout=120)
    assert proc.returncode == 1
    assert "target.devices" in proc.stderr
    shutil.rmtree(d)

"""`python -m runtime serve` through real HTTP and the official openai client, against both engines: vLLM (CPU)
and transformers' continuous batching. Where an engine cannot do something (transformers: seeds, top logprobs,
structured output), the same request must be refused with a 400 naming the parameter."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.exitcodes import EX_CONFIG
from tests.conftest import Server, build, run_cli, start_server, stop_cleanly

pytestmark = pytest.mark.integration
CHAT = [{"role": "user", "content": "What color is the sky?"}]


@dataclass
class Live:
    srv: Server
    engine: str
    model: str

    @property
    def base(self) -> str:
        return self.srv.base


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    if request.param == "vllm":
        # The differential tests' kiln (conftest.vllm_pair): one vLLM start-up less; it passes an engine-native key
        # through (structured_outputs_config) and is stopped cleanly (conftest.stop_cleanly) at the session's end.
        yield Live(request.getfixturevalue("vllm_pair").kiln, "vllm", "tiny-llama")
        return
    srv = start_server(request.getfixturevalue("tiny_hf_uri"), tmp_path_factory.mktemp("serve-transformers"))
    yield Live(srv, "transformers", "tiny-llama-hf")
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def client(server: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def metrics(base: str) -> dict[str, float]:
    """Every sample of /metrics, keyed ``name{label="value",…}`` (labels sorted)."""
    text = httpx.get(base + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_engine_idle(base: str, timeout: float = 15) -> float:
    """Poll until the engine reports no running request; return the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if metrics(base).get("kiln_engine_requests_running", 1) == 0:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"the engine still runs requests after {timeout}s: {metrics(base)}")


def leave_once_admitted(base: str, sock: socket.socket, timeout: float = 30) -> bytes:
    """Poll (tightly) until the server holds the request sent on ``sock`` (kiln's own gauge: immediate, where the
    engine's scheduler statistics lag by a step or more), then return b""; or return the answer if it came first."""
    sock.setblocking(False)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(BlockingIOError):
            return sock.recv(600) or b"(closed by the server)"
        text = httpx.get(base + "/metrics", timeout=30).text  # read directly: parsing all of it takes too long
        if re.search(r"^kiln_requests_in_flight [1-9]", text, re.M):
            return b""
        time.sleep(0.005)
    raise AssertionError(f"no request was admitted within {timeout}s")


def test_ping_goes_from_503_to_200(server: Live) -> None:
    codes = server.srv.ping_codes
    assert codes[-1] == 200
    assert set(codes[:-1]) <= {503}  # while loading, /ping answers 503 and nothing else
    if server.engine == "vllm":
        # vLLM loads for tens of seconds, so the probes always see the loading phase; the
        # transformers engine on the tiny model can be ready before the first probe lands.
        assert 503 in codes


def test_models_lists_the_artifact(client: openai.OpenAI, server: Live) -> None:
    assert [m.id for m in client.models.list()] == [server.model]


def test_chat_non_streaming(client: openai.OpenAI, server: Live) -> None:
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert r.usage is not None
    assert r.usage.completion_tokens <= 12
    assert r.usage.prompt_tokens > 5


def test_chat_streaming_matches_non_streaming_greedy(client: openai.OpenAI, server: Live) -> None:
    full = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model=server.model,
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


def test_chat_n_choices(client: openai.OpenAI, server: Live) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=6, n=3, temperature=1.0, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage is not None
    assert r.usage.completion_tokens == 18  # three sequences of six tokens each
    # A choice's text may be empty: 128 of the random model's 740 tokens are a partial UTF-8 character, and six that
    # never complete one leave nothing decodable to emit (held back, as vLLM's detokenizer holds it). CI met one.
    assert all(isinstance(c.message.content, str) for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # sampled independently (random weights: 740**6 paths)


def test_completions_n_logprobs_and_seed(client: openai.OpenAI, server: Live) -> None:
    if server.engine == "transformers":  # no top-k alternatives, no per-request seeds: refused by name
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=server.model, prompt="The cat", max_tokens=4, logprobs=2)
        assert err.value.body["param"] == "logprobs"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=server.model, prompt="The cat", max_tokens=4, temperature=1, seed=7)
        assert err.value.body["param"] == "seed"  # type: ignore[index]
        r = client.completions.create(model=server.model, prompt="The cat", max_tokens=5, n=2, logprobs=0)
        assert sorted(c.index for c in r.choices) == [0, 1]
        lp = r.choices[0].logprobs
        assert lp is not None
        assert lp.token_logprobs
        assert all(x is not None and x <= 0 for x in lp.token_logprobs)
        return
    r = client.completions.create(
        model=server.model, prompt="The cat", max_tokens=8, n=2, logprobs=2, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    lp = r.choices[0].logprobs
    assert lp is not None
    assert lp.token_logprobs
    assert len(lp.token_logprobs) == len(lp.tokens)
    assert lp.top_logprobs
    assert len(lp.top_logprobs) == len(lp.tokens)
    # the 2 most likely tokens, plus the sampled one where it is not among them (vLLM's rule)
    assert all(2 <= len(t) <= 3 for t in lp.top_logprobs)
    assert all(v <= 0 for t in lp.top_logprobs for v in t.values())
    again = client.completions.create(
        model=server.model, prompt="The cat", max_tokens=8, n=2, logprobs=2, temperature=1.0, seed=7
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_completions_streaming(client: openai.OpenAI, server: Live) -> None:
    chunks = list(
        client.completions.create(model=server.model, prompt="A dog", max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stop_sequence_cuts_the_output(client: openai.OpenAI, server: Live) -> None:
    full = client.completions.create(model=server.model, prompt="The cat", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = next((text[i : i + 3] for i in range(2, len(text) - 3) if text[i : i + 3].strip()), None)
    assert stop, f"greedy output too short to pick a stop string from: {text!r}"
    cut = client.completions.create(model=server.model, prompt="The cat", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(
        client.completions.create(
            model=server.model, prompt="The cat", max_tokens=16, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]  # no part of the stop leaks
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_async_client_concurrent_streams(server: Live) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": f"Hello {i}"}],
            max_tokens=10,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def plain(client: openai.AsyncOpenAI) -> str:
        r = await client.completions.create(
            model=server.model, prompt="Once", max_tokens=6, extra_body={"ignore_eos": True}
        )
        assert r.usage is not None
        assert r.usage.completion_tokens == 6
        return r.choices[0].finish_reason

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)), plain(client), plain(client))

    results = asyncio.run(main())
    assert all(results[:8])  # every stream produced text
    assert results[8:] == ["length", "length"]  # non-streaming async calls, served in the same batch


def test_response_format_json_schema_round_trip(client: openai.OpenAI, server: Live) -> None:
    schema = {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "sky", "schema": schema}}
    if server.engine == "transformers":
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=20, response_format=fmt)  # type: ignore[arg-type]
        assert err.value.body["param"] == "response_format"  # type: ignore[index]
        return
    r = client.chat.completions.create(
        model=server.model,
        messages=CHAT,
        max_tokens=40,
        temperature=0,
        response_format=fmt,  # type: ignore[arg-type]
    )
    content = r.choices[0].message.content or ""
    assert r.choices[0].finish_reason == "stop", content
    data = json.loads(content)
    assert data in ({"color": "red"}, {"color": "blue"})


def test_invocations_lmi_schema(server: Live) -> None:
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
    assert details["inputs"] == "The cat"
    assert all({"id", "text", "log_prob"} <= set(t) for t in details["tokens"])
    full = httpx.post(
        server.base + f"/predictions/{server.model}",
        json={"inputs": "The cat", "parameters": {"max_new_tokens": 6, "return_full_text": True}},
        timeout=60,
    )
    assert full.json()["generated_text"] == "The cat" + body["generated_text"]


def test_invocations_lmi_streaming_jsonlines(server: Live) -> None:
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
    assert lines[-1]["details"]["finish_reason"] in ("length", "eos_token")
    text = "".join(line["token"]["text"] for line in lines if not line["token"].get("special_token"))
    assert text == lines[-1]["generated_text"]


def test_lmi_details_top_tokens_prefill_and_best_of(server: Live) -> None:
    if server.engine == "transformers":
        for name, value in (("top_n_tokens", 2), ("decoder_input_details", True)):
            body = {"inputs": "The cat", "parameters": {"details": True, name: value}}
            r = httpx.post(server.base + "/invocations", json=body, timeout=60)
            assert r.status_code == 400, r.text
            assert r.json()["param"] == f"parameters.{name}"
        return
    params = {"max_new_tokens": 4, "details": True, "top_n_tokens": 2, "decoder_input_details": True}
    r = httpx.post(server.base + "/invocations", json={"inputs": "The cat sat", "parameters": params}, timeout=60)
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    assert len(details["top_tokens"]) == len(details["tokens"])
    assert all(1 <= len(top) <= 2 for top in details["top_tokens"])
    assert details["prefill"][0]["log_prob"] is None  # nothing precedes the first prompt token
    assert all(isinstance(p["log_prob"], float) for p in details["prefill"][1:])
    assert len(details["prefill"]) == details["input_length"]
    sampled = {"max_new_tokens": 4, "details": True, "do_sample": True, "n": 3, "seed": 1}
    best = httpx.post(server.base + "/invocations", json={"inputs": "The cat", "parameters": sampled}, timeout=60)
    seqs = best.json()["details"]["best_of_sequences"]
    assert len(seqs) == 2
    assert all({"generated_text", "finish_reason", "generated_tokens", "tokens"} <= set(s) for s in seqs)


def test_invocations_routes_openai_bodies(server: Live) -> None:
    chat = httpx.post(server.base + "/invocations", json={"messages": CHAT, "max_tokens": 4}, timeout=60)
    assert chat.json()["object"] == "chat.completion"
    cmpl = httpx.post(server.base + "/invocations", json={"prompt": "A", "max_tokens": 4}, timeout=60)
    assert cmpl.json()["object"] == "text_completion"


BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10**6}, 400, "maximum context length"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 0}, 400, '"param":"n"'),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "stream_options": "yes"}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "hi"}]}, 400, "role"),  # any role name, as vLLM
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-9"}, 404, "gpt-9"),
    ("/v1/completions", {"prompt": "word " * 5000, "max_tokens": 1}, 400, "maximum context length"),
    ("/v1/completions", {"prompt": [10**7]}, 400, "token ids"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("/invocations", {"inputs": 42}, 400, "inputs"),
    ("/invocations", {"inputs": ""}, 400, "inputs"),
    ("/invocations", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 400, "max_new_tokens"),
    ("/invocations", {"inputs": "x", "parameters": {"top_p": 2}}, 400, "top_p"),
    ("/invocations", {"inputs": "x", "parameters": {"stop_sequences": 5}}, 400, "stop_sequences"),
    ("/invocations", {"inputs": "x", "parameters": {"frobnicate": 1}}, 400, "frobnicate"),
    ("/invocations", {"inputs": "x", "parameters": {"decoder_input_details": True}, "stream": True}, 400, "stream"),
    ("/invocations", {"inputs": "x " * 5000}, 400, "maximum context length"),
    ("/invocations", {"hello": "world"}, 400, "cannot tell the request schema"),
    ("/invocations", ["inputs"], 400, "JSON object"),
    ("/predictions/other-model", {"inputs": "x"}, 404, "other-model"),
    ("/v1/nope", {}, 404, "no route"),
]


@pytest.mark.parametrize(("path", "body", "status", "needle"), BAD_REQUESTS)
def test_bad_requests_get_4xx_naming_the_problem(
    server: Live, path: str, body: object, status: int, needle: str
) -> None:
    r = httpx.post(server.base + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_wrong_method_and_malformed_json_are_4xx(server: Live) -> None:
    for path in ("/v1/chat/completions", "/invocations"):
        r = httpx.post(server.base + path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
    r = httpx.get(server.base + "/v1/chat/completions")
    assert r.status_code == 405, r.text
    assert "not allowed" in r.json()["error"]["message"]


def test_openai_client_raises_typed_errors(client: openai.OpenAI, server: Live) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=server.model, messages=CHAT, temperature=-3)
    assert err.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)


def test_metrics_count_requests_latency_and_tokens(client: openai.OpenAI, server: Live) -> None:
    before = metrics(server.base)
    r = client.completions.create(model=server.model, prompt="The cat", max_tokens=5, temperature=0)
    after = metrics(server.base)
    key = 'kiln_requests_total{route="/v1/completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["kiln_time_to_first_token_seconds_count"] == before["kiln_time_to_first_token_seconds_count"] + 1
    assert after["kiln_e2e_request_latency_seconds_count"] == before["kiln_e2e_request_latency_seconds_count"] + 1
    assert r.usage is not None
    generated = after["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"]
    assert generated == r.usage.completion_tokens
    assert after["kiln_prompt_tokens_total"] - before["kiln_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["kiln_inter_token_latency_seconds_count"] > before["kiln_inter_token_latency_seconds_count"]
    assert after["kiln_engine_requests_running"] == 0
    if 503 in server.srv.ping_codes:  # the load-time probes are counted too
        assert after['kiln_requests_total{route="/ping",status="503"}'] >= server.srv.ping_codes.count(503)
    if server.engine == "vllm":
        assert any(k.startswith("vllm:num_requests_running") for k in after)  # vLLM's own series beside kiln's


def test_openapi_describes_the_request_schemas(server: Live) -> None:
    doc = httpx.get(server.base + "/openapi.json", timeout=30).json()
    body = doc["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = [x["$ref"].rsplit("/", 1)[1] for x in body["oneOf"]]
    assert refs == ["ChatCompletionRequest", "CompletionRequest", "LmiRequest"]
    schemas = doc["components"]["schemas"]
    assert set(refs) <= set(schemas)
    assert schemas["LmiParameters"]["properties"]["max_new_tokens"]["minimum"] == 1
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert "400" in chat["responses"]
    assert "422" not in chat["responses"]  # invalid bodies are 400s naming the field


def test_client_disconnect_aborts_the_engine_request(server: Live) -> None:
    before = engine_tokens(server.base)
    body = {"prompt": "The cat", "max_tokens": 1900, "ignore_eos": True, "temperature": 0, "stream": True}
    streams = 2
    with httpx.Client(base_url=server.base, timeout=60) as c:
        for _ in range(streams):
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert [next(lines) for _ in range(3)]  # generating; leaving the block closes the connection
    wait_engine_idle(server.base)
    # A non-streaming request whose client gives up is aborted too. The client leaves as soon as the server holds
    # the request (not after a fixed time: a fast machine generates the 1900 tokens in a fraction of a second).
    # An answer before the poll saw the request (a machine far faster than the poll) is a try lost, not a failure.
    url = httpx.URL(server.base)
    payload = json.dumps({**body, "stream": False}).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    early = []
    for _ in range(3):
        with socket.create_connection((url.host, url.port or 80), timeout=60) as sock:
            sock.sendall(head.encode() + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            answer = leave_once_admitted(server.base, sock)
        wait_engine_idle(server.base)
        if not answer:
            break
        early.append(answer)
    else:
        pytest.fail(f"every try was answered before the client could leave: {early}")
    if server.engine == "vllm":  # the engine itself stopped: it generated far fewer tokens than were asked for
        assert engine_tokens(server.base) - before < 0.5 * (streams + 1 + len(early)) * 1900


def engine_tokens(base: str) -> float:
    """vLLM's own count of generated tokens (its engine core's, not kiln's)."""
    return sum(v for k, v in metrics(base).items() if k.startswith("vllm:generation_tokens_total"))


def test_tampered_artifact_is_refused_naming_the_file(tiny_uri: str, tmp_path: Path) -> None:
    d = tmp_path / "art"
    assert run_cli("artifacts", "pull", tiny_uri, str(d)).returncode == 0
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(4096)
        f.write(b"\x00\x01\x02\x03")
    proc = run_cli("runtime", "serve", str(d), "--port", "1", timeout=120)
    assert proc.returncode == EX_CONFIG
    assert "model.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_target_is_refused_naming_the_field(tiny_uri: str, tmp_path: Path) -> None:
    neuron = build("target.engine=neuron", "model.name=tiny-neuron")
    proc = run_cli("runtime", "serve", neuron, "--port", "1", timeout=120)
    assert proc.returncode == EX_CONFIG
    assert "target.engine" in proc.stderr
    d = tmp_path / "art"
    assert run_cli("artifacts", "pull", tiny_uri, str(d)).returncode == 0
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["target"]["devices"] = ["cuda"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("runtime", "serve", str(d), "--port", "1", timeout=120)
    assert proc.returncode == EX_CONFIG
    assert "target.devices" in proc.stderr
    shutil.rmtree(d)

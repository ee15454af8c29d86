"""The OpenAI routes' wire format as real clients read it (issue 10), on the fake engine: prompt scoring with
``echo`` + ``logprobs`` (lm-evaluation-harness), finite logprobs, one stream chunk per engine step, the role chunk
with the first token (TTFT-measuring clients), tools refused rather than ignored, model cards with ``root``,
``max_tokens`` clamped to the room left. The same against bare vLLM: tests/test_differential.py."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import FakeServer, fake_server

pytestmark = pytest.mark.unit
PROMPT = "The cat sat on the mat"
CHAT = [{"role": "user", "content": "Tell me a story."}]
CONTEXT = 64  # the fake engine's context length here (max_model_len_cap)


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[FakeServer]:
    with fake_server(tiny_dir, "max_model_len_cap=64") as srv:
        yield srv


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_dir))


def post(srv: FakeServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.base + path, json=body, timeout=30)


def events(srv: FakeServer, path: str, body: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """The stream's JSON chunks with their arrival times (seconds after the request was sent)."""
    out = []
    start = time.perf_counter()
    with httpx.stream("POST", srv.base + path, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append((time.perf_counter() - start, json.loads(line[6:])))
    return out


# -- 1. echo + logprobs scores the prompt ---------------------------------------------------------------------------
def test_echo_logprobs_cover_the_prompt_then_the_completion(server: FakeServer, tok: Any) -> None:
    prompt_ids = tok(PROMPT)["input_ids"]
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt_ids) + 3
    assert lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert lp["tokens"][: len(prompt_ids)] == [tok.decode([t]) for t in prompt_ids]
    assert choice["text"] == PROMPT + choice["text"][len(PROMPT) :]
    assert choice["text"].startswith(PROMPT)
    offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["text_offset"] == offsets
    assert all(len(top) >= 1 for top in lp["top_logprobs"][1:])
    assert len(choice["prompt_logprobs"]) == len(prompt_ids)
    assert choice["prompt_logprobs"][0] is None


def test_max_tokens_0_with_echo_scores_the_prompt_only(server: FakeServer, tok: Any) -> None:
    prompt_ids = tok(PROMPT)["input_ids"]
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == PROMPT
    assert len(choice["logprobs"]["token_logprobs"]) == len(prompt_ids)
    refused = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "max_tokens"


def test_echo_logprobs_streamed_start_with_the_prompt(server: FakeServer, tok: Any) -> None:
    n_prompt = len(tok(PROMPT)["input_ids"])
    chunks = [
        c
        for _, c in events(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "echo": True, "logprobs": 0})
    ]
    first = chunks[0]["choices"][0]
    assert first["text"].startswith(PROMPT)
    assert len(first["logprobs"]["tokens"]) == n_prompt + 1
    assert first["logprobs"]["token_logprobs"][0] is None
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    texts = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert offsets == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]  # one running offset


def test_lm_eval_style_scoring_sums_the_continuation(server: FakeServer, tok: Any) -> None:
    """What lm-eval's loglikelihood does: echo context + continuation, sum the continuation's token logprobs."""
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="x")
    context, continuation = "The cat", " sat on the mat"
    r = client.completions.create(
        model="tiny-llama", prompt=context + continuation, max_tokens=0, echo=True, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert lp is not None
    assert lp.token_logprobs is not None
    assert lp.text_offset is not None
    start = next(i for i, off in enumerate(lp.text_offset) if off >= len(context))
    score = sum(x for x in lp.token_logprobs[start:] if x is not None)
    assert score < 0
    assert len(lp.token_logprobs[start:]) == len(tok(continuation, add_special_tokens=False)["input_ids"])


# -- 2. logprobs JSON can carry ---------------------------------------------------------------------------------------
def test_minus_infinity_and_nan_logprobs_are_clamped_not_500(server: FakeServer) -> None:
    body = {"prompt": "[masked] " + PROMPT, "max_tokens": 4, "logprobs": 3, "echo": True}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert "Infinity" not in r.text
    assert "NaN" not in r.text
    tops = [v for top in r.json()["choices"][0]["logprobs"]["top_logprobs"] if top for v in top.values()]
    assert -9999.0 in tops
    assert all(math.isfinite(v) for v in tops)
    chat = post(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "[masked]"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 3},
    )
    assert chat.status_code == 200, chat.text
    assert -9999.0 in [
        a["logprob"] for t in chat.json()["choices"][0]["logprobs"]["content"] for a in t["top_logprobs"]
    ]
    with httpx.stream("POST", server.base + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        raw = s.read().decode()
    assert "Infinity" not in raw
    assert "NaN" not in raw
    assert "-9999.0" in raw
    for line in raw.splitlines():
        if line.startswith("data: {"):
            json.loads(line[6:])  # strict JSON


# -- 3. one chunk per token, empty text included ----------------------------------------------------------------------
def test_stream_sends_every_token_even_with_empty_text(server: FakeServer) -> None:
    body = {"prompt": "[utf8] snowmen", "max_tokens": 12, "logprobs": 0, "ignore_eos": True}
    chunks = [c["choices"][0] for _, c in events(server, "/v1/completions", body)]
    assert len(chunks) == 12
    assert any(c["text"] == "" for c in chunks), "the prompt must make the fake engine emit partial characters"
    assert sum(len(c["logprobs"]["tokens"]) for c in chunks) == 12
    full = post(server, "/v1/completions", body).json()["choices"][0]
    assert "".join(c["text"] for c in chunks) == full["text"]


def test_chat_stream_sends_every_token_and_per_choice_usage(server: FakeServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "[utf8]"}],
        "max_tokens": 6,
        "n": 2,
        "temperature": 1.0,
        "seed": 3,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks = [c for _, c in events(server, "/v1/chat/completions", body)]
    content = [c for c in chunks if c["choices"] and "role" not in c["choices"][0]["delta"]]
    assert len(content) == 12
    assert all(len(c["choices"]) == 1 for c in content)
    for i in range(2):
        mine = [c for c in content if c["choices"][0]["index"] == i]
        assert [c["usage"]["completion_tokens"] for c in mine] == list(range(1, 7))
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 12


# -- 4. the role goes with the first token ----------------------------------------------------------------------------
def test_chat_role_chunk_arrives_with_the_first_token_not_before_prefill(server: FakeServer) -> None:
    body = {"messages": [{"role": "user", "content": "[slow]"}], "max_tokens": 3}
    timed = events(server, "/v1/chat/completions", body)
    (t_role, role), (t_first, first) = timed[0], timed[1]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert t_role >= 0.15, "the role chunk left before the engine's first step (0.2 s here)"
    assert t_first - t_role < 0.1
    assert "content" in first["choices"][0]["delta"]


# -- 5. tools are refused, never ignored -----------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize(
    "choice",
    [None, "auto", "required", {"type": "function", "function": {"name": "weather"}}],
    ids=["absent", "auto", "required", "named"],
)
def test_tool_choice_that_needs_a_parser_is_refused_naming_it(server: FakeServer, choice: Any) -> None:
    body: dict[str, Any] = {"messages": CHAT, "max_tokens": 2, "tools": TOOLS}
    if choice is not None:
        body["tool_choice"] = choice
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tool_choice"
    assert "tool" in err["message"]


def test_tool_choice_none_generates_text(server: FakeServer) -> None:
    r = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "tools": TOOLS, "tool_choice": "none"})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"]


# -- 6. model cards -----------------------------------------------------------------------------------------------
def test_model_card_has_root_parent_and_permission(server: FakeServer, tiny_dir: Path) -> None:
    card = httpx.get(server.base + "/v1/models", timeout=10).json()["data"][0]
    assert Path(card["root"]) == tiny_dir
    assert (Path(card["root"]) / "tokenizer.json").exists()
    assert card["parent"] is None
    assert card["permission"][0]["object"] == "model_permission"


# -- max_tokens as vLLM takes it -------------------------------------------------------------------------------------
def test_max_tokens_beyond_the_room_is_clamped_and_beyond_the_context_refused(server: FakeServer, tok: Any) -> None:
    n_prompt = len(tok(PROMPT)["input_ids"])
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": CONTEXT, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == CONTEXT - n_prompt
    assert r.json()["choices"][0]["finish_reason"] == "length"
    over = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": CONTEXT + 1})
    assert over.status_code == 400
    assert over.json()["error"]["param"] == "max_tokens"


def test_completions_default_to_16_tokens(server: FakeServer) -> None:
    r = post(server, "/v1/completions", {"prompt": PROMPT, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 16


# -- several prompts stream side by side -----------------------------------------------------------------------------
def test_a_prompt_list_streams_concurrently(server: FakeServer) -> None:
    body = {"prompt": ["[slow] one", "two"], "max_tokens": 4, "ignore_eos": True}
    order = [c["choices"][0]["index"] for _, c in events(server, "/v1/completions", body)]
    assert sorted(order) == [0] * 4 + [1] * 4
    assert order.index(1) < order.index(0) or order[-1] == 0, order  # the fast prompt does not wait for the slow one
    assert order[-1] == 0


def test_return_token_ids(server: FakeServer, tok: Any) -> None:
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "return_token_ids": True})
    choice = r.json()["choices"][0]
    assert choice["prompt_token_ids"] == tok(PROMPT)["input_ids"]
    assert tok.decode(choice["token_ids"]) == choice["text"]
    lp = post(
        server,
        "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 2, "logprobs": 0, "return_tokens_as_token_ids": True},
    )
    tokens = lp.json()["choices"][0]["logprobs"]["tokens"]
    assert all(t.startswith("token_id:") and t[9:].isdigit() for t in tokens)


def test_stream_options_without_stream_are_refused_as_vllm_does(server: FakeServer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "stream_options": {"include_usage": True}}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400
    assert "stream_options" in r.json()["error"]["message"]
    assert post(server, "/v1/completions", {**body, "stream_options": {}}).status_code == 200


# -- found by tests/test_differential.py against vLLM ---------------------------------------------------------------
def usage(srv: FakeServer, body: dict[str, Any], path: str = "/v1/chat/completions") -> dict[str, Any]:
    r = post(srv, path, {"max_tokens": 1, **body})
    assert r.status_code == 200, r.text
    return dict(r.json()["usage"])


def test_chat_renders_messages_as_vllm_does(server: FakeServer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    joined = [{"role": "user", "content": "one\ntwo"}]  # vLLM joins text parts with a newline
    assert usage(server, {"messages": parts})["prompt_tokens"] == usage(server, {"messages": joined})["prompt_tokens"]
    # This template knows no "developer" role: vLLM renders it as the system message.
    dev = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert usage(server, {"messages": dev})["prompt_tokens"] == usage(server, {"messages": system})["prompt_tokens"]
    assert post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}).status_code == 200


def test_reply_role_is_the_last_messages_without_a_generation_prompt(server: FakeServer) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "add_generation_prompt": False}
    assert post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["role"] == "user"
    first = events(server, "/v1/chat/completions", body)[0][1]
    assert first["choices"][0]["delta"]["role"] == "user"


def test_prompt_token_ids_go_up_to_the_models_vocabulary(server: FakeServer, tiny_dir: Path, tok: Any) -> None:
    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    assert vocab > len(tok)  # ids the tokenizer has no text for are still the model's
    ok = post(server, "/v1/completions", {"prompt": [0, len(tok), vocab - 1], "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    assert post(server, "/v1/completions", {"prompt": [vocab], "max_tokens": 1}).status_code == 400


def test_truncate_prompt_tokens_keeps_the_last_tokens(server: FakeServer, tok: Any) -> None:
    ids = tok(PROMPT)["input_ids"]
    body = {"prompt": PROMPT, "max_tokens": 1, "truncate_prompt_tokens": 3, "echo": True, "logprobs": 0}
    r = post(server, "/v1/completions", body)
    assert r.json()["usage"]["prompt_tokens"] == 3
    assert r.json()["choices"][0]["text"].startswith(PROMPT)  # echo repeats the prompt as sent, as vLLM does
    assert r.json()["choices"][0]["logprobs"]["tokens"][:3] == [tok.decode([t]) for t in ids[-3:]]  # what was scored


def test_chat_prompt_logprobs_and_refused_beam_search(server: FakeServer) -> None:
    body = {"messages": CHAT, "max_tokens": 1, "prompt_logprobs": 1}
    lps = post(server, "/v1/chat/completions", body).json()["prompt_logprobs"]
    assert lps[0] is None
    assert all(isinstance(e, dict) and e for e in lps[1:])
    beam = post(server, "/v1/completions", {"prompt": PROMPT, "use_beam_search": True})
    assert beam.status_code == 400
    assert beam.json()["error"]["param"] == "use_beam_search"


def test_echo_stream_sends_the_prompt_ids_once(server: FakeServer, tok: Any) -> None:
    chunks = [
        c["choices"][0] for _, c in events(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "echo": True})
    ]
    assert chunks[0]["prompt_token_ids"] == tok(PROMPT)["input_ids"]
    assert all(c.get("prompt_token_ids") is None for c in chunks[1:])

"""LMI's ``/invocations`` wire form with the fake engine (kiln's own behaviour, in seconds): the vLLM parameters LMI
passes through (``best_of`` ranked by cumulative logprob, ``num_beams``/``typical_p``/``watermark`` at their only
supported values, the guided/structured output constraints onto one SamplingSpec.structured), streamed token texts
adding up to ``generated_text`` when a stop sequence cuts a token, ``adapters`` answered 424 as LMI does, and
logprobs that are -inf or NaN clamped to -9999.0 (never ``-Infinity``/``NaN`` in JSON, never a 500).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FakeServer, fake_server

pytestmark = pytest.mark.unit
PROMPT = "The quick brown fox"
WIRE_MIN_LOGPROB = -9999.0  # vLLM's floor for a logprob on the wire (runtime/api/wire.py)
SAMPLED = {"do_sample": True, "temperature": 1.0, "seed": 11, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[FakeServer]:
    with fake_server(tiny_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def tgi(tiny_dir: Path) -> Iterator[FakeServer]:
    with fake_server(tiny_dir, env={"OPTION_TGI_COMPAT": "true"}) as srv:
        yield srv


def _no_constant(name: str) -> float:
    raise AssertionError(f"non-standard JSON constant {name} on the wire")


def strict_json(text: str) -> Any:
    """JSON as a strict client reads it: -Infinity, Infinity and NaN are refused."""
    return json.loads(text, parse_constant=_no_constant)


def invoke(srv: FakeServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.base + "/invocations", json=body, timeout=30)


def lines(srv: FakeServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", srv.base + "/invocations", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        raw = [line.removeprefix("data:").strip() for line in r.iter_lines() if line.strip()]
    return [strict_json(line) for line in raw]


def cumulative(seq: dict[str, Any]) -> float:
    return sum(t["log_prob"] for t in seq["tokens"])


def refused(r: httpx.Response, status: int, param: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == status, body
    assert body.get("param") == param, body
    for leak in ("keyword argument", "SamplingParams", "StructuredOutputsParams"):
        assert leak not in body["error"], body
    return body


# -- best_of, num_beams, typical_p, watermark ----------------------------------------------------------------------


def test_best_of_returns_the_likeliest_sequence_and_the_others_ranked(server: FakeServer) -> None:
    # The same seed with n=3 gives the same three sequences unranked (the fake engine is deterministic): rank them
    # here from their own token logprobs.
    plain = invoke(server, {"inputs": PROMPT, "parameters": {**SAMPLED, "n": 3, "details": True}})
    assert plain.status_code == 200, plain.text
    d = plain.json()["details"]
    seqs = [{"generated_text": plain.json()["generated_text"], "tokens": d["tokens"]}, *d["best_of_sequences"]]
    assert len({cumulative(s) for s in seqs}) == 3, "the sequences must differ in likelihood for this test to mean much"
    ranked = sorted(seqs, key=cumulative, reverse=True)
    assert ranked[0] is not seqs[0], "the likeliest must not be the first sequence already"

    r = invoke(server, {"inputs": PROMPT, "parameters": {**SAMPLED, "best_of": 3, "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generated_text"] == ranked[0]["generated_text"]
    assert body["details"]["tokens"] == ranked[0]["tokens"]
    others = body["details"]["best_of_sequences"]
    assert [s["generated_text"] for s in others] == [s["generated_text"] for s in ranked[1:]]
    assert [cumulative(s) for s in others] == sorted((cumulative(s) for s in others), reverse=True)
    assert server.engine.last_spec.n == 3

    bare = invoke(server, {"inputs": PROMPT, "parameters": {**SAMPLED, "best_of": 3}})
    assert bare.status_code == 200, bare.text
    assert bare.json() == {"generated_text": ranked[0]["generated_text"]}  # no details asked: the best one only


def test_best_of_refusals_name_best_of(server: FakeServer) -> None:
    refused(
        invoke(server, {"inputs": PROMPT, "parameters": {**SAMPLED, "n": 3, "best_of": 2}}), 400, "parameters.best_of"
    )
    greedy = {"inputs": PROMPT, "parameters": {"best_of": 2, "max_new_tokens": 4}}
    refused(invoke(server, greedy), 400, "parameters.best_of")
    r = httpx.post(server.base + "/invocations", json={**greedy, "stream": True}, timeout=30)
    assert r.status_code == 400, r.text
    assert "best_of" in r.json()["error"], r.text
    one = invoke(server, {"inputs": PROMPT, "parameters": {"best_of": 1, "max_new_tokens": 4}})
    assert one.status_code == 200, one.text


@pytest.mark.parametrize(
    ("key", "ok", "bad", "says"),
    [
        ("num_beams", 1, 4, "beam search is not supported"),
        ("typical_p", 1.0, 0.9, "typical_p"),
        ("watermark", False, True, "watermark"),
    ],
)
def test_unsupported_decoding_is_refused_naming_it(server: FakeServer, key: str, ok: Any, bad: Any, says: str) -> None:
    base = {"max_new_tokens": 4}
    good = invoke(server, {"inputs": PROMPT, "parameters": {**base, key: ok}})
    assert good.status_code == 200, good.text
    assert good.json()["generated_text"]
    body = refused(invoke(server, {"inputs": PROMPT, "parameters": {**base, key: bad}}), 400, f"parameters.{key}")
    assert says in body["error"]


# -- structured output ---------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("params", "structured"),
    [
        ({"guided_json": SCHEMA}, {"json": SCHEMA}),
        ({"guided_json": json.dumps(SCHEMA)}, {"json": SCHEMA}),
        ({"guided_regex": "[a-z]+"}, {"regex": "[a-z]+"}),
        ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
        ({"guided_grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
        ({"response_format": {"type": "json_object"}}, {"json_object": True}),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, {"json": SCHEMA}),
        ({"response_format": {"type": "text"}}, None),
        (
            {"structured_outputs": {"regex": "[0-9]+", "disable_any_whitespace": True}},
            {"regex": "[0-9]+", "disable_any_whitespace": True},
        ),
        (  # options join the constraint given elsewhere
            {"guided_json": SCHEMA, "structured_outputs": {"disable_any_whitespace": True}},
            {"json": SCHEMA, "disable_any_whitespace": True},
        ),
    ],
)
def test_structured_output_parameters_reach_the_engine_as_one_constraint(
    server: FakeServer, params: dict[str, Any], structured: dict[str, Any] | None
) -> None:
    r = invoke(server, {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, **params}})
    assert r.status_code == 200, r.text
    spec = server.engine.last_spec
    assert spec.structured == structured
    assert not spec.extra  # nothing of it left for the engine's pass-through


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"guided_json": SCHEMA, "guided_regex": "a+"}, "parameters.guided_regex"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "parameters.response_format"),
        ({"guided_json": SCHEMA, "structured_outputs": {"regex": "a+"}}, "parameters.structured_outputs"),
        ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "parameters.structured_outputs"),
        ({"structured_outputs": {"disable_any_whitespace": True}}, "parameters.structured_outputs"),
        ({"structured_outputs": {"regexp": "a+"}}, "parameters.structured_outputs.regexp"),
        ({"guided_json": "{not json"}, "parameters.guided_json"),
        ({"response_format": {"type": "json_schema"}}, "parameters.response_format"),
    ],
)
def test_conflicting_or_malformed_constraints_are_refused_naming_the_parameter(
    server: FakeServer, params: dict[str, Any], param: str
) -> None:
    refused(invoke(server, {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, **params}}), 400, param)


# -- streamed token texts add up to generated_text -----------------------------------------------------------------


def _stop_inside_a_token(server: FakeServer, prompt: str) -> tuple[str, str]:
    """From an unconstrained generation: a stop string starting inside a later token (so that token's text is cut),
    and the text a stop there leaves."""
    r = invoke(server, {"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True}})
    assert r.status_code == 200, r.text
    text, tokens = r.json()["generated_text"], r.json()["details"]["tokens"]
    offset = 0
    for i, tok in enumerate(tokens):
        if i >= 2 and len(tok["text"]) >= 3 and text[offset : offset + len(tok["text"])] == tok["text"]:
            stop = text[offset + 1 : offset + 3]
            if text.find(stop) == offset + 1:
                return stop, text[: offset + 1]
        offset += len(tok["text"])
    raise AssertionError(f"no usable stop string in {text!r}")


def test_streamed_token_texts_add_up_to_generated_text_with_a_stop(server: FakeServer) -> None:
    stop, expected = _stop_inside_a_token(server, PROMPT)
    params = {"max_new_tokens": 12, "stop_sequences": [stop]}
    events = lines(server, {"inputs": PROMPT, "parameters": params})
    final = events[-1]
    assert final["generated_text"] == expected
    assert final["details"]["finish_reason"] == "stop_sequence"
    assert "".join(e["token"]["text"] for e in events) == expected
    assert stop not in "".join(e["token"]["text"] for e in events)
    # Non-streaming: the same text; details.tokens keep each generated token's decoded text (as vLLM's logprobs
    # report them), the cut one included, and the count matches.
    r = invoke(server, {"inputs": PROMPT, "parameters": {**params, "details": True}})
    assert r.json()["generated_text"] == expected
    assert [t["id"] for t in r.json()["details"]["tokens"]] == [e["token"]["id"] for e in events]


def test_streamed_token_texts_add_up_across_split_utf8_characters(server: FakeServer) -> None:
    # [utf8]: the fake engine generates the byte tokens of multi-byte characters: a token ending inside a character
    # adds nothing (its own decoded text is a replacement character), the one completing it adds the character.
    events = lines(server, {"inputs": "[utf8] " + PROMPT, "parameters": {"max_new_tokens": 9}})
    texts = [e["token"]["text"] for e in events]
    assert "".join(texts) == events[-1]["generated_text"]
    assert "\ufffd" not in "".join(texts)
    assert "" in texts  # some token ended inside a character
    assert any(len(t) == 1 and ord(t) > 127 for t in texts)  # and a later one completed it


def test_tgi_stream_token_texts_add_up_too(server: FakeServer, tgi: FakeServer) -> None:
    stop, expected = _stop_inside_a_token(server, PROMPT)
    events = lines(tgi, {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "stop_sequences": [stop]}})
    assert events[-1]["generated_text"] == expected
    assert "".join(e["token"]["text"] for e in events) == expected


# -- adapters --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"inputs": PROMPT, "adapters": "my-lora"}, "adapters"),
        ({"inputs": PROMPT, "adapters": ["my-lora"]}, "adapters"),
        ({"inputs": PROMPT, "parameters": {"adapters": "my-lora"}}, "parameters.adapters"),
        ({"inputs": PROMPT, "adapters": "my-lora", "stream": True}, "adapters"),
    ],
)
def test_an_adapter_is_refused_with_424_as_lmi_does(server: FakeServer, body: dict[str, Any], param: str) -> None:
    before = server.engine.requests
    out = refused(invoke(server, body), 424, param)
    assert "my-lora" in out["error"], out
    assert "no LoRA adapters" in out["error"], out
    assert server.engine.requests == before  # refused before the engine saw it


def test_the_empty_adapter_is_the_base_model(server: FakeServer) -> None:
    r = invoke(server, {"inputs": PROMPT, "adapters": "", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"]


# -- logprobs that are -inf or NaN ---------------------------------------------------------------------------------


def test_wire_logprob_clamps_as_vllm() -> None:
    from runtime.api import wire
    from runtime.api.wire import wire_logprob

    assert wire.WIRE_MIN_LOGPROB == WIRE_MIN_LOGPROB
    assert wire_logprob(None) is None
    assert wire_logprob(-0.5) == -0.5
    assert wire_logprob(float("-inf")) == WIRE_MIN_LOGPROB == -9999.0
    assert wire_logprob(float("nan")) == WIRE_MIN_LOGPROB
    assert wire_logprob(-1e6) == WIRE_MIN_LOGPROB


def test_masked_logprobs_are_clamped_not_infinite(server: FakeServer) -> None:
    params = {"max_new_tokens": 4, "details": True, "top_n_tokens": 3, "decoder_input_details": True}
    r = invoke(server, {"inputs": "[masked] " + PROMPT, "parameters": params})
    assert r.status_code == 200, r.text
    d = strict_json(r.text)["details"]
    for top in d["top_tokens"]:
        assert [t["log_prob"] for t in top][1:] == [WIRE_MIN_LOGPROB, WIRE_MIN_LOGPROB]
        assert math.isfinite(top[0]["log_prob"])
        assert top[0]["log_prob"] > WIRE_MIN_LOGPROB
    assert d["prefill"][0]["log_prob"] is None  # the first prompt token has none
    assert len(d["prefill"]) > 2
    assert all(t["log_prob"] == WIRE_MIN_LOGPROB for t in d["prefill"][1:])
    events = lines(server, {"inputs": "[masked] " + PROMPT, "parameters": {"max_new_tokens": 4, "top_n_tokens": 3}})
    assert len(events) == 4
    assert all([t["log_prob"] for t in e["top_tokens"]][1:] == [WIRE_MIN_LOGPROB] * 2 for e in events)

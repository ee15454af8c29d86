"""The OpenAPI document (``/openapi.json``), made to match what the server does: clients and fuzzers generate from it.

FastAPI's document is the base. On top of it: the request schemas the SageMaker and tokenizer routes pick between
(they read their bodies themselves), every response with its real media type (Prometheus text, server-sent events,
JSON lines) and body (:mod:`runtime.api.responses`), both error shapes (OpenAI's, and LMI's for LMI-schema
requests), 405 with its ``Allow`` header, and the request constraints the server enforces beyond the pydantic
models' own: cross-field rules as JSON Schema ``if``/``then``, and limits that depend on the served model (vocabulary
size, ``max_model_len``) or on what its engine refuses (asked of the engine with probe sampling specs). Those last
ones are known once the model is loaded; the document is cached from then on.

Not expressible in JSON Schema, hence not declared: a prompt of ``max_model_len`` tokens or more (a 400 that depends on
the prompt's token count), and openai.py's ``continue_final_message`` needing the assistant's message last (no keyword
addresses an array's last item) and ``add_generation_prompt: false``; and ``stream_options`` without ``stream: true``
(refused as vLLM does). Those two would be one more cross-field rule each, and one more leaves schemathesis 4.32 unable
to generate chat and /invocations bodies. Request bodies are
validated strictly (runtime/server.py ``_parse``), so the JSON types declared here are the only ones accepted.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from runtime.adapters import NAME_RE
from runtime.api import responses as r
from runtime.api.embeddings import EmbeddingRequest
from runtime.api.protocol import ChatCompletionRequest, CompletionRequest, LmiRequest
from runtime.api.tokenize import TOKENIZE_SCHEMAS, DetokenizeRequest
from runtime.engines.base import STRUCTURED_CONSTRAINTS, EngineRequestError, SamplingSpec
from runtime.errors import APIError

SSE = "text/event-stream"
JSONLINES = "application/jsonlines"
REF = "#/components/schemas/"
SCHEMAS: dict[str, type[BaseModel]] = {
    "ChatCompletionRequest": ChatCompletionRequest,
    "CompletionRequest": CompletionRequest,
    "LmiRequest": LmiRequest,
    "EmbeddingRequest": EmbeddingRequest,
}
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    r.OpenAIError,
    r.LmiError,
    r.ChatCompletion,
    r.TextCompletion,
    r.ChatCompletionChunk,
    r.CompletionChunk,
    r.ModelList,
    r.TokenizeResponse,
    r.DetokenizeResponse,
    r.TokenizerInfoResponse,
    r.LmiResponse,
    r.LmiStreamLine,
    r.EmbeddingResponse,
    r.Health,
    r.AdapterInfo,
    r.AdapterList,
    r.AdapterStatus,
)
# Which key picks which schema on /invocations (server._invoke) and /tokenize (tokenize.tokenize_request).
INVOKE_KEYS = {"ChatCompletionRequest": "messages", "CompletionRequest": "prompt", "LmiRequest": "inputs"}
TOKENIZE_KEYS = {"TokenizeChatRequest": "messages", "TokenizeCompletionRequest": "prompt"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _exclusive(keys: dict[str, str]) -> list[dict[str, Any]]:
    """One schema per key, in order of precedence: a body with an earlier schema's key is never a later one's."""
    out: list[dict[str, Any]] = []
    earlier: list[str] = []
    for name, key in keys.items():
        item: dict[str, Any] = _ref(name)
        if earlier:
            item["not"] = {"anyOf": [{"required": [k]} for k in earlier]}
        out.append(item)
        earlier.append(key)
    return out


def union_body(keys: dict[str, str] | None = None) -> dict[str, Any]:
    """The request body of a route that reads the body itself and picks its schema by key."""
    return {"required": True, "content": {"application/json": {"schema": {"oneOf": _exclusive(keys or INVOKE_KEYS)}}}}


def body_doc(name: str, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` of a route that validates its body itself (strictly): the schema it validates against."""
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": _ref(name)}}}}


# The adapter management routes' JSON bodies (runtime/api/adapters.py reads them itself, so FastAPI knows none);
# build() adds them, and excludes the served model's name from the adapter names once it is known.
# SageMaker's query-parameter form of POST /adapters is accepted too, and left out: one documented form.
_NAME = {"type": "string", "pattern": NAME_RE.pattern, "description": "letters, digits, . _ - : /; at most 128"}
_SRC = {"type": "string", "minLength": 1, "description": "a directory under adapter_roots, or an adapter artifact URI"}
_PIN_WITHOUT_PRELOAD = {
    "properties": {"pin": {"const": True}, "preload": {"const": False}},
    "required": ["pin", "preload"],
}
ADAPTER_REQUESTS: dict[str, dict[str, Any]] = {
    "AdapterRegisterRequest": {
        "type": "object",
        "required": ["name", "src"],
        "properties": {
            "name": _NAME,
            "src": _SRC,
            "preload": {"type": "boolean", "default": True},
            "pin": {"type": "boolean", "default": False},
        },
        "not": _PIN_WITHOUT_PRELOAD,
    },
    "AdapterUpdateRequest": {
        "type": "object",
        "properties": {"src": _SRC, "preload": {"type": "boolean"}, "pin": {"type": "boolean"}},
        "not": _PIN_WITHOUT_PRELOAD,
    },
    "LoadLoRAAdapterRequest": {
        "type": "object",
        "required": ["lora_name", "lora_path"],
        "properties": {
            "lora_name": _NAME,  # kiln's rule for every adapter name (vLLM takes any string)
            "lora_path": _SRC,
            "load_inplace": {"type": "boolean", "default": False},
        },
    },
    "UnloadLoRAAdapterRequest": {
        "type": "object",
        "required": ["lora_name"],
        "properties": {"lora_name": {"type": "string", "minLength": 1}},
    },
}
# Each body's adapter-name field: it may not be the base model's name.
ADAPTER_NAMED_BY = {"AdapterRegisterRequest": "name", "LoadLoRAAdapterRequest": "lora_name"}


# -- responses --------------------------------------------------------------------------------------------------


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, lmi: bool) -> dict[str, Any]:
    schema = {"anyOf": [_ref("OpenAIError"), _ref("LmiError")]} if lmi else _ref("OpenAIError")
    return {"description": description, "content": _json(schema)}


ERROR_TEXT = {
    "400": "invalid request; `param` names the field",
    "404": "unknown model, or no such route",
    "408": "predict_timeout exceeded",
    "409": "an adapter of that name is already registered",
    "413": "the body is larger than max_request_size",
    "424": "the engine failed the request",
    "500": "internal error",
    "503": "not ready, or job_queue_size requests already in flight (then with Retry-After)",
}


def _errors(codes: Iterable[str], lmi: bool = False) -> dict[str, Any]:
    out = {code: _error(ERROR_TEXT[code], lmi) for code in codes}
    if "503" in out:
        out["503"]["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "at capacity"}}
    return out


GENERATION_ERRORS = ("400", "404", "408", "413", "424", "500", "503")


def _events(*data: str) -> dict[str, Any]:
    """Server-sent events (``schema`` is one event, as OpenAPI 3.1 reads it): each ``data`` one of these JSON bodies
    (an in-band error once the stream started), the last ``[DONE]`` on OpenAI streams."""
    body = {"anyOf": [_ref(name) for name in data]}
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "anyOf": [
                        {"const": "[DONE]"},
                        {"type": "string", "contentMediaType": "application/json", "contentSchema": body},
                    ]
                },
                "event": {"type": "string"},
                "id": {"type": "string"},
            },
        }
    }


def _responses() -> dict[tuple[str, str], dict[str, Any]]:
    chat = {
        "200": {
            "description": "chat.completion; with stream=true, server-sent chat.completion.chunk events, then [DONE]",
            "content": {**_json(_ref("ChatCompletion")), SSE: _events("ChatCompletionChunk", "OpenAIError")},
        },
        **_errors(GENERATION_ERRORS),
    }
    completion = {
        "200": {
            "description": "text_completion; with stream=true, server-sent text_completion events, then [DONE]",
            "content": {**_json(_ref("TextCompletion")), SSE: _events("CompletionChunk", "OpenAIError")},
        },
        **_errors(GENERATION_ERRORS),
    }
    lmi_body = {
        "anyOf": [
            _ref("ChatCompletion"),
            _ref("TextCompletion"),
            _ref("LmiResponse"),
            {"type": "array", "items": _ref("LmiResponse"), "description": "option.tgi_compat=true"},
            _ref("EmbeddingResponse"),
            {
                "type": "array",
                "items": {"type": "array", "items": {"type": "number"}},
                "description": "an embedding model's answer to LMI's inputs: one vector per input",
            },
        ]
    }
    invoke = {
        "200": {
            "description": "by the request's schema: chat.completion, text_completion or LMI's generated_text (an "
            "embedding model: OpenAI's embeddings list for 'input', a list of vectors for LMI's 'inputs'); "
            "streamed: server-sent events (OpenAI schemas; LMI with output_formatter=sse or tgi_compat) or one "
            "LMI JSON object per line",
            "content": {
                **_json(lmi_body),
                SSE: _events("ChatCompletionChunk", "CompletionChunk", "OpenAIError", "LmiStreamLine"),
                JSONLINES: {"schema": _ref("LmiStreamLine")},
            },
        },
        **_errors(GENERATION_ERRORS, lmi=True),
    }
    service = _errors(("500", "503"))
    return {
        **_adapter_responses(),
        ("/ping", "get"): {
            "200": {"description": "healthy", "content": _json(_ref("Health"))},
            "503": {"description": "loading, failed or dead", "content": _json(_ref("Health"))},
        },
        ("/metrics", "get"): {
            "200": {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
        ("/v1/models", "get"): {
            "200": {"description": "the served model", "content": _json(_ref("ModelList"))},
            **service,
        },
        ("/v1/chat/completions", "post"): chat,
        ("/v1/completions", "post"): completion,
        ("/v1/embeddings", "post"): {
            "200": {"description": "one embedding per input, in order", "content": _json(_ref("EmbeddingResponse"))},
            **_errors(GENERATION_ERRORS),
        },
        ("/invocations", "post"): invoke,
        ("/predictions/{model_name}", "post"): invoke,
        ("/tokenize", "post"): {
            "200": {"description": "the prompt's token ids", "content": _json(_ref("TokenizeResponse"))},
            **_errors(("400", "404", "500", "503")),
        },
        ("/detokenize", "post"): {
            "200": {"description": "the ids' text", "content": _json(_ref("DetokenizeResponse"))},
            **_errors(("400", "404", "500", "503")),
        },
        ("/tokenizer_info", "get"): {
            "200": {"description": "tokenizer_config.json", "content": _json(_ref("TokenizerInfoResponse"))},
            **service,
        },
    }


def _adapter_responses() -> dict[tuple[str, str], dict[str, Any]]:
    """runtime/api/adapters.py: LMI's error body there (errors name ``param``), OpenAI's on vLLM's two routes."""

    def ok(description: str, schema: str) -> dict[str, Any]:
        return {"200": {"description": description, "content": _json(_ref(schema))}}

    def text(description: str) -> dict[str, Any]:
        return {"200": {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}}

    register = {**ok("registered", "AdapterStatus"), **_errors(("400", "404", "409", "413", "500", "503"), lmi=True)}
    one = {"404": _error("no adapter (or model) of that name", lmi=True), **_errors(("500", "503"), lmi=True)}
    listed = {**ok("the registered adapters", "AdapterList"), **_errors(("404", "500", "503"), lmi=True)}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for prefix in ("", "/models/{model_name}"):
        out[(f"{prefix}/adapters", "post")] = register
        out[(f"{prefix}/adapters", "get")] = listed
        out[(f"{prefix}/adapters/{{name}}", "get")] = {**ok("the adapter", "AdapterInfo"), **one}
        out[(f"{prefix}/adapters/{{name}}", "delete")] = {**ok("unregistered", "AdapterStatus"), **one}
    out[("/models/{model_name}/adapters/{name}/update", "post")] = {
        **ok("updated (requests using the old one finish with it)", "AdapterStatus"),
        **_errors(("400", "404", "413", "500", "503"), lmi=True),
    }
    out[("/v1/load_lora_adapter", "post")] = {**text("Success: …"), **_errors(("400", "413", "500", "503"))}
    out[("/v1/unload_lora_adapter", "post")] = {**text("Success: …"), **_errors(("400", "404", "413", "500", "503"))}
    return out


_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
_CHAT_EXAMPLES = {
    "chat": {"value": {"messages": _CHAT, "max_tokens": 8}},
    "chat-stream": {
        "value": {"messages": _CHAT, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    },
}
_COMPLETION_EXAMPLES = {
    "completion": {"value": {"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 2}},
    "completion-stream": {"value": {"prompt": ["Once upon a time", "The cow"], "max_tokens": 8, "stream": True}},
}
_LMI_EXAMPLES = {
    "lmi": {"value": {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8, "details": True}}},
    "lmi-stream": {"value": {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8}, "stream": True}},
}
# Request examples: for clients, and for fuzzers' explicit-examples phase (streams included).
EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/chat/completions", "post"): _CHAT_EXAMPLES,
    ("/v1/completions", "post"): _COMPLETION_EXAMPLES,
    ("/invocations", "post"): {**_CHAT_EXAMPLES, **_COMPLETION_EXAMPLES, **_LMI_EXAMPLES},
    ("/predictions/{model_name}", "post"): {**_LMI_EXAMPLES, **_CHAT_EXAMPLES},
    ("/tokenize", "post"): {
        "prompt": {"value": {"prompt": "Hello world", "return_token_strs": True}},
        "chat": {"value": {"messages": _CHAT, "add_generation_prompt": True}},
    },
    ("/detokenize", "post"): {"tokens": {"value": {"tokens": [1, 2, 3]}}},
    ("/v1/embeddings", "post"): {"embed": {"value": {"input": ["a cat sits", "a kitten is sitting"]}}},
}

METHOD_NOT_ALLOWED = {
    "description": "method not allowed on this path",
    "headers": {"Allow": {"required": True, "schema": {"type": "string"}, "description": "the allowed methods"}},
    "content": _json(_ref("OpenAIError")),
}


# -- request constraints ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Live:
    """What the constraints need to know of the served model and its engine."""

    vocab: int  # prompt token ids: the model's vocabulary (config.json)
    tokenizer_vocab: int  # /detokenize: the ids the tokenizer can decode
    max_model_len: int
    empty_prompt_refused: bool  # the tokenizer adds nothing to "" (no BOS), so an empty text prompt is refused
    greedy_n_refused: bool  # the engine refuses n > 1 at temperature 0
    greedy_below: float  # ... and below this temperature (vLLM: 1e-5)
    empty_stop_refused: bool
    unknown_extra_refused: bool  # the engine refuses an LMI parameter it does not know
    default_temperature: float


def live_facts(svc: Any) -> Live:
    def refused(**kw: Any) -> bool:
        try:
            svc.engine.validate(SamplingSpec(max_tokens=1, **kw))
        except EngineRequestError:
            return True
        except Exception:
            return False
        return False

    try:
        svc.encode("")
        empty = False
    except APIError:
        empty = True
    greedy = refused(n=2, temperature=0.0)
    return Live(
        vocab=svc.vocab_size,
        tokenizer_vocab=len(svc.tokenizer),
        max_model_len=int(svc.engine.max_model_len),
        empty_prompt_refused=empty,
        greedy_n_refused=greedy,
        greedy_below=1e-5 if greedy and refused(n=2, temperature=1e-6) else 0.0,
        empty_stop_refused=refused(stop=("",)),
        unknown_extra_refused=refused(extra={"kiln_openapi_probe": 1}),
        default_temperature=float(svc.defaults.temperature),
    )


def _props(components: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(components.get(name, {}).get("properties", {}))


def _retype(schema: dict[str, Any], change: Callable[[dict[str, Any]], None], kind: str) -> None:
    """Apply ``change`` to the branch(es) of ``schema`` of JSON type ``kind`` (itself, or inside anyOf)."""
    if schema.get("type") == kind:
        change(schema)
    for branch in schema.get("anyOf", []):
        if branch.get("type") == kind:
            change(branch)


def _token_ids(items: dict[str, Any], live: Live | None, decodable: bool = False) -> None:
    items["minimum"] = 0
    if live is not None:
        items["maximum"] = (live.tokenizer_vocab if decodable else live.vocab) - 1


def _add_rule(schema: dict[str, Any], rule: dict[str, Any]) -> None:
    schema.setdefault("allOf", []).append(rule)


def _positive_temperature(live: Live) -> dict[str, Any]:
    key = "minimum" if live.greedy_below else "exclusiveMinimum"
    number = {"type": "number", key: live.greedy_below}
    return number if live.default_temperature <= live.greedy_below else {"anyOf": [number, {"type": "null"}]}


def _greedy_n_rule(live: Live, n_path: str = "n") -> dict[str, Any]:
    """vLLM (and the fake engine): n > 1 needs sampling; a missing temperature takes the model's default."""
    then: dict[str, Any] = {"properties": {"temperature": _positive_temperature(live)}}
    if live.default_temperature <= live.greedy_below:
        then["required"] = ["temperature"]
    return {"if": {"properties": {n_path: {"type": "integer", "minimum": 2}}, "required": [n_path]}, "then": then}


def _openai_rules(components: dict[str, Any], name: str, live: Live | None) -> None:
    schema = components.get(name)
    if schema is None:
        return
    props = schema.get("properties", {})
    if live is not None:
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                _retype(props[field], lambda s: s.__setitem__("maximum", live.max_model_len), "integer")
        if "truncate_prompt_tokens" in props:  # openai._truncated: one token of room stays for the output
            _retype(
                props["truncate_prompt_tokens"], lambda s: s.__setitem__("maximum", live.max_model_len - 1), "integer"
            )
        if live.greedy_n_refused and "n" in props:
            _add_rule(schema, _greedy_n_rule(live))
        if live.empty_stop_refused and "stop" in props:
            _retype(props["stop"], lambda s: s.__setitem__("minLength", 1), "string")
            _retype(props["stop"], lambda s: s.setdefault("items", {}).__setitem__("minLength", 1), "array")
    if "logit_bias" in props:  # keys are token ids (openai.openai_spec: int(key))
        _retype(
            props["logit_bias"],
            lambda s: s.__setitem__("propertyNames", {"pattern": r"^\s*[+-]?\d+(_\d+)*\s*$"}),
            "object",
        )
    if "use_beam_search" in props:  # protocol: beam search is refused
        props["use_beam_search"] = {**props["use_beam_search"], "const": False}
    if "response_format" in props and "structured_outputs" in props:
        # A response_format other than text excludes a structured_outputs constraint (openai._structured);
        # json_schema needing json_schema.schema is declared on ResponseFormat itself (constrain).
        _add_rule(
            schema,
            {
                "if": {"anyOf": [_response_format_is("json_schema"), _response_format_is("json_object")]},
                "then": {
                    "properties": {
                        "structured_outputs": {
                            "anyOf": [
                                {"type": "null"},
                                {
                                    "type": "object",
                                    "not": {"anyOf": [{"required": [k]} for k in STRUCTURED_CONSTRAINTS]},
                                },
                            ]
                        }
                    }
                },
            },
        )


def _response_format_is(kind: str) -> dict[str, Any]:
    return {
        "properties": {
            "response_format": {"type": "object", "properties": {"type": {"const": kind}}, "required": ["type"]}
        },
        "required": ["response_format"],
    }


def _chat_rules(components: dict[str, Any], live: Live | None) -> None:
    schema = components.get("ChatCompletionRequest")
    if schema is None:
        return
    props = schema.get("properties", {})
    if "top_logprobs" in props and "logprobs" in props:  # protocol: top_logprobs requires logprobs=true
        _add_rule(
            schema,
            {
                "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
                "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
            },
        )
    if "tools" in props and "tool_choice" in props:
        # openai._check_tools: tools are refused, never ignored. A tool_choice other than "none" is refused; so are
        # tools without tool_choice (that asks for "auto"), and an empty tools array.
        _retype(props["tools"], lambda s: s.__setitem__("minItems", 1), "array")
        props["tool_choice"] = {"anyOf": [{"const": "none"}, {"type": "null"}], "default": None}
        _add_rule(
            schema,
            {
                "if": {"properties": {"tools": {"type": "array"}}, "required": ["tools"]},
                "then": {"required": ["tool_choice"]},
            },
        )
    # continue_final_message's rules (add_generation_prompt false, the assistant's message last) are not declared:
    # one more rule in this schema leaves schemathesis 4.32 unable to generate chat bodies (tests/test_openapi.py).


def _completion_rules(components: dict[str, Any], live: Live | None) -> None:
    schema = components.get("CompletionRequest")
    if schema is None:
        return
    props = schema.get("properties", {})
    prompt = props.get("prompt", {})
    for branch in prompt.get("anyOf", [prompt]):
        if branch.get("type") == "string" and live is not None and live.empty_prompt_refused:
            branch["minLength"] = 1
        if branch.get("type") != "array":
            continue
        branch["minItems"] = 1  # protocol: an empty list is refused
        items = branch.setdefault("items", {})
        if items.get("type") == "integer":
            _token_ids(items, live)
        elif items.get("type") == "array":
            items["minItems"] = 1  # service.encode: an empty prompt is refused
            _token_ids(items.setdefault("items", {}), live)
        elif items.get("type") == "string" and live is not None and live.empty_prompt_refused:
            items["minLength"] = 1
    if "suffix" in props:  # protocol: suffix is not supported
        _retype(props["suffix"], lambda s: s.__setitem__("maxLength", 0), "string")


def _lmi_rules(components: dict[str, Any], live: Live | None) -> None:
    params = components.get("LmiParameters")
    request = components.get("LmiRequest")
    if params is None or request is None:
        return
    props = params.get("properties", {})
    if live is not None:
        if "max_new_tokens" in props:
            _retype(props["max_new_tokens"], lambda s: s.__setitem__("maximum", live.max_model_len), "integer")
        if live.unknown_extra_refused:
            # Keys beyond those named go to the engine, which refuses those it does not know.
            params["additionalProperties"] = False
        if live.empty_stop_refused:
            for field in ("stop_sequences", "stop"):
                if field in props:
                    _retype(props[field], lambda s: s.__setitem__("minLength", 1), "string")
                    _retype(props[field], lambda s: s.setdefault("items", {}).__setitem__("minLength", 1), "array")
        if live.greedy_n_refused and "n" in props:
            # lmi.prepare: sampling when do_sample=true, or do_sample unset and temperature > 0 (a missing
            # temperature then takes the model's default, or 1.0).
            positive = {"type": "number", "minimum" if live.greedy_below else "exclusiveMinimum": live.greedy_below}
            _add_rule(
                params,
                {
                    "if": {"properties": {"n": {"type": "integer", "minimum": 2}}, "required": ["n"]},
                    "then": {
                        "anyOf": [
                            {
                                "properties": {
                                    "do_sample": {"const": True},
                                    "temperature": {"anyOf": [positive, {"type": "null"}]},
                                },
                                "required": ["do_sample"],
                            },
                            {
                                "properties": {"do_sample": {"type": "null"}, "temperature": positive},
                                "required": ["temperature"],
                            },
                        ]
                    },
                },
            )
    # protocol: neither n > 1 nor decoder_input_details with stream=true
    _add_rule(
        request,
        {
            "if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
            "then": {
                "properties": {
                    "parameters": {
                        "properties": {"n": {"maximum": 1}, "decoder_input_details": {"const": False}},
                    }
                }
            },
        },
    )


def _tokenizer_rules(components: dict[str, Any], live: Live | None) -> None:
    chat = components.get("TokenizeChatRequest")
    if chat is not None:
        _add_rule(
            chat,
            {
                "if": {
                    "properties": {"continue_final_message": {"const": True}},
                    "required": ["continue_final_message"],
                },
                "then": {
                    "properties": {"add_generation_prompt": {"const": False}},
                    "required": ["add_generation_prompt"],
                },
            },
        )
    detok = components.get("DetokenizeRequest")
    if detok is not None and "tokens" in detok.get("properties", {}):
        _token_ids(detok["properties"]["tokens"].setdefault("items", {}), live, decodable=True)


def constrain(components: dict[str, Any], live: Live | None) -> None:
    """The request constraints beyond the pydantic models' (see the module docstring)."""
    if "ResponseFormat" in components:
        _add_rule(
            components["ResponseFormat"],
            {
                "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
                "then": {
                    "required": ["json_schema"],
                    "properties": {
                        "json_schema": {
                            "type": "object",
                            "required": ["schema"],
                            "properties": {"schema": {"type": "object"}},
                        }
                    },
                },
            },
        )
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        _openai_rules(components, name, live)
    _chat_rules(components, live)
    _completion_rules(components, live)
    _lmi_rules(components, live)
    _tokenizer_rules(components, live)


# -- the document ----------------------------------------------------------------------------------------------


def _add_models(components: dict[str, Any], models: Iterable[tuple[str, type[BaseModel]]], mode: str) -> None:
    for name, model in models:
        schema = model.model_json_schema(ref_template=REF + "{model}", mode=mode)  # type: ignore[arg-type]
        for sub, body in schema.pop("$defs", {}).items():
            components.setdefault(sub, body)
        components[name] = schema


def _adapter_requests(components: dict[str, Any], svc: Any | None) -> None:
    for name, schema in ADAPTER_REQUESTS.items():
        components[name] = copy.deepcopy(schema)
        if svc is not None and name in ADAPTER_NAMED_BY:  # the base model's name is refused as an adapter's
            field = components[name]["properties"][ADAPTER_NAMED_BY[name]]
            field["not"] = {"const": svc.served_name}


# The routes only one task's models answer (the others refuse with a 400 naming the task): left out of the document
# of a server whose model is for the other task.
TASK_PATHS = {"generate": ("/v1/chat/completions", "/v1/completions"), "embed": ("/v1/embeddings",)}


def build(app: FastAPI, svc: Any | None) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for task, paths in TASK_PATHS.items():
        if svc is not None and svc.task != task:
            for path in paths:
                doc.get("paths", {}).pop(path, None)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    requests: dict[str, type[BaseModel]] = {**SCHEMAS, **TOKENIZE_SCHEMAS, "DetokenizeRequest": DetokenizeRequest}
    _add_models(components, requests.items(), "validation")
    _add_models(components, ((m.__name__, m) for m in RESPONSE_MODELS), "serialization")
    if any(path.startswith("/adapters") for path in doc.get("paths", {})):
        _adapter_requests(components, svc)
    constrain(components, live_facts(svc) if svc is not None else None)
    declared = _responses()
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            # Invalid bodies are answered 400 with an error object naming the field, never FastAPI's 422.
            responses.pop("422", None)
            if (path, method) in declared:
                op["responses"] = copy.deepcopy(declared[(path, method)])
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None and (path, method) in EXAMPLES:
                body["examples"] = copy.deepcopy(EXAMPLES[(path, method)])
            for param in op.get("parameters", []):
                if param.get("name") == "model_name" and svc is not None:  # any other name is a 404
                    param["schema"]["enum"] = [svc.served_name]
            op["responses"]["405"] = copy.deepcopy(METHOD_NOT_ALLOWED)
    return doc


def install_openapi(app: FastAPI, service: Callable[[], Any | None]) -> None:
    """Serve :func:`build`'s document; ``service()`` is the loaded ModelService, or None while loading (the
    model-dependent limits are then left out, and the document is built again on the next request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            svc = service()
            doc = build(app, svc)
            if svc is None:
                return doc
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

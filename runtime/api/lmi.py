"""LMI's ``{"inputs", "parameters"}`` schema: sampling parameters in, LMI (or TGI-compatible) responses out.

Non-streaming: ``{"generated_text", "details": {finish_reason, generated_tokens, inputs, input_length, seed, tokens,
top_tokens?, prefill?, best_of_sequences?}}`` (``details`` with ``parameters.details``). Streaming: one JSON object
per token, ``{"token": {id, text, log_prob}}``, the last line also carrying ``generated_text`` and ``details``; as
jsonlines by default, as SSE with ``option.output_formatter=sse``. ``option.tgi_compat=true`` gives TGI's forms: the
response wrapped in an array with details included, SSE streaming, tokens as ``{id, text, logprob, special}``.
Errors after the stream started arrive in-band as a final ``finish_reason: "error"`` token line.

The vLLM parameters LMI passes through: ``best_of`` generates that many sequences and answers the likeliest (highest
cumulative logprob), the others in ``best_of_sequences``, likeliest first; ``num_beams``, ``typical_p`` and
``watermark`` are accepted at their only supported values (1, 1.0, false); ``guided_json``/``guided_regex``/
``guided_choice``/``guided_grammar``, ``response_format`` and ``structured_outputs`` become one structured output
constraint (more than one: 400 naming the parameter). ``adapters`` (beside ``inputs`` or in ``parameters``) names a
LoRA adapter: none are loaded, so a non-empty one is answered 424 as LMI answers an unknown adapter. A streamed
token's ``text`` is the text it added to ``generated_text`` (the lines add up to it, also when a stop string cuts a
token); ``details.tokens`` keep each token's decoded text, as vLLM's logprobs report them. Logprobs that are -inf or
NaN are written as -9999.0 (runtime/api/wire.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

from runtime.api.protocol import LmiParameters, LmiRequest
from runtime.api.wire import wire_logprob
from runtime.engines.base import STRUCTURED_CONSTRAINTS, AdapterRef, SamplingSpec, SeqDelta, TokenInfo
from runtime.errors import APIError
from runtime.service import Generation, ModelService

log = logging.getLogger("kiln.runtime")
FINISH = {"length": "length", "stop": "eos_token", "abort": "error", "error": "error"}
SSE = "text/event-stream"
JSONLINES = "application/jsonlines"
# vLLM's structured output options (StructuredOutputsParams), beside its constraints (STRUCTURED_CONSTRAINTS).
STRUCTURED_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def prepare(svc: ModelService, req: LmiRequest) -> tuple[list[int], SamplingSpec]:
    svc.require("generate")
    p = req.parameters
    adapter = _adapter(svc, req)
    _check_supported(req)
    structured, structured_param = _structured(p)
    ids = svc.encode(req.inputs, param="inputs")
    if p.truncate is not None:
        ids = ids[-p.truncate :]
    max_tokens = svc.budget(ids, p.max_new_tokens, "parameters.max_new_tokens")
    sampling = p.do_sample is True or (p.do_sample is None and (p.temperature or 0) > 0)
    ranked = (p.best_of or 1) > 1  # best_of ranks its sequences by their logprobs
    want_lp = p.details or req.stream or p.top_n_tokens is not None or svc.options.tgi_compat or ranked
    temperature = p.temperature if p.temperature is not None else (svc.defaults.temperature or 1.0)
    spec = SamplingSpec(
        max_tokens=max_tokens,
        seed=p.seed,
        stop=p.stop_strings(),
        temperature=temperature if sampling else 0.0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        top_k=max(p.top_k or 0, 0),
        repetition_penalty=p.repetition_penalty or 1.0,
        logprobs=(p.top_n_tokens or 0) if want_lp else None,
        prompt_logprobs=0 if p.decoder_input_details else None,
        ignore_eos=bool(p.ignore_eos_token),
        n=p.best_of if p.best_of is not None else p.n,
        min_p=p.min_p or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        min_tokens=p.min_tokens or 0,
        stop_token_ids=tuple(p.stop_token_ids or ()),
        include_stop_str_in_output=bool(p.include_stop_str_in_output),
        skip_special_tokens=p.skip_special_tokens is not False,
        structured=structured,
        adapter=adapter,
    )

    def name(engine_name: str) -> str:
        if engine_name == "structured" and structured_param:
            return structured_param
        if engine_name in ("n", "best_of") and p.best_of is not None:
            return "parameters.best_of"  # n is best_of's sequences
        return _lmi_name(engine_name)

    return ids, svc.validated(_with_extras(spec, p.model_extra or {}), name)


# Engine parameter names (SamplingSpec's, vLLM's) as LMI calls them.
LMI_NAMES = {
    "logprobs": "top_n_tokens",
    "prompt_logprobs": "decoder_input_details",
    "ignore_eos": "ignore_eos_token",
    "max_tokens": "max_new_tokens",
    "stop": "stop_sequences",
}


def _lmi_name(name: str) -> str:
    return "parameters." + LMI_NAMES.get(name, name)


def _adapter(svc: ModelService, req: LmiRequest) -> AdapterRef | None:
    """LMI's per-request LoRA adapter: ``"adapters"`` beside ``inputs`` or in ``parameters`` ("" is the base
    model; a list holds one name per input, and a rolling-batch request has one input). An unregistered name is
    424, as LMI answers."""
    chosen: tuple[str, str] | None = None
    for param, value in (("adapters", req.adapters), ("parameters.adapters", req.parameters.adapters)):
        if isinstance(value, list):
            if len(value) != 1:
                raise APIError(400, f"{param} lists {len(value)} adapters for 1 input; name one", param=param)
            value = value[0]
        if value is None:
            continue
        if chosen is not None and chosen[1] != value:
            raise APIError(400, f"adapters={chosen[1]!r} and {param}={value!r} disagree; keep one", param=param)
        chosen = (param, value)
    return svc.adapter(chosen[1], chosen[0]) if chosen else None


def _check_supported(req: LmiRequest) -> None:
    """Parameters LMI passes to vLLM that kiln accepts only at the value meaning "off"."""
    p = req.parameters
    if p.num_beams is not None and p.num_beams != 1:
        raise APIError(
            400,
            f"parameters.num_beams={p.num_beams}: beam search is not supported (num_beams must be 1)",
            param="parameters.num_beams",
        )
    if p.typical_p is not None and p.typical_p != 1.0:
        raise APIError(
            400,
            f"parameters.typical_p={p.typical_p:g}: typical sampling is not supported (typical_p must be 1.0)",
            param="parameters.typical_p",
        )
    if p.watermark:
        raise APIError(400, "parameters.watermark=true: watermarking is not supported", param="parameters.watermark")
    if p.best_of is not None:
        if p.best_of < p.n:
            raise APIError(
                400,
                f"parameters.best_of ({p.best_of}) must be at least parameters.n ({p.n})",
                param="parameters.best_of",
            )
        if req.stream and p.best_of > 1:
            raise APIError(400, "parameters.best_of > 1 is not supported with stream=true", param="parameters.best_of")


def _structured(p: LmiParameters) -> tuple[dict[str, Any] | None, str | None]:
    """The structured output constraint (vLLM's StructuredOutputsParams terms) and the parameter that gave it,
    from vLLM's guided_* parameters, response_format and structured_outputs: one constraint at most."""
    found: list[tuple[str, dict[str, Any]]] = []
    for key, kind in GUIDED.items():
        value = getattr(p, key)
        if value is not None:
            param = f"parameters.{key}"
            found.append((param, {kind: _schema(value, param) if kind == "json" else value}))
    fmt = p.response_format.constraint("parameters.response_format") if p.response_format else None
    if fmt is not None:
        found.append(("parameters.response_format", fmt))
    options: dict[str, Any] = {}
    so, given = "parameters.structured_outputs", p.structured_outputs
    if given is not None:
        unknown = sorted(set(given) - set(STRUCTURED_CONSTRAINTS) - set(STRUCTURED_OPTIONS))
        if unknown:
            raise APIError(
                400,
                f"{so}.{unknown[0]} is not a structured output constraint ({', '.join(STRUCTURED_CONSTRAINTS)}) "
                f"or option ({', '.join(STRUCTURED_OPTIONS)})",
                param=f"{so}.{unknown[0]}",
            )
        kinds = [k for k in STRUCTURED_CONSTRAINTS if given.get(k) is not None and given.get(k) is not False]
        if len(kinds) > 1:
            raise APIError(400, f"{so} holds more than one constraint ({', '.join(kinds)}): give one", param=so)
        found.extend((so, {k: _schema(given[k], f"{so}.{k}") if k == "json" else given[k]}) for k in kinds)
        options = {k: v for k, v in given.items() if k in STRUCTURED_OPTIONS}
    if len(found) > 1:
        raise APIError(
            400,
            f"{found[1][0]} and {found[0][0]} both constrain the output: give one structured output constraint",
            param=found[1][0],
        )
    if not found:
        if options:
            raise APIError(
                400,
                f"{so} gives options ({', '.join(options)}) but no constraint: add one of "
                f"{', '.join(STRUCTURED_CONSTRAINTS)} (or guided_json, guided_regex, … or response_format)",
                param=so,
            )
        return None, None
    param, constraint = found[0]
    return {**constraint, **options}, param


def _schema(value: Any, param: str) -> Any:
    """A JSON schema given as an object or as its JSON text, as an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise APIError(400, f"{param} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(value, dict | bool):
        raise APIError(400, f"{param} must be a JSON schema (an object)", param=param)
    return value


def _with_extras(spec: SamplingSpec, extras: Mapping[str, Any]) -> SamplingSpec:
    """Parameters kiln does not name go to the engine as they are (vLLM: SamplingParams fields)."""
    return replace(spec, extra=dict(extras)) if extras else spec


async def generate(svc: ModelService, req: LmiRequest) -> Any:
    arrived = time.perf_counter()
    ids, spec = prepare(svc, req)
    gen = await svc.collect(ids, spec, arrived)
    p = req.parameters
    # best_of: the likeliest first (stable: ties keep the engine's order); n alone keeps the engine's order.
    order = sorted(range(spec.n), key=lambda i: -_cumulative(gen.tokens[i])) if p.best_of else list(range(spec.n))
    body: dict[str, Any] = {"generated_text": _full_text(req, gen.texts[order[0]])}
    if p.details or p.decoder_input_details or svc.options.tgi_compat:
        body["details"] = _details(svc, gen, req, spec, order[0])
        if spec.n > 1:
            body["details"]["best_of_sequences"] = [_sequence(svc, gen, req, spec, i) for i in order[1:]]
    return [body] if svc.options.tgi_compat else body


def _cumulative(tokens: list[TokenInfo]) -> float:
    """A sequence's cumulative logprob as the client sees it (the wire values: -inf and NaN count -9999)."""
    return math.fsum(wire_logprob(t.logprob) or 0.0 for t in tokens)


def stream_media_type(svc: ModelService) -> str:
    return SSE if svc.options.output_formatter == "sse" or svc.options.tgi_compat else JSONLINES


async def stream(svc: ModelService, req: LmiRequest) -> AsyncIterator[str]:
    arrived = time.perf_counter()
    ids, spec = prepare(svc, req)
    return _events(svc, ids, spec, req, arrived)


async def _events(
    svc: ModelService, ids: list[int], spec: SamplingSpec, req: LmiRequest, arrived: float
) -> AsyncIterator[str]:
    frame = _sse_line if stream_media_type(svc) == SSE else _json_line
    tgi = svc.options.tgi_compat
    gen = Generation(n=1)
    index = 0
    try:
        async for out in svc.stream(ids, spec, arrived):
            gen.add(out)
            for d in out.deltas:
                last = len(d.tokens) - 1
                for i, (tok, text) in enumerate(zip(d.tokens, _token_texts(d), strict=True)):
                    line: dict[str, Any] = {"token": _token(svc, tok, tgi, text)}
                    if tgi:
                        line["index"] = index
                    if req.parameters.top_n_tokens:
                        line["top_tokens"] = _top(tok, tgi)
                    if d.finish_reason and i == last:
                        line["generated_text"] = _full_text(req, gen.texts[0])
                        line["details"] = _stream_details(gen, spec, len(ids))
                    elif tgi:
                        line["generated_text"], line["details"] = None, None
                    index += 1
                    yield frame(line)
    except APIError as exc:
        log.warning("stream failed: %s", exc.message)
        yield frame(_error_line(exc, gen, len(ids)))


def _token_texts(d: SeqDelta) -> list[str]:
    """The text each of a delta's tokens added to the output, adding up to the delta's text: each token's decoded
    text as far as the delta's text still matches it (a stop string cuts a token; a partial UTF-8 character gives
    nothing until a later token completes it), the rest to the delta's last token."""
    out: list[str] = []
    rest = d.text
    for tok in d.tokens[:-1]:
        k = 0
        while k < min(len(tok.text), len(rest)) and tok.text[k] == rest[k]:
            k += 1
        out.append(rest[:k])
        rest = rest[k:]
    return [*out, rest] if d.tokens else out


def _error_line(exc: APIError, gen: Generation, input_length: int) -> dict[str, Any]:
    """LMI's in-band error: a last token with id -1 and finish_reason "error"."""
    return {
        "token": {"id": -1, "text": "", "log_prob": -1, "special_token": True},
        "generated_text": None,
        "error": exc.message,
        "code": exc.status,
        "details": {"finish_reason": "error", "generated_tokens": gen.completion_tokens, "input_length": input_length},
    }


def _full_text(req: LmiRequest, text: str) -> str:
    return (req.inputs if req.parameters.return_full_text else "") + text


def _finish(gen: Generation, i: int) -> str:
    finish = gen.finish[i]
    if finish == "stop" and isinstance(gen.stop_reason[i], str):
        return "stop_sequence"
    return FINISH.get(finish or "", finish or "length")


def _stream_details(gen: Generation, spec: SamplingSpec, input_length: int) -> dict[str, Any]:
    return {
        "finish_reason": _finish(gen, 0),
        "generated_tokens": gen.completion_tokens,
        "input_length": input_length,
        "seed": spec.seed,
    }


def _details(svc: ModelService, gen: Generation, req: LmiRequest, spec: SamplingSpec, i: int) -> dict[str, Any]:
    tgi = svc.options.tgi_compat
    details: dict[str, Any] = {
        "finish_reason": _finish(gen, i),
        "generated_tokens": len(gen.tokens[i]),
        "inputs": req.inputs,
        "input_length": gen.prompt_tokens,
        "seed": spec.seed,
        "tokens": [_token(svc, t, tgi) for t in gen.tokens[i]],
    }
    if req.parameters.top_n_tokens:
        details["top_tokens"] = [_top(t, tgi) for t in gen.tokens[i]]
    if req.parameters.decoder_input_details and gen.prompt_logprobs is not None:
        details["prefill"] = [_prefill(svc, t, tgi) for t in gen.prompt_logprobs if t is not None]
    return details


def _sequence(svc: ModelService, gen: Generation, req: LmiRequest, spec: SamplingSpec, i: int) -> dict[str, Any]:
    d = _details(svc, gen, req, spec, i)
    return {
        "generated_text": _full_text(req, gen.texts[i]),
        **{k: d[k] for k in ("finish_reason", "generated_tokens", "seed", "tokens")},
    }


def _token(svc: ModelService, t: TokenInfo, tgi: bool, text: str | None = None) -> dict[str, Any]:
    """A token on the wire; ``text``: what it added to the streamed output (default: its decoded text)."""
    special = t.id in svc.special_ids
    text = t.text if text is None else text
    if tgi:
        return {"id": t.id, "text": text, "logprob": wire_logprob(t.logprob), "special": special}
    token = {"id": t.id, "text": text, "log_prob": wire_logprob(t.logprob)}
    if special:  # its text is not part of generated_text (special tokens are skipped there)
        token["special_token"] = True
    return token


def _top(t: TokenInfo, tgi: bool) -> list[dict[str, Any]]:
    key = "logprob" if tgi else "log_prob"
    return [{"id": i, "text": s, key: wire_logprob(lp)} for i, s, lp in t.top]


def _prefill(svc: ModelService, t: TokenInfo, tgi: bool) -> dict[str, Any]:
    text = t.text or svc.tokenizer.decode([t.id])
    return {"id": t.id, "text": text, "logprob" if tgi else "log_prob": wire_logprob(t.logprob)}


def _json_line(body: Mapping[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":")) + "\n"


def _sse_line(body: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

"""LMI's ``{"inputs", "parameters"}`` schema: sampling parameters in, LMI (or TGI-compatible) responses out.

Non-streaming: ``{"generated_text", "details": {finish_reason, generated_tokens, inputs, input_length, seed, tokens,
top_tokens?, prefill?, best_of_sequences?}}`` (``details`` with ``parameters.details``). Streaming: one JSON object
per token, ``{"token": {id, text, log_prob}}``, the last line also carrying ``generated_text`` and ``details``; as
jsonlines by default, as SSE with ``option.output_formatter=sse``. ``option.tgi_compat=true`` gives TGI's forms: the
response wrapped in an array with details included, SSE streaming, tokens as ``{id, text, logprob, special}``.
Errors after the stream started arrive in-band as a final ``finish_reason: "error"`` token line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

from runtime.api.protocol import LmiRequest
from runtime.engines.base import SamplingSpec, TokenInfo
from runtime.errors import APIError
from runtime.service import Generation, ModelService

log = logging.getLogger("kiln.runtime")
FINISH = {"length": "length", "stop": "eos_token", "abort": "error", "error": "error"}
SSE = "text/event-stream"
JSONLINES = "application/jsonlines"


def prepare(svc: ModelService, req: LmiRequest) -> tuple[list[int], SamplingSpec]:
    p = req.parameters
    ids = svc.encode(req.inputs, param="inputs")
    if p.truncate is not None:
        ids = ids[-p.truncate :]
    max_tokens = svc.budget(ids, p.max_new_tokens, "parameters.max_new_tokens")
    sampling = p.do_sample is True or (p.do_sample is None and (p.temperature or 0) > 0)
    want_lp = p.details or req.stream or p.top_n_tokens is not None or svc.options.tgi_compat
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
        n=p.n,
        min_p=p.min_p or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        min_tokens=p.min_tokens or 0,
        stop_token_ids=tuple(p.stop_token_ids or ()),
        include_stop_str_in_output=bool(p.include_stop_str_in_output),
        skip_special_tokens=p.skip_special_tokens is not False,
    )
    return ids, svc.validated(_with_extras(spec, p.model_extra or {}), _lmi_name)


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


def _with_extras(spec: SamplingSpec, extras: Mapping[str, Any]) -> SamplingSpec:
    """Parameters kiln does not name go to the engine as they are (vLLM: SamplingParams fields)."""
    return replace(spec, extra=dict(extras)) if extras else spec


async def generate(svc: ModelService, req: LmiRequest) -> Any:
    arrived = time.perf_counter()
    ids, spec = prepare(svc, req)
    gen = await svc.collect(ids, spec, arrived)
    p = req.parameters
    body: dict[str, Any] = {"generated_text": _full_text(req, gen.texts[0])}
    if p.details or p.decoder_input_details or svc.options.tgi_compat:
        body["details"] = _details(svc, gen, req, spec, 0)
        if spec.n > 1:
            body["details"]["best_of_sequences"] = [_sequence(svc, gen, req, spec, i) for i in range(1, spec.n)]
    return [body] if svc.options.tgi_compat else body


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
                for i, tok in enumerate(d.tokens):
                    line: dict[str, Any] = {"token": _token(svc, tok, tgi)}
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


def _token(svc: ModelService, t: TokenInfo, tgi: bool) -> dict[str, Any]:
    special = t.id in svc.special_ids
    if tgi:
        return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": special}
    token = {"id": t.id, "text": t.text, "log_prob": t.logprob}
    if special:  # its text is not part of generated_text (special tokens are skipped there)
        token["special_token"] = True
    return token


def _top(t: TokenInfo, tgi: bool) -> list[dict[str, Any]]:
    key = "logprob" if tgi else "log_prob"
    return [{"id": i, "text": s, key: lp} for i, s, lp in t.top]


def _prefill(svc: ModelService, t: TokenInfo, tgi: bool) -> dict[str, Any]:
    text = t.text or svc.tokenizer.decode([t.id])
    return {"id": t.id, "text": text, "logprob" if tgi else "log_prob": t.logprob}


def _json_line(body: Mapping[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":")) + "\n"


def _sse_line(body: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

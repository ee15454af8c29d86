"""The OpenAI APIs (``/v1/chat/completions``, ``/v1/completions``): requests into sampling specs for the generation
core (:mod:`runtime.service`), engine output into OpenAI's responses and server-sent event streams."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from runtime.api.protocol import ChatCompletionRequest, CompletionRequest, _OpenAISampling
from runtime.engines.base import SamplingSpec, TokenInfo
from runtime.errors import APIError
from runtime.service import ModelService

log = logging.getLogger("kiln.runtime")
# Engine parameter names (SamplingSpec's, vLLM's) as the OpenAI APIs call them.
OPENAI_NAMES = {"structured": "response_format", "max_tokens": "max_tokens"}
OPENAI_CHAT_NAMES = {**OPENAI_NAMES, "logprobs": "top_logprobs"}
STRUCTURED_CONSTRAINTS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


def openai_spec(
    svc: ModelService, req: _OpenAISampling, max_tokens: int, logprobs: int | None, chat: bool = False
) -> SamplingSpec:
    d = svc.defaults
    structured = _structured(req)
    extra: dict[str, Any] = {}
    if req.logit_bias:
        try:
            extra["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError as exc:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from exc
    return svc.validated(
        SamplingSpec(
            max_tokens=max_tokens,
            n=req.n,
            seed=req.seed,
            stop=req.stop_list(),
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            top_k=d.top_k if req.top_k is None else max(req.top_k, 0),
            min_p=req.min_p or 0.0,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            structured=structured,
            extra=extra,
        ),
        lambda name: (OPENAI_CHAT_NAMES if chat else OPENAI_NAMES).get(name, name),
    )


def _structured(req: _OpenAISampling) -> dict[str, Any] | None:
    """``response_format`` (OpenAI) and ``structured_outputs`` (vLLM's extension) as one constraint."""
    out = dict(req.structured_outputs or {})
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if any(k in out for k in STRUCTURED_CONSTRAINTS):
            raise APIError(
                400, "use response_format or a structured_outputs constraint, not both", param="response_format"
            )
        if fmt.type == "json_object":
            out["json_object"] = True
        elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema is required", param="response_format")
        else:
            out["json"] = fmt.json_schema.schema_
    return out or None


# -- OpenAI chat ---------------------------------------------------------------------------------------
def prepare_chat(svc: ModelService, req: ChatCompletionRequest) -> tuple[list[int], SamplingSpec]:
    svc.check_model(req.model)
    ids = svc.render_chat(
        [{"role": m.role, "content": m.text()} for m in req.messages],
        req.add_generation_prompt,
        **(req.chat_template_kwargs or {}),
    )
    max_tokens = svc.budget(
        ids, req.token_budget(), "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return ids, openai_spec(svc, req, max_tokens, logprobs, chat=True)


async def chat(svc: ModelService, req: ChatCompletionRequest) -> dict[str, Any]:
    arrived = time.perf_counter()
    ids, spec = prepare_chat(svc, req)
    gen = await svc.collect(ids, spec, arrived)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": gen.texts[i]},
            "logprobs": {"content": [_chat_lp(t) for t in gen.tokens[i]]} if req.logprobs else None,
            "finish_reason": _openai_finish(gen.finish[i]),
            "stop_reason": gen.stop_reason[i],
        }
        for i in range(spec.n)
    ]
    return {
        "id": _id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": svc.served_name,
        "choices": choices,
        "usage": _usage(gen.prompt_tokens, gen.completion_tokens),
    }


async def chat_stream(svc: ModelService, req: ChatCompletionRequest) -> AsyncIterator[str]:
    arrived = time.perf_counter()
    ids, spec = prepare_chat(svc, req)
    return _guarded_stream(_chat_events(svc, ids, spec, req, arrived))


async def _chat_events(
    svc: ModelService, ids: list[int], spec: SamplingSpec, req: ChatCompletionRequest, arrived: float
) -> AsyncIterator[str]:
    rid, created = _id("chatcmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)
    # The constant part of every chunk, serialized once: only the choices change per chunk.
    head = json.dumps(
        {"id": rid, "object": "chat.completion.chunk", "created": created, "model": svc.served_name},
        separators=(",", ":"),
    )[:-1]

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        tail = f',"usage":{json.dumps(usage, separators=(",", ":"))}' if include_usage else ""
        return f'data: {head},"choices":{json.dumps(choices, separators=(",", ":"))}{tail}}}\n\n'

    yield chunk(
        [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(spec.n)
        ],
        _usage(len(ids), 0) if continuous else None,
    )
    completion = 0
    prompt_tokens = len(ids)
    async for out in svc.stream(ids, spec, arrived):
        prompt_tokens = out.prompt_tokens or prompt_tokens
        choices = []
        for d in out.deltas:
            completion += len(d.tokens)
            if not d.text and not d.finish_reason and not d.tokens:
                continue
            choice: dict[str, Any] = {
                "index": d.index,
                "delta": {"content": d.text} if d.text or not d.finish_reason else {},
                "logprobs": {"content": [_chat_lp(t) for t in d.tokens]} if req.logprobs else None,
                "finish_reason": _openai_finish(d.finish_reason),
            }
            if d.finish_reason:
                choice["stop_reason"] = d.stop_reason
            choices.append(choice)
        if choices:
            yield chunk(choices, _usage(prompt_tokens, completion) if continuous else None)
    if include_usage:
        yield chunk([], _usage(prompt_tokens, completion))


# -- OpenAI completions --------------------------------------------------------------------------------
def prepare_completion(svc: ModelService, req: CompletionRequest) -> list[tuple[list[int], SamplingSpec]]:
    svc.check_model(req.model)
    jobs = []
    for prompt in req.prompts():
        ids = svc.encode(prompt)
        jobs.append((ids, openai_spec(svc, req, svc.budget(ids, req.max_tokens), req.logprobs)))
    return jobs


async def completion(svc: ModelService, req: CompletionRequest) -> dict[str, Any]:
    arrived = time.perf_counter()
    jobs = prepare_completion(svc, req)
    # A list of prompts runs concurrently: the engine batches them.
    gens = await asyncio.gather(*(svc.collect(ids, spec, arrived) for ids, spec in jobs))
    choices = []
    for p, ((ids, spec), gen) in enumerate(zip(jobs, gens, strict=True)):
        prefix = svc.tokenizer.decode(ids) if req.echo else ""
        for i in range(spec.n):
            choices.append(
                {
                    "index": p * spec.n + i,
                    "text": prefix + gen.texts[i],
                    "logprobs": _completion_lp(gen.tokens[i]) if req.logprobs is not None else None,
                    "finish_reason": _openai_finish(gen.finish[i]),
                    "stop_reason": gen.stop_reason[i],
                }
            )
    return {
        "id": _id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": svc.served_name,
        "choices": choices,
        "usage": _usage(sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens)),
    }


async def completion_stream(svc: ModelService, req: CompletionRequest) -> AsyncIterator[str]:
    arrived = time.perf_counter()
    jobs = prepare_completion(svc, req)
    return _guarded_stream(_completion_events(svc, jobs, req, arrived))


async def _completion_events(
    svc: ModelService, jobs: list[tuple[list[int], SamplingSpec]], req: CompletionRequest, arrived: float
) -> AsyncIterator[str]:
    rid, created = _id("cmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = json.dumps(
        {"id": rid, "object": "text_completion", "created": created, "model": svc.served_name},
        separators=(",", ":"),
    )[:-1]

    def chunk(index: int, text: str, lp: Any, finish: str | None) -> str:
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": _openai_finish(finish)}
        return f'data: {head},"choices":[{json.dumps(choice, separators=(",", ":"))}]}}\n\n'

    prompt_total = completion_total = 0
    for p, (ids, spec) in enumerate(jobs):
        if req.echo:
            for i in range(spec.n):
                yield chunk(p * spec.n + i, svc.tokenizer.decode(ids), None, None)
        async for out in svc.stream(ids, spec, arrived):
            for d in out.deltas:
                completion_total += len(d.tokens)
                if d.text or d.finish_reason:
                    lp = _completion_lp(list(d.tokens)) if req.logprobs is not None else None
                    yield chunk(p * spec.n + d.index, d.text, lp, d.finish_reason)
        prompt_total += len(ids)
    if include_usage:
        yield f'data: {head},"choices":[],"usage":{json.dumps(_usage(prompt_total, completion_total))}}}\n\n'


async def _guarded_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE with in-band errors: once the 200 is sent, a failure becomes an error event, then [DONE]. Only this
    request fails: the engine keeps serving the others."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        log.warning("stream failed: %s", exc.message)
        yield _sse(exc.openai_body())
    except Exception as exc:  # a bug must not leave the client hanging without an end to its stream
        log.error("stream failed unexpectedly", exc_info=True)
        yield _sse(APIError(500, f"internal error: {type(exc).__name__}").openai_body())
    yield "data: [DONE]\n\n"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _sse(body: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _openai_finish(reason: str | None) -> str | None:
    return {"abort": "stop", "error": "stop"}.get(reason or "", reason) if reason else None


def _chat_lp(t: TokenInfo) -> dict[str, Any]:
    return {
        "token": t.text,
        "logprob": t.logprob,
        "bytes": list(t.text.encode()),
        "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for _, s, lp in t.top],
    }


def _completion_lp(tokens: list[TokenInfo]) -> dict[str, Any]:
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{s: lp for _, s, lp in t.top} for t in tokens],
        "text_offset": _offsets(tokens),
    }


def _offsets(tokens: list[TokenInfo]) -> list[int]:
    out, pos = [], 0
    for t in tokens:
        out.append(pos)
        pos += len(t.text)
    return out

"""The OpenAI APIs (``/v1/chat/completions``, ``/v1/completions``): requests into sampling specs for the generation
core (:mod:`runtime.service`), engine output into OpenAI's responses and server-sent event streams.

The wire format is vLLM 0.32's, field for field (tests/test_differential.py holds kiln to it; the deliberate
differences are listed in tests/differential/differences.yaml and the README): clients such as lm-evaluation-harness
and ``vllm bench serve`` read details the OpenAI reference leaves open — prompt logprobs under ``echo``, one stream
chunk per engine step, the role chunk sent with the first token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from runtime.api.protocol import ChatCompletionRequest, CompletionRequest, _OpenAISampling
from runtime.api.wire import wire_logprob
from runtime.engines.base import STRUCTURED_CONSTRAINTS, EngineOutput, SamplingSpec, TokenInfo
from runtime.errors import APIError
from runtime.service import ModelService

log = logging.getLogger("kiln.runtime")
# Engine parameter names (SamplingSpec's, vLLM's) as the OpenAI APIs call them.
OPENAI_NAMES = {"structured": "response_format", "max_tokens": "max_tokens"}
OPENAI_CHAT_NAMES = {**OPENAI_NAMES, "logprobs": "top_logprobs"}
NO_TOOLS = (
    'tool calling is not enabled on this server (kiln does not parse tool calls yet); send tool_choice "none" '
    "to generate plain text with these tools in the prompt, or leave out `tools`"
)


def openai_spec(
    svc: ModelService,
    req: _OpenAISampling,
    max_tokens: int,
    logprobs: int | None,
    chat: bool = False,
    prompt_logprobs: int | None = None,
) -> SamplingSpec:
    d = svc.defaults
    structured = _structured(req)
    extra: dict[str, Any] = {}
    if req.allowed_token_ids is not None:
        extra["allowed_token_ids"] = list(req.allowed_token_ids)
    if req.bad_words:
        extra["bad_words"] = list(req.bad_words)
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
            prompt_logprobs=prompt_logprobs,
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
    constraint = req.response_format.constraint("response_format") if req.response_format else None
    if constraint is not None:
        if any(k in out for k in STRUCTURED_CONSTRAINTS):
            raise APIError(
                400, "use response_format or a structured_outputs constraint, not both", param="response_format"
            )
        out |= constraint
    return out or None


# -- OpenAI chat ---------------------------------------------------------------------------------------
def prepare_chat(svc: ModelService, req: ChatCompletionRequest) -> tuple[list[int], SamplingSpec]:
    svc.require("generate")
    adapter = svc.check_model(req.model)
    _check_tools(req)
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(
            400,
            "continue_final_message continues the last message: set add_generation_prompt=false with it",
            param="continue_final_message",
        )
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise APIError(400, "continue_final_message needs an assistant message last", param="messages")
    template_kwargs = dict(req.chat_template_kwargs or {})
    if req.continue_final_message:
        template_kwargs["continue_final_message"] = True
    if req.tools:
        template_kwargs.setdefault("tools", req.tools)
    ids = _truncated(
        svc.render_chat(
            [m.model_dump(exclude_none=True) | {"content": m.text()} for m in req.messages],
            req.add_generation_prompt,
            **template_kwargs,
        ),
        svc,
        req.truncate_prompt_tokens,
    )
    max_tokens = svc.budget(
        ids, req.token_budget(), "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    # vLLM scores an echoed prompt at top_logprobs (its default 0)
    prompt_lp = (
        req.prompt_logprobs if req.prompt_logprobs is not None else ((req.top_logprobs or 0) if req.echo else None)
    )
    spec = openai_spec(svc, req, max_tokens, logprobs, chat=True, prompt_logprobs=prompt_lp)
    return ids, replace(spec, adapter=adapter)


def _role(req: ChatCompletionRequest) -> str:
    """The reply's role: the assistant's, or, continuing a conversation without a generation prompt, the last
    message's (as vLLM answers)."""
    return "assistant" if req.add_generation_prompt else req.messages[-1].role


def _check_tools(req: ChatCompletionRequest) -> None:
    """Tools are refused, never ignored: with ``tools`` and no ``tool_choice`` the client asks for "auto"."""
    if req.tools is not None and not req.tools:
        raise APIError(400, "`tools` must not be an empty array; leave it out", param="tools")
    choice = req.tool_choice if "tool_choice" in req.model_fields_set else ("auto" if req.tools else None)
    if choice is None or choice == "none":
        return
    if not req.tools:
        raise APIError(400, "tool_choice needs `tools`", param="tool_choice")
    raise APIError(400, NO_TOOLS, param="tool_choice")


def _echoed(req: ChatCompletionRequest) -> str:
    """What ``echo`` repeats: the last message, when it is the assistant's (the reply continues it)."""
    last = req.messages[-1]
    return last.text() if req.echo and last.role == "assistant" else ""


async def chat(svc: ModelService, req: ChatCompletionRequest) -> dict[str, Any]:
    arrived = time.perf_counter()
    ids, spec = prepare_chat(svc, req)
    gen = await svc.collect(ids, spec, arrived)
    k, as_ids, prefix = spec.logprobs or 0, req.return_tokens_as_token_ids, _echoed(req)
    choices = []
    for i in range(spec.n):
        choice: dict[str, Any] = {
            "index": i,
            "message": {"role": _role(req), "content": prefix + gen.texts[i]},
            "logprobs": {"content": [_chat_lp(svc, t, k, as_ids) for t in gen.tokens[i]]} if req.logprobs else None,
            "finish_reason": _openai_finish(gen.finish[i]),
            "stop_reason": gen.stop_reason[i],
        }
        if req.return_token_ids:
            choice["token_ids"] = [t.id for t in gen.tokens[i]]
        choices.append(choice)
    body: dict[str, Any] = {
        "id": _id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": svc.model_name(spec),
        "choices": choices,
        "usage": _usage(gen.prompt_tokens, gen.completion_tokens),
    }
    if req.return_token_ids:
        body["prompt_token_ids"] = ids
    if spec.prompt_logprobs is not None:
        body["prompt_logprobs"] = _prompt_lp_field(spec, gen.prompt_logprobs)
    return body


async def chat_stream(svc: ModelService, req: ChatCompletionRequest) -> AsyncIterator[str]:
    arrived = time.perf_counter()
    if req.prompt_logprobs:
        raise APIError(400, "prompt_logprobs are not available when stream=true", param="prompt_logprobs")
    ids, spec = prepare_chat(svc, req)
    return _guarded_stream(_chat_events(svc, ids, spec, req, arrived))


async def _chat_events(
    svc: ModelService, ids: list[int], spec: SamplingSpec, req: ChatCompletionRequest, arrived: float
) -> AsyncIterator[str]:
    rid, created = _id("chatcmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)
    head = _head(rid, "chat.completion.chunk", created, svc.model_name(spec))
    k, as_ids, prompt_tokens = spec.logprobs or 0, req.return_tokens_as_token_ids, len(ids)
    sent = [0] * spec.n  # tokens sent per choice
    finished = [False] * spec.n
    first = True

    def usage(completion: int) -> dict[str, Any] | None:
        return {**_usage(prompt_tokens, completion), "completion_tokens_details": None} if continuous else None

    async for out in svc.stream(ids, spec, arrived):
        prompt_tokens = out.prompt_tokens or prompt_tokens
        if first:
            # The role goes out with the first engine output, not before prefill: clients time the first token
            # from the first chunk.
            first = False
            for i in range(spec.n):
                role = {"index": i, "delta": {"role": _role(req), "content": ""}, "logprobs": None}
                yield _chunk(head, [{**role, "finish_reason": None}], usage(0))
            if prefix := _echoed(req):
                for i in range(spec.n):
                    yield _chunk(head, [_delta(i, {"content": prefix})], usage(0))
        for d in out.deltas:
            i = d.index
            if finished[i] or (not d.text and not d.tokens and not sent[i]):
                continue  # nothing yet (a prefill step)
            sent[i] += len(d.tokens)
            choice = _delta(i, {"content": d.text}, _openai_finish(d.finish_reason))
            if req.logprobs:
                choice["logprobs"] = {"content": [_chat_lp(svc, t, k, as_ids) for t in d.tokens]}
            if d.finish_reason:
                finished[i] = True
                choice["stop_reason"] = d.stop_reason
            if req.return_token_ids:
                choice["token_ids"] = [t.id for t in d.tokens]
            yield _chunk(head, [choice], usage(sent[i]))
    if include_usage:
        yield _chunk(head, [], _usage(prompt_tokens, sum(sent)))


def _delta(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


# -- OpenAI completions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One prompt of a completion request: its text as echoed, its tokens, its sampling."""

    text: str
    ids: list[int]
    spec: SamplingSpec
    echo_only: bool  # max_tokens=0 with echo: the prompt is scored, nothing generated is shown


def prepare_completion(svc: ModelService, req: CompletionRequest) -> list[Job]:
    svc.require("generate")
    adapter = svc.check_model(req.model)
    echo_only = req.echo and req.max_tokens == 0
    if req.max_tokens == 0 and not req.echo:
        raise APIError(
            400, "max_tokens must be at least 1 (0 scores the prompt: send it with echo=true)", param="max_tokens"
        )
    # Logprobs of the prompt come with echo (lm-eval scores choices from them) or when asked for.
    prompt_lp = req.prompt_logprobs if req.prompt_logprobs is not None else (req.logprobs if req.echo else None)
    jobs = []
    for prompt in req.prompts():
        ids = _truncated(svc.encode(prompt), svc, req.truncate_prompt_tokens)
        # The engine generates one token for a prompt-only request (it cannot generate none); it is not shown.
        max_tokens = svc.budget(ids, 1 if echo_only else req.max_tokens)
        spec = replace(openai_spec(svc, req, max_tokens, req.logprobs, prompt_logprobs=prompt_lp), adapter=adapter)
        # echo repeats a text prompt as sent, truncated or not (as vLLM does), token ids as decoded
        text = prompt if isinstance(prompt, str) else svc.tokenizer.decode(ids)
        jobs.append(Job(text, ids, spec, echo_only))
    return jobs


async def completion(svc: ModelService, req: CompletionRequest) -> dict[str, Any]:
    arrived = time.perf_counter()
    jobs = prepare_completion(svc, req)
    # A list of prompts runs concurrently: the engine batches them.
    gens = await asyncio.gather(*(svc.collect(job.ids, job.spec, arrived) for job in jobs))
    choices: list[dict[str, Any]] = []
    for job, gen in zip(jobs, gens, strict=True):
        prompt = _prompt_tokens(job, gen.prompt_logprobs)
        for i in range(job.spec.n):
            text, tokens = gen.texts[i], gen.tokens[i]
            if req.echo:
                text = job.text if job.echo_only else job.text + text
                tokens = prompt if job.echo_only else [*prompt, *tokens]
            choice: dict[str, Any] = {
                "index": len(choices),
                "text": text,
                "logprobs": _completion_lp(svc, tokens, 0, req) if req.logprobs is not None else None,
                "finish_reason": _openai_finish(gen.finish[i]),
                "stop_reason": gen.stop_reason[i],
                "prompt_logprobs": _prompt_lp_field(job.spec, gen.prompt_logprobs),
            }
            if req.return_token_ids:
                choice["prompt_token_ids"] = job.ids
                choice["token_ids"] = [t.id for t in gen.tokens[i]]
            choices.append(choice)
    return {
        "id": _id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": svc.model_name(jobs[0].spec),
        "choices": choices,
        "usage": _usage(sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens)),
    }


async def completion_stream(svc: ModelService, req: CompletionRequest) -> AsyncIterator[str]:
    arrived = time.perf_counter()
    jobs = prepare_completion(svc, req)
    if req.prompt_logprobs:
        raise APIError(400, "prompt_logprobs are not available when stream=true", param="prompt_logprobs")
    return _guarded_stream(_completion_events(svc, jobs, req, arrived))


async def _completion_events(
    svc: ModelService, jobs: list[Job], req: CompletionRequest, arrived: float
) -> AsyncIterator[str]:
    """One chunk per engine output and choice, empty text included (a token ending inside a UTF-8 character still
    carries its logprob); prompts run concurrently and their chunks interleave, as vLLM's do."""
    rid, created = _id("cmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)
    head = _head(rid, "text_completion", created, svc.model_name(jobs[0].spec))
    n = req.n
    offsets, sent = [0] * (n * len(jobs)), [0] * (n * len(jobs))
    echoed, ids_sent = [False] * (n * len(jobs)), [False] * (n * len(jobs))
    prompt_lp: list[tuple[TokenInfo | None, ...] | None] = [None] * len(jobs)
    async for p, out in _merge([svc.stream(job.ids, job.spec, arrived) for job in jobs]):
        job = jobs[p]
        prompt_lp[p] = out.prompt_logprobs or prompt_lp[p]
        for d in out.deltas:
            i = p * n + d.index
            text, tokens = d.text, list(d.tokens)
            if req.echo and not echoed[i]:
                echoed[i] = True
                prompt = _prompt_tokens(job, prompt_lp[p])
                text = job.text if job.echo_only else job.text + text
                tokens = prompt if job.echo_only else [*prompt, *tokens]
            elif not text and not tokens and not sent[i]:
                continue  # nothing yet (a prefill step)
            choice: dict[str, Any] = {"index": i, "text": text, "logprobs": None}
            if req.logprobs is not None:
                lp = _completion_lp(svc, tokens, offsets[i], req)
                choice["logprobs"] = lp
                if lp["tokens"]:
                    offsets[i] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            sent[i] += len(d.tokens)
            choice |= {"finish_reason": _openai_finish(d.finish_reason), "stop_reason": d.stop_reason}
            if req.return_token_ids or (req.echo and not ids_sent[i]):  # vLLM: the echo chunk carries the prompt ids
                choice["prompt_token_ids"] = None if ids_sent[i] else job.ids
                ids_sent[i] = True
            if req.return_token_ids:
                choice["token_ids"] = [t.id for t in d.tokens]
            usage = _usage(len(job.ids), sent[i]) if continuous else None
            yield _chunk(head, [choice], usage)
    if include_usage:
        yield _chunk(head, [], _usage(sum(len(job.ids) for job in jobs), sum(sent)))


def _truncated(ids: list[int], svc: ModelService, keep: int | None) -> list[int]:
    """``truncate_prompt_tokens``: keep the prompt's last ``keep`` tokens."""
    if keep is None:
        return ids
    limit = svc.engine.max_model_len - 1  # one token of room for the output
    if keep > limit:
        raise APIError(
            400,
            f"truncate_prompt_tokens={keep} is more than the model's context allows ({limit})",
            param="truncate_prompt_tokens",
        )
    return ids[-keep:]


def _prompt_tokens(job: Job, logprobs: Sequence[TokenInfo | None] | None) -> list[TokenInfo]:
    """The prompt as tokens, with their logprobs where the engine gave them (the first has none)."""
    if logprobs is None:
        return [TokenInfo(id=t, text="") for t in job.ids]
    return [info or TokenInfo(id=t, text="") for t, info in zip(job.ids, logprobs, strict=False)]


def _prompt_lp_field(
    spec: SamplingSpec, logprobs: Sequence[TokenInfo | None] | None
) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token, None for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and the top alternatives."""
    if spec.prompt_logprobs is None or logprobs is None:
        return None
    out: list[dict[str, Any] | None] = []
    for info in logprobs:
        if info is None or info.logprob is None:
            out.append(None)
            continue
        entry = {str(info.id): _vllm_logprob(info.logprob, info.rank, info.text)}
        for j, (tid, text, lp) in enumerate(info.top):
            entry.setdefault(str(tid), _vllm_logprob(lp, j + 1, text))
        out.append(entry)
    return out


def _vllm_logprob(logprob: float, rank: int | None, text: str) -> dict[str, Any]:
    return {"logprob": wire_logprob(logprob), "rank": rank, "decoded_token": text}


async def _merge(streams: list[AsyncIterator[EngineOutput]]) -> AsyncIterator[tuple[int, EngineOutput]]:
    """The outputs of several streams as they come, each tagged with its stream's index; closing this closes all
    (aborting their engine requests)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, EngineOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[EngineOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
            await queue.put((index, None))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


def _head(rid: str, obj: str, created: int, model: str) -> str:
    """The constant part of every chunk, serialized once: only the choices change per chunk."""
    return json.dumps({"id": rid, "object": obj, "created": created, "model": model}, separators=(",", ":"))[:-1]


def _chunk(head: str, choices: list[dict[str, Any]], usage: Mapping[str, Any] | None = None) -> str:
    tail = f',"usage":{json.dumps(usage, separators=(",", ":"))}' if usage is not None else ""
    return f'data: {head},"choices":{json.dumps(choices, separators=(",", ":"))}{tail}}}\n\n'


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _sse(body: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _openai_finish(reason: str | None) -> str | None:
    return {"abort": "stop", "error": "stop"}.get(reason or "", reason) if reason else None


# -- logprobs -----------------------------------------------------------------------------------------------------
def _text(svc: ModelService, t: TokenInfo, as_ids: bool) -> str:
    if as_ids:
        return f"token_id:{t.id}"
    # A token without logprobs (the prompt's first) carries no text from the engine: decode it, as vLLM does.
    return t.text if t.logprob is not None else str(svc.tokenizer.decode([t.id]))


def _ranked(t: TokenInfo) -> list[tuple[int, str, float]]:
    """The token's alternatives in vLLM's order: the token itself first, then the likeliest others."""
    assert t.logprob is not None
    out, seen = [(t.id, t.text, t.logprob)], {t.id}
    for alt in t.top:
        if alt[0] not in seen:
            out.append(alt)
            seen.add(alt[0])
    return out


def _alt_text(tid: int, text: str, as_ids: bool) -> str:
    return f"token_id:{tid}" if as_ids else text


def _chat_lp(svc: ModelService, t: TokenInfo, k: int, as_ids: bool) -> dict[str, Any]:
    token = _text(svc, t, as_ids)
    if t.logprob is None:
        return {"token": token, "logprob": wire_logprob(float("-inf")), "bytes": _bytes(token), "top_logprobs": []}
    top = [
        {"token": (s := _alt_text(tid, text, as_ids)), "logprob": wire_logprob(lp), "bytes": _bytes(s)}
        for tid, text, lp in _ranked(t)[:k]
    ]
    return {"token": token, "logprob": wire_logprob(t.logprob), "bytes": _bytes(t.text), "top_logprobs": top}


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _completion_lp(
    svc: ModelService, tokens: Sequence[TokenInfo], offset: int, req: CompletionRequest
) -> dict[str, Any]:
    """Completions' logprobs: per token its text, logprob (None for the prompt's first), a {text: logprob} map of
    the token and its top alternatives, and its offset in the text (running on from ``offset``)."""
    as_ids = req.return_tokens_as_token_ids
    texts: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float | None] | None] = []
    offsets: list[int] = []
    for t in tokens:
        text = _text(svc, t, as_ids)
        offsets.append(offset)
        offset += len(text)
        texts.append(text)
        if t.logprob is None:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(wire_logprob(t.logprob))
            tops.append({_alt_text(tid, s, as_ids): wire_logprob(lp) for tid, s, lp in _ranked(t)})
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": texts, "top_logprobs": tops}

"""The model service: turns validated API requests into engine calls and engine output into API responses.

One instance serves one model. It owns the tokenizer (prompts are rendered and tokenized here, so length
limits are checked before the engine sees a request), the engine, and the served model name.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from runtime.engines.base import (
    Engine,
    EngineDeadError,
    EngineError,
    EngineOutput,
    EngineRequestError,
    SamplingSpec,
    TokenInfo,
)
from runtime.errors import APIError
from runtime.protocol import ChatCompletionRequest, CompletionRequest, LmiRequest, _OpenAISampling

log = logging.getLogger("kiln.runtime")
LMI_FINISH = {"length": "length", "stop": "eos_token", "abort": "error", "error": "error"}


@dataclass
class GenerationDefaults:
    """Sampling defaults from the model's generation_config.json (used when a request leaves them out)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> GenerationDefaults:
        if cfg.get("do_sample") is False:
            return cls(temperature=0.0)
        return cls(
            temperature=float(cfg.get("temperature", 1.0)),
            top_p=float(cfg.get("top_p", 1.0)),
            top_k=int(cfg.get("top_k", 0) or 0),
            repetition_penalty=float(cfg.get("repetition_penalty", 1.0)),
        )


@dataclass
class Generation:
    """Accumulated output of one request (all n sequences)."""

    n: int
    texts: list[str] = field(default_factory=list)
    tokens: list[list[TokenInfo]] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    stop_reason: list[str | int | None] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_logprobs: tuple[TokenInfo | None, ...] | None = None

    def __post_init__(self) -> None:
        self.texts = [""] * self.n
        self.tokens = [[] for _ in range(self.n)]
        self.finish = [None] * self.n
        self.stop_reason = [None] * self.n

    def add(self, out: EngineOutput) -> None:
        self.prompt_tokens = out.prompt_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for d in out.deltas:
            self.texts[d.index] += d.text
            self.tokens[d.index].extend(d.tokens)
            if d.finish_reason:
                self.finish[d.index] = d.finish_reason
                self.stop_reason[d.index] = d.stop_reason

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


class ModelService:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        served_name: str,
        defaults: GenerationDefaults,
        chat_template: str | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.defaults = defaults
        self.chat_template = chat_template
        self.created = int(time.time())

    # -- prompts -------------------------------------------------------------------------------------------
    def check_model(self, requested: str | None) -> None:
        if requested and requested != self.served_name:
            raise APIError(
                404, f"The model `{requested}` does not exist. This server serves `{self.served_name}`.", param="model"
            )

    def render_chat(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                chat_template=self.chat_template,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as exc:
            raise APIError(400, f"the chat template could not render these messages: {exc}", param="messages") from exc
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= max(vocab, 1) for t in prompt):
                raise APIError(400, f"token ids must be in [0, {vocab})", param=param)
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        return ids

    def budget(self, prompt_ids: list[int], requested: int | None, param: str = "max_tokens") -> int:
        """Check prompt + output against the context length; return the effective max_tokens."""
        limit = self.engine.max_model_len
        if len(prompt_ids) >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens. Shorten the prompt.",
                param="messages" if param == "max_completion_tokens" else "prompt",
            )
        room = limit - len(prompt_ids)
        if requested is None:
            return room
        if requested > room:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + requested} tokens ({len(prompt_ids)} in the prompt, {requested} "
                f"for the completion). Reduce the prompt or {param}.",
                param=param,
            )
        return requested

    def openai_spec(self, req: _OpenAISampling, max_tokens: int, logprobs: int | None) -> SamplingSpec:
        d = self.defaults
        schema, json_object = None, False
        if req.response_format is not None and req.response_format.type == "json_schema":
            spec = req.response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise APIError(400, "response_format.json_schema.schema is required", param="response_format")
            schema = spec.schema_
        elif req.response_format is not None and req.response_format.type == "json_object":
            json_object = True
        return self._validated(
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
                json_schema=schema,
                json_object=json_object,
            )
        )

    def _validated(self, spec: SamplingSpec) -> SamplingSpec:
        try:
            self.engine.validate(spec)
        except EngineRequestError as exc:
            raise APIError(400, str(exc)) from exc
        return spec

    # -- generation ----------------------------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], spec: SamplingSpec) -> AsyncIterator[EngineOutput]:
        request_id = uuid.uuid4().hex
        try:
            async for out in self.engine.generate(request_id, prompt_ids, spec):
                yield out
        except EngineRequestError as exc:
            raise APIError(400, str(exc)) from exc
        except EngineDeadError as exc:
            raise APIError(503, f"the engine is not available: {exc}") from exc
        except EngineError as exc:
            raise APIError(424, f"generation failed: {exc}") from exc

    async def collect(self, prompt_ids: list[int], spec: SamplingSpec) -> Generation:
        gen = Generation(n=spec.n)
        async for out in self.stream(prompt_ids, spec):
            gen.add(out)
        return gen

    # -- OpenAI chat ---------------------------------------------------------------------------------------
    def prepare_chat(self, req: ChatCompletionRequest) -> tuple[list[int], SamplingSpec]:
        self.check_model(req.model)
        ids = self.render_chat(req)
        max_tokens = self.budget(
            ids, req.token_budget(), "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        )
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return ids, self.openai_spec(req, max_tokens, logprobs)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        ids, spec = self.prepare_chat(req)
        gen = await self.collect(ids, spec)
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
            "model": self.served_name,
            "choices": choices,
            "usage": _usage(gen.prompt_tokens, gen.completion_tokens),
        }

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        ids, spec = self.prepare_chat(req)
        rid, created = _id("chatcmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            body: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.served_name,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = usage
            return _sse(body)

        return self._guarded_stream(self._chat_events(ids, spec, req, chunk, include_usage))

    async def _chat_events(
        self, ids: list[int], spec: SamplingSpec, req: ChatCompletionRequest, chunk: Any, include_usage: bool
    ) -> AsyncIterator[str]:
        yield chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(spec.n)
            ]
        )
        completion = 0
        prompt_tokens = len(ids)
        async for out in self.stream(ids, spec):
            prompt_tokens = out.prompt_tokens or prompt_tokens
            choices = []
            for d in out.deltas:
                completion += len(d.tokens)
                if not d.text and not d.finish_reason and not d.tokens:
                    continue
                choices.append(
                    {
                        "index": d.index,
                        "delta": {"content": d.text} if d.text or not d.finish_reason else {},
                        "logprobs": {"content": [_chat_lp(t) for t in d.tokens]} if req.logprobs else None,
                        "finish_reason": _openai_finish(d.finish_reason),
                        **({"stop_reason": d.stop_reason} if d.finish_reason else {}),
                    }
                )
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], _usage(prompt_tokens, completion))

    # -- OpenAI completions --------------------------------------------------------------------------------
    def prepare_completion(self, req: CompletionRequest) -> list[tuple[list[int], SamplingSpec]]:
        self.check_model(req.model)
        jobs = []
        for prompt in req.prompts():
            ids = self.encode(prompt)
            jobs.append((ids, self.openai_spec(req, self.budget(ids, req.max_tokens), req.logprobs)))
        return jobs

    async def completion(self, req: CompletionRequest) -> dict[str, Any]:
        jobs = self.prepare_completion(req)
        choices, prompt_total, completion_total = [], 0, 0
        for p, (ids, spec) in enumerate(jobs):
            gen = await self.collect(ids, spec)
            prompt_total += gen.prompt_tokens
            completion_total += gen.completion_tokens
            prefix = self.tokenizer.decode(ids) if req.echo else ""
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
            "model": self.served_name,
            "choices": choices,
            "usage": _usage(prompt_total, completion_total),
        }

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        jobs = self.prepare_completion(req)
        return self._guarded_stream(self._completion_events(jobs, req))

    async def _completion_events(
        self, jobs: list[tuple[list[int], SamplingSpec]], req: CompletionRequest
    ) -> AsyncIterator[str]:
        rid, created = _id("cmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        prompt_total = completion_total = 0
        for p, (ids, spec) in enumerate(jobs):
            if req.echo:
                for i in range(spec.n):
                    yield _sse(self._cmpl_chunk(rid, created, p * spec.n + i, self.tokenizer.decode(ids), None, None))
            async for out in self.stream(ids, spec):
                for d in out.deltas:
                    completion_total += len(d.tokens)
                    if d.text or d.finish_reason:
                        lp = _completion_lp(list(d.tokens)) if req.logprobs is not None else None
                        yield _sse(self._cmpl_chunk(rid, created, p * spec.n + d.index, d.text, lp, d.finish_reason))
            prompt_total += len(ids)
        if include_usage:
            yield _sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.served_name,
                    "choices": [],
                    "usage": _usage(prompt_total, completion_total),
                }
            )

    def _cmpl_chunk(self, rid: str, created: int, index: int, text: str, lp: Any, finish: str | None) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.served_name,
            "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": _openai_finish(finish)}],
        }

    async def _guarded_stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """SSE with in-band errors: once the 200 is sent, a failure becomes an error event, then [DONE]."""
        try:
            async for event in events:
                yield event
        except APIError as exc:
            log.warning("stream failed: %s", exc.message)
            yield _sse(exc.openai_body())
        yield "data: [DONE]\n\n"

    # -- LMI -----------------------------------------------------------------------------------------------
    def prepare_lmi(self, req: LmiRequest) -> tuple[list[int], SamplingSpec]:
        p = req.parameters
        ids = self.encode(req.inputs, param="inputs")
        max_tokens = self.budget(ids, p.max_new_tokens, "parameters.max_new_tokens")
        sampling = p.do_sample is True or (p.do_sample is None and (p.temperature or 0) > 0)
        stop = (p.stop_sequences,) if isinstance(p.stop_sequences, str) else tuple(p.stop_sequences or ())
        want_lp = p.details or req.stream or p.top_n_tokens is not None
        spec = SamplingSpec(
            max_tokens=max_tokens,
            seed=p.seed,
            stop=stop,
            temperature=(p.temperature if p.temperature is not None else self.defaults.temperature or 1.0)
            if sampling
            else 0.0,
            top_p=p.top_p if p.top_p is not None else 1.0,
            top_k=max(p.top_k or 0, 0),
            repetition_penalty=p.repetition_penalty or 1.0,
            logprobs=(p.top_n_tokens or 0) if want_lp else None,
            prompt_logprobs=0 if p.decoder_input_details else None,
            ignore_eos=bool(p.ignore_eos_token),
        )
        return ids, self._validated(_with_extras(spec, p.model_extra or {}))

    async def lmi(self, req: LmiRequest) -> dict[str, Any]:
        ids, spec = self.prepare_lmi(req)
        gen = await self.collect(ids, spec)
        p = req.parameters
        text = (req.inputs if p.return_full_text else "") + gen.texts[0]
        body: dict[str, Any] = {"generated_text": text}
        if p.details or p.decoder_input_details:
            body["details"] = self._lmi_details(gen, req, spec)
        return body

    async def lmi_stream(self, req: LmiRequest) -> AsyncIterator[str]:
        ids, spec = self.prepare_lmi(req)
        return self._lmi_events(ids, spec, req)

    async def _lmi_events(self, ids: list[int], spec: SamplingSpec, req: LmiRequest) -> AsyncIterator[str]:
        gen = Generation(n=1)
        try:
            async for out in self.stream(ids, spec):
                gen.add(out)
                for d in out.deltas:
                    for i, tok in enumerate(d.tokens):
                        line: dict[str, Any] = {"token": _lmi_token(tok)}
                        if d.finish_reason and i == len(d.tokens) - 1:
                            line["generated_text"] = (
                                req.inputs if req.parameters.return_full_text else ""
                            ) + gen.texts[0]
                            line["details"] = self._lmi_details(gen, req, spec)
                        yield json.dumps(line) + "\n"
        except APIError as exc:
            log.warning("stream failed: %s", exc.message)
            yield (
                json.dumps(
                    {
                        "token": {"id": -1, "text": "", "log_prob": -1, "special_token": True},
                        "generated_text": None,
                        "error": exc.message,
                        "code": exc.status,
                        "details": {
                            "finish_reason": "error",
                            "generated_tokens": gen.completion_tokens,
                            "input_length": len(ids),
                        },
                    }
                )
                + "\n"
            )

    def _lmi_details(self, gen: Generation, req: LmiRequest, spec: SamplingSpec) -> dict[str, Any]:
        finish = gen.finish[0]
        if finish == "stop" and isinstance(gen.stop_reason[0], str):
            finish_lmi = "stop_sequence"
        else:
            finish_lmi = LMI_FINISH.get(finish or "", finish or "length")
        details: dict[str, Any] = {
            "finish_reason": finish_lmi,
            "generated_tokens": gen.completion_tokens,
            "inputs": req.inputs,
            "input_length": gen.prompt_tokens,
            "seed": spec.seed,
            "tokens": [_lmi_token(t) for t in gen.tokens[0]],
        }
        if req.parameters.top_n_tokens:
            details["top_tokens"] = [
                [{"id": i, "text": s, "log_prob": lp} for i, s, lp in t.top] for t in gen.tokens[0]
            ]
        if req.parameters.decoder_input_details and gen.prompt_logprobs is not None:
            details["prefill"] = [
                {"id": t.id, "text": t.text, "log_prob": t.logprob} if t else None for t in gen.prompt_logprobs
            ]
        return details


def _with_extras(spec: SamplingSpec, extras: Mapping[str, Any]) -> SamplingSpec:
    """LMI passes vLLM-only parameters (``min_p``, ``presence_penalty`` …) through to the engine."""
    if not extras:
        return spec
    known = {f for f in SamplingSpec.__dataclass_fields__ if f != "extra"}
    direct = {k: v for k, v in extras.items() if k in known}
    rest = {k: v for k, v in extras.items() if k not in known}
    try:
        return replace(spec, **direct, extra=rest)
    except TypeError as exc:
        raise APIError(400, f"invalid parameter: {exc}", param="parameters") from exc


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


def _lmi_token(t: TokenInfo) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "log_prob": t.logprob}

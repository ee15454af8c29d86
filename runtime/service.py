"""The model service: turns validated API requests into engine calls and engine output into API responses.

One instance serves one model. It owns the tokenizer (prompts are rendered and tokenized here, so length
limits are checked before the engine sees a request), the engine, and the served model name. Every generation
goes through :meth:`ModelService.stream`, which enforces ``predict_timeout``, aborts the engine request when its
consumer goes away, and feeds the latency metrics. LMI response forms live in :mod:`runtime.lmi`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
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
from runtime.metrics import Metrics, RequestTimer
from runtime.protocol import ChatCompletionRequest, CompletionRequest, _OpenAISampling

log = logging.getLogger("kiln.runtime")
# Engine parameter names (SamplingSpec's, vLLM's) as the OpenAI APIs call them.
OPENAI_NAMES = {"structured": "response_format", "max_tokens": "max_tokens"}
OPENAI_CHAT_NAMES = {**OPENAI_NAMES, "logprobs": "top_logprobs"}
STRUCTURED_CONSTRAINTS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


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


@dataclass(frozen=True)
class ServiceOptions:
    """The serving settings the request path needs (from the resolved configuration)."""

    predict_timeout: float = 240.0
    output_formatter: str = "json"  # LMI: json | jsonlines | sse
    tgi_compat: bool = False


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
        options: ServiceOptions | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.defaults = defaults
        self.chat_template = chat_template
        self.options = options or ServiceOptions()
        self.metrics = metrics
        self.created = int(time.time())
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())

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
        prompt_param = "messages" if param == "max_completion_tokens" else "prompt"
        if param.startswith("parameters."):
            prompt_param = "inputs"
        if len(prompt_ids) >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens. Shorten the prompt.",
                param=prompt_param,
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

    def openai_spec(
        self, req: _OpenAISampling, max_tokens: int, logprobs: int | None, chat: bool = False
    ) -> SamplingSpec:
        d = self.defaults
        structured = self._structured(req)
        extra: dict[str, Any] = {}
        if req.logit_bias:
            try:
                extra["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError as exc:
                raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from exc
        return self.validated(
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

    @staticmethod
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

    def validated(self, spec: SamplingSpec, names: Callable[[str], str] = str) -> SamplingSpec:
        """Let the engine refuse what it cannot do; ``names`` maps engine parameter names to the API's fields."""
        try:
            self.engine.validate(spec)
        except EngineRequestError as exc:
            raise APIError(400, str(exc), param=names(exc.param) if exc.param else None) from exc
        return spec

    # -- generation ----------------------------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], spec: SamplingSpec, arrived: float) -> AsyncIterator[EngineOutput]:
        """Run one request in the engine. The request is aborted in the engine when ``predict_timeout`` (counted
        from ``arrived``) passes, and when this iterator is closed or cancelled before the engine finished."""
        request_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        timer = RequestTimer(self.metrics, arrived)
        expired = False
        aborts: list[asyncio.Task[None]] = []  # keeps the abort task referenced until it ran

        def expire() -> None:
            nonlocal expired
            expired = True
            aborts.append(loop.create_task(self.engine.abort(request_id)))

        remaining = self.options.predict_timeout - (time.perf_counter() - arrived)
        deadline = loop.call_later(max(remaining, 0.0), expire)
        outputs = self.engine.generate(request_id, prompt_ids, spec)
        finished = False
        try:
            async for out in outputs:
                if expired:
                    break
                timer.observe(out)
                finished = out.finished
                yield out
        except EngineRequestError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc  # mid-stream: in-band, name as the engine did
        except EngineDeadError as exc:
            raise APIError(503, f"the engine is not available: {exc}") from exc
        except EngineError as exc:
            raise APIError(424, f"generation failed: {exc}") from exc
        finally:
            deadline.cancel()
            timer.done()
            if not finished:
                # The consumer went away (client disconnect, cancelled task) or the deadline passed: free the
                # engine's slot. Shielded, because a cancelled consumer may be cancelled again at every await.
                await asyncio.shield(self._release(outputs, request_id))
        if expired and not finished:
            raise APIError(
                408,
                f"the request did not finish within predict_timeout={self.options.predict_timeout:g}s",
                param="predict_timeout",
            )

    async def _release(self, outputs: AsyncIterator[EngineOutput], request_id: str) -> None:
        aclose = getattr(outputs, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            await self.engine.abort(request_id)

    async def collect(self, prompt_ids: list[int], spec: SamplingSpec, arrived: float) -> Generation:
        gen = Generation(n=spec.n)
        async for out in self.stream(prompt_ids, spec, arrived):
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
        return ids, self.openai_spec(req, max_tokens, logprobs, chat=True)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        arrived = time.perf_counter()
        ids, spec = self.prepare_chat(req)
        gen = await self.collect(ids, spec, arrived)
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
        arrived = time.perf_counter()
        ids, spec = self.prepare_chat(req)
        return self._guarded_stream(self._chat_events(ids, spec, req, arrived))

    async def _chat_events(
        self, ids: list[int], spec: SamplingSpec, req: ChatCompletionRequest, arrived: float
    ) -> AsyncIterator[str]:
        rid, created = _id("chatcmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)
        # The constant part of every chunk, serialized once: only the choices change per chunk.
        head = json.dumps(
            {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.served_name},
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
        async for out in self.stream(ids, spec, arrived):
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
    def prepare_completion(self, req: CompletionRequest) -> list[tuple[list[int], SamplingSpec]]:
        self.check_model(req.model)
        jobs = []
        for prompt in req.prompts():
            ids = self.encode(prompt)
            jobs.append((ids, self.openai_spec(req, self.budget(ids, req.max_tokens), req.logprobs)))
        return jobs

    async def completion(self, req: CompletionRequest) -> dict[str, Any]:
        arrived = time.perf_counter()
        jobs = self.prepare_completion(req)
        # A list of prompts runs concurrently: the engine batches them.
        gens = await asyncio.gather(*(self.collect(ids, spec, arrived) for ids, spec in jobs))
        choices = []
        for p, ((ids, spec), gen) in enumerate(zip(jobs, gens, strict=True)):
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
            "usage": _usage(sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens)),
        }

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        arrived = time.perf_counter()
        jobs = self.prepare_completion(req)
        return self._guarded_stream(self._completion_events(jobs, req, arrived))

    async def _completion_events(
        self, jobs: list[tuple[list[int], SamplingSpec]], req: CompletionRequest, arrived: float
    ) -> AsyncIterator[str]:
        rid, created = _id("cmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = json.dumps(
            {"id": rid, "object": "text_completion", "created": created, "model": self.served_name},
            separators=(",", ":"),
        )[:-1]

        def chunk(index: int, text: str, lp: Any, finish: str | None) -> str:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": _openai_finish(finish)}
            return f'data: {head},"choices":[{json.dumps(choice, separators=(",", ":"))}]}}\n\n'

        prompt_total = completion_total = 0
        for p, (ids, spec) in enumerate(jobs):
            if req.echo:
                for i in range(spec.n):
                    yield chunk(p * spec.n + i, self.tokenizer.decode(ids), None, None)
            async for out in self.stream(ids, spec, arrived):
                for d in out.deltas:
                    completion_total += len(d.tokens)
                    if d.text or d.finish_reason:
                        lp = _completion_lp(list(d.tokens)) if req.logprobs is not None else None
                        yield chunk(p * spec.n + d.index, d.text, lp, d.finish_reason)
            prompt_total += len(ids)
        if include_usage:
            yield f'data: {head},"choices":[],"usage":{json.dumps(_usage(prompt_total, completion_total))}}}\n\n'

    async def _guarded_stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
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

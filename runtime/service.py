"""The protocol-neutral generation core: one model, its tokenizer and its engine, behind every API.

One instance serves one model. It owns the tokenizer (prompts are rendered and tokenized here, so length limits are
checked before the engine sees a request), the engine, and the served model name. Every generation goes through
:meth:`ModelService.stream`, which enforces ``predict_timeout``, aborts the engine request when its consumer goes
away, and feeds the latency metrics. The APIs encode requests and responses beside each other: OpenAI in
:mod:`runtime.api.openai`, LMI in :mod:`runtime.api.lmi`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.adapters import Adapters
from runtime.engines.base import (
    AdapterRef,
    EmbedSpec,
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

log = logging.getLogger("kiln.runtime")


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


# The default max_prompt_chars, per token of context: far above any tokenizer's average (about 4 characters per
# token for English text), so only a prompt that cannot fit is refused unread.
CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class ServiceOptions:
    """The serving settings the request path needs (from the resolved configuration, whose defaults hold)."""

    predict_timeout: float
    output_formatter: str  # LMI: json | jsonlines | sse
    tgi_compat: bool
    normalize: bool  # embeddings: L2-normalize unless a request says otherwise
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN x the model's context, checked before tokenizing
    max_stop_sequences: int | None = None  # None: no limit


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
        options: ServiceOptions,
        chat_template: str | None = None,
        metrics: Metrics | None = None,
        root: str = "",
        vocab_size: int | None = None,
        adapters: Adapters | None = None,
        task: str = "generate",
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.defaults = defaults
        self.chat_template = chat_template
        self.options = options
        self.metrics = metrics
        self.root = root or served_name  # where the model came from (OpenAI model cards' "root")
        # Prompt token ids go up to the model's vocabulary (config.json), which may be larger than the tokenizer's.
        self.vocab_size = max(vocab_size or 0, len(tokenizer))
        self.created = int(time.time())
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self.adapters = adapters  # None: LoRA is off (enable_lora=false)
        self.task = task  # artifacts/targets.py: TASKS; the routes of the other task refuse (require)

    def require(self, task: str) -> None:
        """Refuse a request for the other task: an embedding model generates no text, and a generation model
        (its engine started to generate) gives no embeddings."""
        if task == self.task:
            return
        if self.task == "embed":
            raise APIError(
                400,
                f"{self.served_name!r} is an embedding model (target.task=embed): it answers POST /v1/embeddings "
                'and POST /invocations with {"inputs": …}, not text generation',
                param="model",
            )
        raise APIError(
            400,
            f"{self.served_name!r} is a text-generation model (target.task=generate): embeddings come from an "
            "embedding artifact (build one with target.task=embed)",
            param="model",
        )

    # -- prompts -------------------------------------------------------------------------------------------
    def check_model(self, requested: str | None) -> AdapterRef | None:
        """The OpenAI ``model`` field: the base (None), a registered adapter, or 404 as vLLM answers."""
        if not requested or requested == self.served_name:
            return None
        if self.adapters is not None and (reg := self.adapters.get(requested)) is not None:
            return reg.ref
        known = [self.served_name, *(r.ref.name for r in self.adapters.all())] if self.adapters else []
        served = f"one of {', '.join(f'`{k}`' for k in known)}" if len(known) > 1 else f"`{self.served_name}`"
        raise APIError(404, f"The model `{requested}` does not exist. This server serves {served}.", param="model")

    def model_name(self, spec: SamplingSpec) -> str:
        """The ``model`` a response names: the adapter the request ran with, else the served model."""
        return spec.adapter.name if spec.adapter is not None else self.served_name

    def adapter(self, name: str, param: str) -> AdapterRef | None:
        """An LMI ``adapters`` name ("" is the base model); an unregistered one is 424, as LMI answers."""
        if not name:
            return None
        if self.adapters is not None and (reg := self.adapters.get(name)) is not None:
            return reg.ref
        loaded = ", ".join(r.ref.name for r in self.adapters.all()) if self.adapters else ""
        why = f"registered: {loaded}" if loaded else "no LoRA adapters are registered on this server"
        raise APIError(424, f"Adapter {name!r} is not registered ({param}); {why}", param=param)

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None) or ""
        if any(m.get("role") == "developer" for m in messages) and "developer" not in str(template):
            messages = _developer_as_system(messages)
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
                **template_kwargs,
            )
        except Exception as exc:
            raise APIError(400, f"the chat template could not render these messages: {exc}", param="messages") from exc
        self._check_chars(text, "messages")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_chars(self, text: str, param: str) -> None:
        """Refuse a prompt no context could hold before the tokenizer spends CPU on it (a 1 M-character prompt takes
        seconds to tokenize only to be refused for its length)."""
        limit = self.options.max_prompt_chars or CHARS_PER_TOKEN * self.engine.max_model_len
        if len(text) > limit:
            raise APIError(
                400,
                f"the prompt has {len(text)} characters, more than max_prompt_chars={limit} (this model's context is "
                f"{self.engine.max_model_len} tokens); shorten it",
                param=param,
            )

    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            self._check_chars(prompt, param)
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            vocab = self.vocab_size
            if any(t < 0 or t >= max(vocab, 1) for t in prompt):
                raise APIError(400, f"token ids must be in [0, {vocab})", param=param)
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        return ids

    def budget(self, prompt_ids: list[int], requested: int | None, param: str = "max_tokens") -> int:
        """Check the prompt and ``requested`` against the context length; return the effective max_tokens. As vLLM
        does, a request for more than the room left after the prompt gets that room (the answer says "length"
        when it is cut); only one that could never fit (more than the whole context) is refused."""
        limit = self.engine.max_model_len
        prompt_param = "messages" if param == "max_completion_tokens" else "prompt"
        if param.startswith("parameters."):
            prompt_param = "inputs"
        if requested is not None and requested > limit:
            raise APIError(
                400,
                f"{param}={requested} is more than this model's maximum context length ({limit} tokens). "
                f"Request at most {limit - len(prompt_ids)} tokens.",
                param=param,
            )
        if len(prompt_ids) >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens. Shorten the prompt.",
                param=prompt_param,
            )
        room = limit - len(prompt_ids)
        return room if requested is None else min(requested, room)

    def validated(self, spec: SamplingSpec, names: Callable[[str], str] = str) -> SamplingSpec:
        """Let the engine refuse what it cannot do; ``names`` maps engine parameter names to the API's fields."""
        most = self.options.max_stop_sequences
        if most is not None and len(spec.stop) > most:
            raise APIError(
                400, f"{len(spec.stop)} stop sequences, more than max_stop_sequences={most}", param=names("stop")
            )
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
        adapter = spec.adapter
        if adapter is not None and (self.adapters is None or not self.adapters.acquire(adapter)):
            raise APIError(404, f"adapter {adapter.name!r} was unregistered before this request started")
        try:
            async for out in self._stream(request_id, prompt_ids, spec, arrived):
                yield out
        finally:
            if adapter is not None and self.adapters is not None:
                await asyncio.shield(self.adapters.release(adapter))

    async def _stream(
        self, request_id: str, prompt_ids: list[int], spec: SamplingSpec, arrived: float
    ) -> AsyncIterator[EngineOutput]:
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

    async def embed(self, inputs: list[list[int]], spec: EmbedSpec, arrived: float, param: str) -> list[list[float]]:
        """One vector per input, in order (the engine batches them); bounded by ``predict_timeout``. ``param``
        names the request field holding the inputs (their length limit is checked here)."""
        limit = self.engine.max_model_len
        for i, ids in enumerate(inputs):
            if limit and len(ids) > limit:
                where = f"{param}[{i}]" if len(inputs) > 1 else param
                raise APIError(
                    400,
                    f"This model's maximum context length is {limit} tokens, but {where} has {len(ids)} tokens. "
                    "Shorten the input.",
                    param=param,
                )
        remaining = max(self.options.predict_timeout - (time.perf_counter() - arrived), 0.0)
        calls = [self.engine.embed(uuid.uuid4().hex, ids, spec) for ids in inputs]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*calls), remaining))
        except TimeoutError:
            raise APIError(
                408,
                f"the request did not finish within predict_timeout={self.options.predict_timeout:g}s",
                param="predict_timeout",
            ) from None
        except EngineRequestError as exc:
            raise APIError(400, str(exc), param=exc.param or param) from exc
        except EngineDeadError as exc:
            raise APIError(503, f"the engine is not available: {exc}") from exc
        except EngineError as exc:
            raise APIError(424, f"embedding failed: {exc}") from exc

    async def collect(self, prompt_ids: list[int], spec: SamplingSpec, arrived: float) -> Generation:
        gen = Generation(n=spec.n)
        async for out in self.stream(prompt_ids, spec, arrived):
            gen.add(out)
        return gen


def _developer_as_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's ``developer`` role for a chat template that does not know it: a system message, all system messages
    merged into one at the start (templates often accept a system message only there), as vLLM renders it."""
    system = [m for m in messages if m.get("role") in ("system", "developer")]
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    texts = [str(m.get("content") or "") for m in system]
    if len(system) == 1 and messages[0] is system[0]:
        return [{**system[0], "role": "system"}, *rest]
    return [{"role": "system", "content": "\n\n".join(t for t in texts if t)}, *rest]

"""The engine interface every serving backend implements, and the types that cross it.

The HTTP layer speaks only this interface: it tokenizes and renders prompts itself, hands the engine token ids
and a :class:`SamplingSpec`, and receives :class:`EngineOutput` deltas (new text and tokens per sequence) as the
engine produces them. Continuous batching is the engine's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class EngineError(Exception):
    """A request failed inside the engine (the engine itself may still be healthy)."""


class EngineDeadError(EngineError):
    """The engine is gone; the process should report unhealthy and exit so it can be restarted."""


class EngineRequestError(EngineError):
    """The engine refused a request as invalid (maps to HTTP 400); ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingSpec:
    """Engine-neutral sampling parameters (already validated by the HTTP layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token plus the top k
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured output, in vLLM's StructuredOutputsParams terms: one constraint ("json" schema, "json_object",
    # "regex", "choice", "grammar") plus options such as "disable_any_whitespace". None: unconstrained.
    structured: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # engine-specific pass-through


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None = None
    top: tuple[tuple[int, str, float], ...] = ()  # (id, text, logprob) of the most likely alternatives


@dataclass(frozen=True)
class SeqDelta:
    """What one sequence (``index`` < n) produced since the previous output."""

    index: int
    text: str
    tokens: tuple[TokenInfo, ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class EngineOutput:
    deltas: tuple[SeqDelta, ...]
    prompt_tokens: int
    finished: bool
    prompt_logprobs: tuple[TokenInfo | None, ...] | None = None
    cached_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float | None = None  # 0..1, where the engine reports it


@dataclass(frozen=True)
class EngineSettings:
    """Engine settings resolved from the artifact's serving defaults and the operator's configuration."""

    model_dir: Path
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 32
    tensor_parallel_degree: int = 1
    enforce_eager: bool = False
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    kv_cache_gib: float | None = None  # KV cache budget (CPU hosts need one)
    device: str = "cpu"
    extra: Mapping[str, Any] = field(default_factory=dict)  # engine-native keys passed through
    compile_cache: Path | None = None  # writable copy of the artifact's precompiled cache (runtime/compile_cache.py)


class Engine(Protocol):
    """A text-generation engine with continuous batching and streaming."""

    name: str
    max_model_len: int

    async def start(self) -> None:
        """Load the model; may take minutes. Called once, before any request."""
        ...

    def validate(self, spec: SamplingSpec) -> None:
        """Raise EngineRequestError if the engine would refuse ``spec`` (checked before a response starts)."""
        ...

    def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> AsyncIterator[EngineOutput]:
        """Stream outputs for one request. Cancelling the iterator aborts the request in the engine."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise EngineDeadError when the engine can no longer serve."""
        ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...

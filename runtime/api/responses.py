"""What the server answers, as pydantic models for the OpenAPI document: the 200 bodies of every route (vLLM's wire
format for the OpenAI routes), both error shapes, and the vLLM routes kiln does not serve (:data:`NOT_SERVED`).

These models describe; they are not used to build responses. Every object allows fields beyond those named (as
OpenAI's and vLLM's do), so a field added to a response stays within the document.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- errors -----------------------------------------------------------------------------------------------------


class ErrorInfo(_Open):
    message: str
    type: str
    param: str | None
    code: int


class OpenAIError(_Open):
    """OpenAI's (and vLLM's) error body."""

    error: ErrorInfo


class LmiError(_Open):
    """LMI's error body (requests in LMI's ``inputs`` schema, and refusals for capacity on the SageMaker routes)."""

    error: str
    code: int
    param: str | None = None


# -- OpenAI (vLLM's wire format) -------------------------------------------------------------------------------


class Usage(_Open):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class ChatLogProb(_Open):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(_Open):
    content: list[ChatLogProbContent] | None = None


class ChatMessageOut(_Open):
    role: str
    content: str | None = None


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogProbs(_Open):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class TextCompletion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatDelta(_Open):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Open):
    index: int
    delta: ChatDelta
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Open):
    """One server-sent event of a chat stream (the last, with stream_options.include_usage, has no choices)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(_Open):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None


class CompletionChunk(_Open):
    """One server-sent event of a completion stream."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


# -- tokenizer (vLLM's /tokenize, /detokenize, /tokenizer_info) ------------------------------------------------


class TokenizeResponse(_Open):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Open):
    prompt: str


class TokenizerInfoResponse(_Open):
    """The tokenizer's configuration, as its ``tokenizer_config.json`` holds it (file paths left out)."""

    tokenizer_class: str


# -- LMI ------------------------------------------------------------------------------------------------------


class LmiToken(_Open):
    id: int
    text: str
    log_prob: float | None = None


class LmiDetails(_Open):
    finish_reason: str
    generated_tokens: int


class LmiResponse(_Open):
    """``{"generated_text", "details"?}`` (``option.tgi_compat``: the same inside a one-element array)."""

    generated_text: str
    details: LmiDetails | None = None


class LmiStreamLine(_Open):
    """One line of an LMI stream: a token; the last line also carries ``generated_text`` and ``details``."""

    token: LmiToken
    generated_text: str | None = None
    details: dict[str, Any] | None = None


# -- embeddings -------------------------------------------------------------------------------------------------


class Embedding(_Open):
    index: int
    object: Literal["embedding"]
    embedding: list[float] | str  # str: encoding_format=base64 (little-endian float32)


class EmbeddingUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Open):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


# -- health ---------------------------------------------------------------------------------------------------


class Health(_Open):
    status: str
    error: str | None = None


# -- LoRA adapter management (runtime/api/adapters.py) ----------------------------------------------------------


class AdapterInfo(_Open):
    name: str
    src: str
    pin: bool
    preload: bool
    rank: int
    alpha: float
    target_modules: list[str]
    dtype: str | None = None
    digest: str | None = None


class AdapterList(_Open):
    adapters: list[AdapterInfo]


class AdapterStatus(_Open):
    """LMI's ``status`` and SageMaker's standards' ``message``: the same text under both names."""

    status: str
    message: str


# -- vLLM routes kiln does not serve ---------------------------------------------------------------------------

_GENERATION = (
    "kiln serves text generation: POST /v1/chat/completions, POST /v1/completions (embedding artifacts: "
    "POST /v1/embeddings)"
)
# Path pattern (a regular expression matching the whole path) -> what kiln serves instead.
NOT_SERVED: dict[str, str] = {
    r"/v1/responses(/.*)?": f"the Responses API is not served; {_GENERATION} (SageMaker: POST /invocations)",
    r"/v1/messages(/.*)?": f"the Anthropic Messages API is not served; {_GENERATION}",
    r"/v1/(chat/)?completions/(render|derender|batch)": f"only generation is served; {_GENERATION}",
    r"/v2/embed|/pooling|/classify": f"only OpenAI's embeddings route serves pooling models; {_GENERATION}",
    r"/v[12]/score|/score|/v[12]/rerank|/rerank|/generative_scoring": f"scoring and reranking are not served; "
    f"{_GENERATION}",
    r"/v1/audio/.*": f"speech-to-text is not served; {_GENERATION}",
    r"/cohere/.*": f"the Cohere API is not served; {_GENERATION}",
    r"/inference/v1/generate": f"token-in/token-out generation is not served; {_GENERATION}, or POST /invocations",
}
# The adapter management routes exist only with enable_lora=true.
LORA_ROUTES = re.compile(r"/adapters(/.*)?|/models/[^/]+/adapters(/.*)?|/v1/(load|unload)_lora_adapter")
LORA_OFF = (
    "LoRA adapters are off on this server: start it with enable_lora=true (option.enable_lora, "
    "SM_VLLM_ENABLE_LORA=true) to register adapters"
)
_NOT_SERVED = [(re.compile(p), message) for p, message in NOT_SERVED.items()]


def not_served(path: str) -> str | None:
    """The 404 message for a vLLM route kiln does not serve (naming what it serves instead), or for an adapter
    route while LoRA is off; None for others."""
    if LORA_ROUTES.fullmatch(path):
        return f"{path}: {LORA_OFF}"
    for pattern, message in _NOT_SERVED:
        if pattern.fullmatch(path):
            return f"{path} is a vLLM route that kiln does not serve: {message}"
    return None

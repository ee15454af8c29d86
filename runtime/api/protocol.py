"""Request schemas of the HTTP API (pydantic): OpenAI chat and completions, and LMI's ``inputs``/``parameters``.

These models are the validation edge: a wrong type or an out-of-range value becomes a 400 naming the field.
Unknown fields are accepted and ignored, as vLLM does (OpenAI clients send fields a server may not know).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runtime.errors import APIError

MAX_N = 16
MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaSpec(BaseModel):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def constraint(self, param: str) -> dict[str, Any] | None:
        """This format as a structured output constraint (SamplingSpec.structured); None for plain text.
        ``param`` is where the request holds it (named in the error when the schema is missing)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"json_object": True}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise APIError(400, f"{param}.json_schema.schema is required", param=param)
        return {"json": self.json_schema.schema_}


class _OpenAISampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    structured_outputs: dict[str, Any] | None = Field(
        default=None, description="vLLM's structured output constraint and options (json, regex, choice, grammar…)"
    )
    user: str | None = None
    return_token_ids: bool = Field(default=False, description="vLLM: add prompt_token_ids and token_ids")
    allowed_token_ids: list[int] | None = Field(default=None, description="vLLM: generate only these token ids")
    bad_words: list[str] | None = Field(default=None, description="vLLM: words never generated")
    truncate_prompt_tokens: int | None = Field(default=None, ge=1, description="vLLM: keep the prompt's last N tokens")
    use_beam_search: bool = Field(default=False, description="vLLM's beam search: not supported (true is refused)")
    return_tokens_as_token_ids: bool = Field(default=False, description='vLLM: logprob tokens as "token_id:<id>"')

    @field_validator("use_beam_search")
    @classmethod
    def _no_beam_search(cls, value: bool) -> bool:
        if value:
            raise ValueError("beam search is not supported; leave use_beam_search out")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _OpenAISampling:
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            raise ValueError("stream_options can only be set when stream=true")  # as vLLM refuses it
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(description="system, developer, user, assistant, tool, or any role the chat template knows")
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)  # as vLLM joins text parts


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = Field(default=False, description="vLLM: the reply repeats a last assistant message first")
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    # vLLM's default; 0 (with echo) scores the prompt without generating
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class LmiParameters(BaseModel):
    """LMI / TGI generation parameters, plus the vLLM extras LMI passes through. Other keys go to the engine as
    they are, and a key the engine does not know is refused (400) naming it."""

    model_config = ConfigDict(extra="allow")

    max_new_tokens: int = Field(default=30, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    do_sample: bool | None = None
    seed: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop_sequences: str | list[str] | None = None
    stop: str | list[str] | None = Field(default=None, description="TGI's name for stop_sequences")
    details: bool = False
    return_full_text: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    truncate: int | None = Field(default=None, ge=1, description="keep only the last N prompt tokens")
    # vLLM extras
    n: int = Field(default=1, ge=1, le=MAX_N)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos_token: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N, description="generate best_of (>= n), keep the likeliest")
    # Accepted at the one value kiln supports (runtime/api/lmi.py refuses the others, naming them).
    num_beams: int | None = Field(default=None, ge=1, description="1 only: beam search is not supported")
    typical_p: float | None = Field(default=None, gt=0.0, le=1.0, description="1.0 only")
    watermark: bool | None = Field(default=None, description="false only")
    # Structured output (at most one constraint in all): vLLM's guided_* names, OpenAI's response_format, and
    # vLLM's structured_outputs (a constraint plus options such as disable_any_whitespace).
    guided_json: dict[str, Any] | str | None = Field(default=None, description="a JSON schema (object or string)")
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    adapters: str | list[str] | None = Field(default=None, description="LoRA adapter name (also beside inputs)")

    def stop_strings(self) -> tuple[str, ...]:
        out: list[str] = []
        for v in (self.stop_sequences, self.stop):
            if v is not None:
                out.extend([v] if isinstance(v, str) else v)
        return tuple(out)


class LmiRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    inputs: str = Field(min_length=1)
    parameters: LmiParameters = Field(default_factory=LmiParameters)
    stream: bool = False
    adapters: str | list[str] | None = Field(default=None, description='LoRA adapter name(s); "": the base model')

    @model_validator(mode="after")
    def _check(self) -> LmiRequest:
        if self.stream and self.parameters.decoder_input_details:
            raise ValueError("parameters.decoder_input_details is not supported with stream=true")
        if self.stream and self.parameters.n > 1:
            raise ValueError("parameters.n > 1 is not supported with stream=true")
        return self

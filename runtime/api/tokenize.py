"""vLLM's tokenizer routes: ``/tokenize`` (a prompt, or chat messages rendered by the chat template), ``/detokenize``
and ``/tokenizer_info``, with vLLM 0.32's request fields and response bodies. Clients use them to count tokens and
to send token ids (lm-eval's ``local-completions`` probes ``/tokenizer_info``).

Unlike vLLM, kiln always serves ``/tokenizer_info`` (vLLM only with ``--enable-tokenizer-info-endpoint``): it tells
nothing the artifact does not hold.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from runtime.api.protocol import ChatMessage
from runtime.errors import APIError
from runtime.service import ModelService


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(
        default=True, description="If true (the default), special tokens (e.g. BOS) are added to the prompt."
    )
    return_token_strs: bool | None = Field(default=False, description="Also return the token strings.")


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = Field(default=True, description="Add the chat template's generation prompt.")
    return_token_strs: bool | None = Field(default=False, description="Also return the token strings.")
    continue_final_message: bool = Field(
        default=False,
        description="Leave the final message open-ended (no end-of-turn tokens); not with add_generation_prompt.",
    )
    add_special_tokens: bool = Field(
        default=False, description="Add special tokens (e.g. BOS) on top of those the chat template adds."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Additional keyword arguments for the chat template renderer."
    )


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="Token ids, each in [0, vocabulary size).")


TOKENIZE_SCHEMAS: dict[str, type[BaseModel]] = {
    "TokenizeCompletionRequest": TokenizeCompletionRequest,
    "TokenizeChatRequest": TokenizeChatRequest,
}


def tokenize(svc: ModelService, req: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
    svc.check_model(req.model)
    if isinstance(req, TokenizeChatRequest):
        if req.continue_final_message and req.add_generation_prompt:  # as vLLM
            raise APIError(
                400,
                "cannot set both continue_final_message and add_generation_prompt to true",
                param="continue_final_message",
            )
        kwargs = dict(req.chat_template_kwargs or {})
        if req.continue_final_message:
            kwargs["continue_final_message"] = True
        # As ModelService.render_chat (what a chat completion's prompt is), special tokens on request (vLLM).
        try:
            text = svc.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in req.messages],
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                chat_template=svc.chat_template,
                **kwargs,
            )
        except Exception as exc:
            raise APIError(400, f"the chat template could not render these messages: {exc}", param="messages") from exc
        ids = list(svc.tokenizer(text, add_special_tokens=req.add_special_tokens)["input_ids"])
    else:
        ids = list(svc.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
    return {
        "count": len(ids),
        "max_model_len": svc.engine.max_model_len,
        "tokens": ids,
        "token_strs": list(svc.tokenizer.convert_ids_to_tokens(ids)) if req.return_token_strs else None,
    }


def detokenize(svc: ModelService, req: DetokenizeRequest) -> dict[str, Any]:
    svc.check_model(req.model)
    vocab = len(svc.tokenizer)
    bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400, f"tokens[{bad}] = {req.tokens[bad]} is not a token id: ids are in [0, {vocab})", param="tokens"
        )
    return {"prompt": svc.tokenizer.decode(req.tokens)}


def tokenizer_info(svc: ModelService) -> dict[str, Any]:
    """vLLM's ``TokenizerInfo``: the tokenizer's ``init_kwargs`` less file paths, made JSON-serializable, with the
    tokenizer class and the chat template kiln renders with."""
    tok = svc.tokenizer
    config = dict(getattr(tok, "init_kwargs", None) or {})
    config.pop("vocab_file", None)
    config.pop("merges_file", None)
    config = {k: v for k, v in _jsonable(config).items() if k not in ("tokenizer_file", "name_or_path")}
    config["tokenizer_class"] = type(tok).__name__
    template = svc.chat_template or getattr(tok, "chat_template", None)
    if template:
        config["chat_template"] = template
    return config


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "content"):  # AddedToken
        return obj.content
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(x) for x in obj]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)

"""The request schemas a benchmark speaks: OpenAI completions and chat, and LMI's ``inputs``/``parameters``.

Each builds the body for one request and reads what the server sent back, streamed (one JSON object per SSE event or
JSON line) or whole. Over SageMaker every schema is posted to the container's ``/invocations``, which kiln's server
and LMI containers both dispatch by schema.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from runtime.bench.workload import Request


@dataclass(frozen=True)
class Options:
    model: str | None  # OpenAI "model": the base model's served name or a LoRA adapter's
    adapter: str | None  # LMI "adapters"
    stream: bool
    ignore_eos: bool
    temperature: float


@dataclass
class Piece:
    """What one streamed object said: a token chunk (``text`` not None), the server's token count, or an error."""

    text: str | None = None
    tokens: int | None = None
    error: str | None = None


class Api:
    name = ""
    path = ""

    def body(self, req: Request, opts: Options) -> dict[str, Any]:
        raise NotImplementedError

    def piece(self, obj: Any) -> Piece:
        """One streamed object."""
        raise NotImplementedError

    def whole(self, obj: Any) -> Piece:
        """A whole (non-streamed) response."""
        raise NotImplementedError


def _error(obj: Any) -> str | None:
    if isinstance(obj, dict) and obj.get("error"):
        err = obj["error"]
        return str(err.get("message", err) if isinstance(err, dict) else err)
    return None


class Completions(Api):
    name, path = "completions", "/v1/completions"

    def body(self, req: Request, opts: Options) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": opts.model,
            "prompt": req.prompt,
            "max_tokens": req.output_len,
            "temperature": opts.temperature,
            "stream": opts.stream,
        }
        if opts.stream:
            body["stream_options"] = {"include_usage": True}
        if opts.ignore_eos:
            body["ignore_eos"] = True
        return body

    def _text(self, choice: dict[str, Any]) -> str:
        return choice.get("text") or ""

    def piece(self, obj: Any) -> Piece:
        if err := _error(obj):
            return Piece(error=err)
        usage = obj.get("usage") or {}
        if choices := obj.get("choices"):
            return Piece(text=self._text(choices[0]), tokens=usage.get("completion_tokens"))
        return Piece(tokens=usage.get("completion_tokens"))

    def whole(self, obj: Any) -> Piece:
        if err := _error(obj):
            return Piece(error=err)
        choices = obj.get("choices") or [{}]
        return Piece(text=self._whole_text(choices[0]), tokens=(obj.get("usage") or {}).get("completion_tokens"))

    def _whole_text(self, choice: dict[str, Any]) -> str:
        return choice.get("text") or ""


class Chat(Completions):
    name, path = "chat", "/v1/chat/completions"

    def body(self, req: Request, opts: Options) -> dict[str, Any]:
        body = super().body(req, opts)
        del body["prompt"], body["max_tokens"]
        return {"messages": [{"role": "user", "content": req.prompt}], "max_completion_tokens": req.output_len, **body}

    def _text(self, choice: dict[str, Any]) -> str:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")

    def _whole_text(self, choice: dict[str, Any]) -> str:
        return (choice.get("message") or {}).get("content") or ""


class Lmi(Api):
    name, path = "lmi", "/invocations"

    def body(self, req: Request, opts: Options) -> dict[str, Any]:
        params: dict[str, Any] = {"max_new_tokens": req.output_len, "details": True}
        if opts.temperature > 0:
            params.update(do_sample=True, temperature=opts.temperature)
        if opts.ignore_eos:
            params["ignore_eos_token"] = True
        body: dict[str, Any] = {"inputs": req.prompt, "parameters": params, "stream": opts.stream}
        if opts.adapter:
            body["adapters"] = opts.adapter
        return body

    def piece(self, obj: Any) -> Piece:
        if err := _error(obj):
            return Piece(error=err)
        details = obj.get("details") or {}
        token = obj.get("token")
        text = (token.get("text") or "") if isinstance(token, dict) else None
        return Piece(text=text, tokens=details.get("generated_tokens"))

    def whole(self, obj: Any) -> Piece:
        if isinstance(obj, list):  # the TGI-compatible form wraps the answer in a list
            obj = obj[0] if obj else {}
        if err := _error(obj):
            return Piece(error=err)
        return Piece(text=obj.get("generated_text") or "", tokens=(obj.get("details") or {}).get("generated_tokens"))


APIS: dict[str, Api] = {a.name: a for a in (Completions(), Chat(), Lmi())}


class Lines:
    """Splits a byte stream into JSON objects: SSE ``data:`` events and JSON lines alike (a multi-byte character
    may be cut between chunks; SSE comments, ``event:`` lines and ``[DONE]`` carry nothing)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""

    def add(self, chunk: bytes) -> Iterator[Any]:
        self._buffer += self._decoder.decode(chunk)
        *lines, self._buffer = self._buffer.split("\n")
        return self._parse(lines)

    def close(self) -> Iterator[Any]:
        rest, self._buffer = self._buffer + self._decoder.decode(b"", final=True), ""
        return self._parse([rest])

    @staticmethod
    def _parse(lines: list[str]) -> Iterator[Any]:
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith((":", "event:", "id:", "retry:")):
                continue
            line = line.removeprefix("data:").strip()
            if line != "[DONE]":
                yield json.loads(line)

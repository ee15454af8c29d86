"""Embeddings: OpenAI's ``POST /v1/embeddings`` and LMI's embedding schema on ``/invocations`` (``{"inputs": str |
[str]}`` -> a bare list of vectors), served by an embedding artifact (``target.task=embed``).

Inputs are tokenized here, as for generation, so a too-long input is refused before the engine sees it; the engine
pools and (by default) L2-normalizes each input's token states into one vector. The response shape is OpenAI's, as
vLLM 0.32 writes it: ``embedding`` holds floats, or with ``encoding_format=base64`` the little-endian float32 bytes.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.engines.base import EmbedSpec
from runtime.errors import APIError
from runtime.service import ModelService


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, plus vLLM's ``use_activation`` (normalization; default: ``normalize``)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, one input's token ids, or a list of token-id lists"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Matryoshka models only")
    user: str | None = None
    use_activation: bool | None = Field(default=None, description="vLLM: L2-normalize (default: option.normalize)")

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        if isinstance(value, list) and any(isinstance(x, list) and not x for x in value):
            raise ValueError("input must not hold an empty token list")
        return value

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if all(isinstance(i, int) for i in x):
            return [list(x)]  # type: ignore[arg-type]
        return list(x)  # type: ignore[arg-type]


class LmiEmbeddingRequest(BaseModel):
    """LMI's embedding body: ``inputs`` is one text or a list of texts."""

    model_config = ConfigDict(extra="allow")

    inputs: str | list[str]

    @field_validator("inputs")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("inputs must not be an empty list")
        return value


def _encode(svc: ModelService, items: list[str | list[int]], param: str) -> list[list[int]]:
    out = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]" if len(items) > 1 else param
        if isinstance(item, str) and not item:
            raise APIError(400, f"{where} is an empty string; embed text with at least one character", param=param)
        out.append(svc.encode(item, param))
    return out


async def embeddings(svc: ModelService, req: EmbeddingRequest) -> dict[str, Any]:
    arrived = time.perf_counter()
    svc.require("embed")
    svc.check_model(req.model)
    ids = _encode(svc, req.inputs(), "input")
    normalize = svc.options.normalize if req.use_activation is None else req.use_activation
    spec = EmbedSpec(normalize=normalize, dimensions=req.dimensions)
    vectors = await svc.embed(ids, spec, arrived, "input")
    tokens = sum(len(i) for i in ids)
    return {
        "id": f"embd-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": svc.served_name,
        "data": [
            {"index": i, "object": "embedding", "embedding": _encoded(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encoded(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    # OpenAI's base64 form: the vector's float32 values, little-endian, base64-encoded (numpy.frombuffer reads it)
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def lmi_embeddings(svc: ModelService, req: LmiEmbeddingRequest) -> list[list[float]]:
    """LMI's answer: the vectors as a bare JSON list, one per input (a single text gives a list of one)."""
    arrived = time.perf_counter()
    items: list[str | list[int]] = [req.inputs] if isinstance(req.inputs, str) else list(req.inputs)
    ids = _encode(svc, items, "inputs")
    return await svc.embed(ids, EmbedSpec(normalize=svc.options.normalize), arrived, "inputs")

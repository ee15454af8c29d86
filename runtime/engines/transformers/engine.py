"""The transformers engine: transformers' own continuous-batching manager, behind kiln's engine interface.

The portable fallback: it needs only torch and transformers, so kiln serves on any machine without vLLM, at a
fraction of vLLM's throughput. The manager runs its generation loop in a background thread and delivers per-token
outputs to the event loop (``register_result_handler``); this module turns them into text deltas, applies stop
strings and aborts cancelled requests.

What the manager cannot do per request is refused up front (``validate``) with the parameter named: penalties,
``min_p``, top-k alternatives in logprobs, prompt logprobs, structured output, and seeds for sampled requests. Its
logprobs are those of the distribution it samples from (after temperature, top-k and top-p): 0.0 under greedy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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

log = logging.getLogger("kiln.runtime.transformers")
CPU_MAX_BATCH_TOKENS = 512
GREEDY_TOP_P = 1e-6
DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}
# Keys that go to from_pretrained rather than to ContinuousBatchingConfig.
LOAD_KEYS = {"attn_implementation", "revision", "trust_remote_code"}
# Context tokens decoded before the generated ones, so tokenizers that drop a leading space decode it right.
DETOK_CONTEXT = 5


def accepted_keys() -> set[str]:
    """Engine-native keys an operator may pass: ContinuousBatchingConfig fields and a few loading options."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return {f.name for f in dataclasses.fields(ContinuousBatchingConfig)} | LOAD_KEYS


class TransformersEngine:
    name = "transformers"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.max_model_len = settings.max_model_len or 0
        self._manager: Any = None
        self._tokenizer: Any = None
        self._eos: set[int] = set()
        self._vocab = 0
        self._queues: dict[str, asyncio.Queue[tuple[int, Any]]] = {}  # request id -> its output queue

    async def start(self) -> None:
        if self.settings.tensor_parallel_degree != 1:
            raise EngineError("the transformers engine serves on one device: tensor_parallel_degree must be 1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        await asyncio.to_thread(self._build)

    def _build(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        s = self.settings
        load = {k: v for k, v in s.extra.items() if k in LOAD_KEYS}
        cb_extra = {k: v for k, v in s.extra.items() if k not in LOAD_KEYS}
        dtype = getattr(torch, DTYPES[s.dtype]) if s.dtype in DTYPES else "auto"
        load.setdefault("attn_implementation", "sdpa")
        model = AutoModelForCausalLM.from_pretrained(str(s.model_dir), dtype=dtype, **load)
        model.to(s.device)  # type: ignore[arg-type]  # transformers types .to() oddly
        model = self._prepare_model(model)
        self._tokenizer = AutoTokenizer.from_pretrained(str(s.model_dir))
        cfg = model.config.get_text_config()
        self._vocab = int(cfg.vocab_size)
        self.max_model_len = s.max_model_len or int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        eos = model.generation_config.eos_token_id if model.generation_config else cfg.eos_token_id
        self._eos = {int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None}
        # Every request sets temperature, top_k and top_p itself; the placeholder values below only make the
        # manager create the per-request processors (it creates none for a value that is a no-op).
        gen = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.9, eos_token_id=sorted(self._eos))
        cb = ContinuousBatchingConfig(
            per_request_processors=True,
            return_logprobs=True,
            max_requests_per_batch=s.max_num_seqs,
            allow_block_sharing=s.enable_prefix_caching is not False,
            **self._cache_size(cfg, model.dtype, cb_extra),
            **cb_extra,
        )
        self._manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self._manager.start()

    def _prepare_model(self, model: Any) -> Any:
        """The loaded model as the batching manager gets it: unchanged here; an engine built on this one shards it."""
        return model

    def _cache_size(self, cfg: Any, dtype: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """KV cache blocks and the per-step token budget, unless the operator set them.

        Left alone, the manager sizes its cache from free device memory, which on a CPU host means most of the RAM;
        and without flash attention it preallocates a dense [batch tokens x cache tokens] mask. So with a KV budget
        (always on CPU: the engine's defaults hook sets one) kiln asks for what the configured concurrency can use
        (max_num_seqs full-length sequences, capped by the budget) and, on CPU, a modest step budget.
        """
        out: dict[str, Any] = {}
        gib = self.settings.kv_cache_gib
        cpu = self.settings.device == "cpu"
        if "num_blocks" not in extra and gib is not None:
            page = int(extra.get("page_size", 256))
            heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            block_bytes = 2 * cfg.num_hidden_layers * heads * head_dim * dtype.itemsize * page
            budget = int(gib * GIB) // block_bytes
            wanted = -(-(self.settings.max_num_seqs or 1) * self.max_model_len // page)
            out["num_blocks"] = max(1, min(budget, wanted))
        if cpu and "max_batch_tokens" not in extra:
            out["max_batch_tokens"] = CPU_MAX_BATCH_TOKENS
        return out

    def validate(self, spec: SamplingSpec) -> None:
        what = "is not supported by the transformers engine"
        unsupported = {
            "presence_penalty": (spec.presence_penalty != 0.0, f"presence_penalty {what}"),
            "frequency_penalty": (spec.frequency_penalty != 0.0, f"frequency_penalty {what}"),
            "repetition_penalty": (spec.repetition_penalty != 1.0, f"repetition_penalty {what}"),
            "min_p": (spec.min_p > 0.0, f"min_p {what}"),
            "min_tokens": (spec.min_tokens > 0, f"min_tokens {what}"),
            "prompt_logprobs": (spec.prompt_logprobs is not None, f"prompt logprobs {what}"),
            "logprobs": (
                bool(spec.logprobs),
                f"top logprobs (alternatives per token) {what}; 0 gives the sampled token's",
            ),
            "structured": (bool(spec.structured), f"structured output {what}"),
            "seed": (spec.seed is not None and spec.temperature > 0, f"a per-request seed for sampling {what}"),
        }
        for param, (bad, message) in unsupported.items():
            if bad:
                raise EngineRequestError(message, param=param)
        if spec.extra:
            key = sorted(spec.extra)[0]
            raise EngineRequestError(f"{key} {what}", param=key)

    def _sampling(self, spec: SamplingSpec) -> dict[str, Any]:
        if spec.temperature == 0.0:
            # Greedy: top-k 1 keeps the most likely token and any tied with it; a vanishing top-p then keeps exactly
            # one of them, the same one every time, so greedy output is deterministic.
            return {"temperature": 1.0, "top_k": 1, "top_p": GREEDY_TOP_P}
        top_k = spec.top_k if spec.top_k > 0 else self._vocab
        return {"temperature": float(spec.temperature), "top_k": int(top_k), "top_p": float(spec.top_p)}

    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> AsyncIterator[EngineOutput]:
        self.validate(spec)
        if self._manager is None:
            raise EngineDeadError("the transformers engine is not running")
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        seqs = [
            _Sequence(f"{request_id}#{i}", i, spec, self._tokenizer, prompt_ids[-DETOK_CONTEXT:]) for i in range(spec.n)
        ]
        eos = sorted((set() if spec.ignore_eos else self._eos) | set(spec.stop_token_ids)) or -1
        self._queues[request_id] = queue
        try:
            for seq in seqs:
                self._manager.register_result_handler(seq.rid, lambda out, i=seq.index: queue.put_nowait((i, out)))
                added = self._manager.add_request(
                    prompt_ids,
                    request_id=seq.rid,
                    max_new_tokens=spec.max_tokens,
                    streaming=True,
                    eos_token_id=eos,
                    **self._sampling(spec),
                )
                if added is None:
                    raise EngineDeadError("the transformers engine is not accepting requests (stopping)")
            while not all(s.finished for s in seqs):
                batch = [await queue.get()]
                while not queue.empty():  # coalesce what already arrived into one output
                    batch.append(queue.get_nowait())
                if any(i < 0 for i, _ in batch):  # abort(): end every sequence still running
                    deltas = [s.abort() for s in seqs if not s.finished]
                    yield EngineOutput(tuple(deltas), len(prompt_ids), True)
                    return
                deltas = [d for i, out in batch if (d := seqs[i].update(out, self._eos)) is not None]
                for seq in seqs:
                    if seq.stopped_early:
                        self._manager.cancel_request(seq.rid)
                        seq.stopped_early, seq.engine_done = False, True
                if deltas:
                    yield EngineOutput(tuple(deltas), len(prompt_ids), all(s.finished for s in seqs))
        finally:
            self._queues.pop(request_id, None)
            self._release([s for s in seqs if not s.engine_done], [s.rid for s in seqs])

    def _release(self, unfinished: list[_Sequence], rids: list[str]) -> None:
        """Cancel what is still running (a disconnect, a timeout, an error) and drop the result handlers."""
        if self._manager is None:
            return
        for seq in unfinished:
            self._manager.cancel_request(seq.rid)
        router = self._manager.output_router
        with router._lock:
            for rid in rids:
                router.result_handlers.pop(rid, None)

    async def embed(self, request_id: str, prompt_ids: list[int], spec: EmbedSpec) -> list[float]:
        raise EngineRequestError("this is a text-generation model: embeddings come from embedding artifacts")

    async def add_adapter(self, adapter: AdapterRef, pin: bool = False) -> None:
        # Not reached: the spec does not say serves_adapters, so enable_lora=true is refused at start-up.
        raise EngineRequestError("the transformers engine does not serve LoRA adapters (use the vllm engine)")

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        return None

    async def abort(self, request_id: str) -> None:
        """End the request: its generate() yields a final "abort" output and cancels its sequences."""
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait((-1, None))

    async def check_health(self) -> None:
        m = self._manager
        if m is None:
            return
        error = m.background_thread_status.fatal_error
        if error is not None or not m.is_running():
            raise EngineDeadError(f"the generation loop stopped: {error or 'thread exited'}")

    def stats(self) -> EngineStats:
        processor = self._manager.batch_processor if self._manager is not None else None
        if processor is None:
            return EngineStats(running=0, waiting=0)
        sched = processor.scheduler
        waiting = len(sched.waiting_requests) + self._manager.input_queue.qsize()
        try:
            usage = 1.0 - float(processor.cache.compute_free_capacity(relative=True))
        except (AttributeError, ZeroDivisionError):
            usage = None
        return EngineStats(running=len(sched.active_requests), waiting=waiting, kv_cache_usage=usage)

    async def shutdown(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            await asyncio.to_thread(manager.stop, True, 10.0)


@dataclass
class _Sequence:
    """One of a request's ``n`` sequences: incremental detokenization, stop strings and the finish reason."""

    rid: str
    index: int
    spec: SamplingSpec
    tokenizer: Any
    context: list[int]
    ids: list[int] = field(default_factory=list)
    n_seen: int = 0
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    prefix: int = 0
    read: int = 0
    finished: bool = False  # no more output for the client
    engine_done: bool = False  # the manager finished it (or was told to cancel it)
    stopped_early: bool = False  # a stop string ended it; the engine must be told to stop

    def __post_init__(self) -> None:
        self.ids = list(self.context)
        self.prefix, self.read = 0, len(self.ids)

    def update(self, out: Any, eos: set[int]) -> SeqDelta | None:
        if self.finished:
            return None
        if out.error is not None:
            self.engine_done = True
            raise EngineError(f"generation failed: {out.error}")
        self.engine_done = out.is_finished()
        new = out.generated_tokens[self.n_seen :]
        self.n_seen = len(out.generated_tokens)
        logprobs = out.logprobs[len(out.logprobs) - len(new) :] if out.logprobs else []
        tokens: list[TokenInfo] = []
        finish: str | None = None
        stop_reason: str | int | None = None
        for k, tid in enumerate(new):
            piece = self._push(int(tid))
            lp = float(logprobs[k]) if k < len(logprobs) and self.spec.logprobs is not None else None
            tokens.append(TokenInfo(id=int(tid), text=piece, logprob=lp))
            self.text += piece
            hit = self._stop_hit(len(piece))
            if hit is not None:
                finish, stop_reason = "stop", hit
                self.stopped_early = True
                break
        if finish is None and out.is_finished():
            finish, stop_reason = self._finish_reason(out, eos)
        self.finished = finish is not None
        return self._delta(tuple(tokens), finish, stop_reason)

    def abort(self) -> SeqDelta:
        self.finished = True
        return self._delta((), "abort", None)

    def _push(self, tid: int) -> str:
        """Incremental detokenization: emit text only once it no longer ends in a partial character."""
        self.ids.append(tid)
        skip = self.spec.skip_special_tokens
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=skip)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def _stop_hit(self, added: int) -> str | None:
        if not self.spec.stop:
            return None
        longest = max(len(s) for s in self.spec.stop)
        start = max(0, len(self.text) - added - longest + 1)
        hits = [(pos, s) for s in self.spec.stop if (pos := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        pos, stop = min(hits)
        self.text = self.text[: pos + len(stop)] if self.spec.include_stop_str_in_output else self.text[:pos]
        return stop

    def _finish_reason(self, out: Any, eos: set[int]) -> tuple[str, int | None]:
        last = int(out.generated_tokens[-1]) if out.generated_tokens else None
        if last is not None and last in self.spec.stop_token_ids:
            return "stop", last
        if last is not None and last in eos and not self.spec.ignore_eos:
            return "stop", None
        return "length", None

    def _delta(self, tokens: tuple[TokenInfo, ...], finish: str | None, stop_reason: str | int | None) -> SeqDelta:
        # Hold back what could be the start of a stop string until it is known not to be one.
        hold = 0 if finish or not self.spec.stop else max(len(s) for s in self.spec.stop) - 1
        end = max(self.sent, len(self.text) - hold)
        text, self.sent = self.text[self.sent : end], end
        return SeqDelta(self.index, text, tokens, finish, stop_reason)

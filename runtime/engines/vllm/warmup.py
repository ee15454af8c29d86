"""The vLLM warm-up that fills a compile cache in the build (the engine's ``compile.warm_up`` hook).

``python -m runtime.warmup`` derives the engine settings exactly as ``serve`` does and calls this. It starts the
engine with those settings and environment, so the cache it fills is the one serving looks up; sends requests that
reach the code vLLM compiles lazily (sampling, logprobs, penalties, several sequences); stops; removes what is not
cache content (lock files, bytecode); and reports this host's compile key (:func:`compile_cache.host_key`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from runtime.engines.base import EngineDeadError, EngineError, EngineSettings, SamplingSpec
from runtime.engines.vllm.compile_cache import cache_files, drop_volatile, host_key, point_engine_at
from runtime.engines.vllm.engine import VllmEngine

log = logging.getLogger("kiln.runtime.warmup")

# Each reaches a different sampler path; some of them torch.compile on first use (e.g. the logprobs rank kernel).
REQUESTS = (
    SamplingSpec(max_tokens=8, temperature=0.0),
    SamplingSpec(max_tokens=8, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=1),
    SamplingSpec(max_tokens=8, temperature=0.7, logprobs=5, prompt_logprobs=1),
    SamplingSpec(
        max_tokens=8, temperature=1.0, n=2, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1
    ),
)


async def warm(settings: EngineSettings, cache_dir: Path) -> dict[str, Any]:
    """Start the engine with ``cache_dir`` as its compile cache, exercise it, stop it; return the report."""
    point_engine_at(cache_dir, filling=True)
    engine = VllmEngine(replace(settings, compile_cache=None))  # fill the cache, do not watch it
    start = time.monotonic()
    await engine.start()
    started = time.monotonic() - start
    errors: list[str] = []
    try:
        for i, spec in enumerate(REQUESTS):  # one at a time, then all at once: batch sizes 1 and > 1
            await _request(engine, f"warmup-{i}", _prompt(i), spec, errors)
        await asyncio.gather(
            *(_request(engine, f"warmup-b{i}", _prompt(9 + i), s, errors) for i, s in enumerate(REQUESTS))
        )
    finally:
        await engine.shutdown()
    key = host_key(settings.device, settings.dtype)  # before cleaning: inductor's ISA probe writes to the cache
    drop_volatile(cache_dir)
    return {
        "key": key,
        "engine_start_s": round(started, 3),
        "total_s": round(time.monotonic() - start, 3),
        "files": len(cache_files(cache_dir)),
        "request_errors": errors,
    }


def _prompt(i: int) -> list[int]:
    """Distinct token ids per request (no prefix-cache hits), of varied lengths, within any vocabulary."""
    return [1 + (i * 7 + j) % 250 for j in range(12 + 5 * i)]


async def _request(engine: Any, request_id: str, prompt: list[int], spec: SamplingSpec, errors: list[str]) -> None:
    """Run one request to completion. A refused request still reached the code it compiles, so it is noted in the
    report and the warm-up goes on; a dead engine ends it."""
    try:
        async for _ in engine.generate(request_id, prompt, spec):
            pass
    except EngineDeadError:
        raise
    except EngineError as exc:
        log.warning("warm-up request %s failed: %s", request_id, exc)
        errors.append(f"{request_id}: {exc}")

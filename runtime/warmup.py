"""``python -m runtime.warmup MODEL_DIR --cache-dir DIR --settings JSON --report FILE``: fill a compile cache.

The build's ``compile=vllm`` stage runs this in a child process. It starts the engine the way ``serve`` does
(the same engine class, settings and environment), so the cache it fills is the one serving looks up; sends
requests that reach the code vLLM compiles lazily (sampling, logprobs, penalties, several sequences); stops;
removes what is not cache content (lock files, bytecode); and writes this host's compile key
(:func:`runtime.compile_cache.host_key`) to the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from artifacts.logs import setup_logging
from runtime.compile_cache import cache_files, drop_volatile, host_key, point_engine_at
from runtime.engines import ENGINES
from runtime.engines.base import EngineDeadError, EngineError, EngineSettings, SamplingSpec
from runtime.host import detect

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
    point_engine_at(cache_dir)
    engine = ENGINES["vllm"].create(replace(settings, compile_cache=None))  # fill the cache, do not watch it
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.warmup", description=__doc__)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--cache-dir", type=Path, required=True, help="the compile cache to fill")
    p.add_argument("--settings", required=True, help="JSON: EngineSettings fields other than model_dir and device")
    p.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    args = p.parse_args(argv)
    setup_logging("INFO")
    device = next(d for d in detect().devices if d in ("cuda", "cpu"))
    settings = EngineSettings(model_dir=args.model_dir, device=device, **json.loads(args.settings))
    log.info("warming up %s on %s into %s", args.model_dir, device, args.cache_dir)
    try:
        report = asyncio.run(warm(settings, args.cache_dir))
    except Exception as exc:  # the build shows this line; the traceback stays in the log
        log.exception("warm-up failed")
        args.report.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    args.report.write_text(json.dumps(report, indent=2, sort_keys=True))
    log.info("warm-up done in %.1fs: %d cache files", report["total_s"], report["files"])
    return 0


if __name__ == "__main__":  # vLLM spawns its engine core from this process: the guard is required
    sys.exit(main())

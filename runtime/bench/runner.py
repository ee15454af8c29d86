"""Sending the workload: arrivals at a request rate (Poisson, or gamma with a burstiness), in-flight requests capped by
a concurrency limit, as ``vllm bench serve`` schedules them.

A rate of ``inf`` with ``max_concurrency`` C is the closed loop: C requests in flight, the next sent as one finishes.
A finite rate is the open loop: arrival times are drawn up front (and scaled so the whole run spans
``count / rate`` seconds, as vLLM does) and requests are sent at them whether or not earlier ones finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from runtime.bench.apis import Api, Lines, Options, Piece
from runtime.bench.metrics import Outcome
from runtime.bench.transports import BenchError, Transport
from runtime.bench.workload import Request


@dataclass(frozen=True)
class Schedule:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0


def arrival_times(count: int, schedule: Schedule) -> list[float]:
    """Seconds after the start at which each request is sent."""
    if schedule.request_rate == math.inf:
        return [0.0] * count
    rng = random.Random(schedule.seed)
    shape, theta = schedule.burstiness, 1.0 / (schedule.request_rate * schedule.burstiness)
    times, t = [], 0.0
    for _ in range(count):
        t += rng.gammavariate(shape, theta)  # burstiness 1: exponential gaps, a Poisson process
        times.append(t)
    scale = (count / schedule.request_rate) / times[-1] if times and times[-1] else 1.0
    return [x * scale for x in times]


async def one(transport: Transport, api: Api, request: Request, opts: Options) -> Outcome:
    """Send one request and time it."""
    out = Outcome(prompt_len=request.prompt_len)
    body = api.body(request, opts)
    out.start = last = time.perf_counter()
    lines, raw, text = Lines(), bytearray(), list[str]()
    try:
        async for stamp, chunk in transport.post(api.path, body, opts.stream):
            if not opts.stream:
                raw += chunk
                last = stamp
                continue
            for obj in lines.add(chunk):
                piece = api.piece(obj)
                last = _note(out, piece, stamp, last, text)
        if opts.stream:
            for obj in lines.close():
                last = _note(out, api.piece(obj), last, last, text)
        else:
            piece = api.whole(json.loads(raw))
            if piece.error:
                raise BenchError("in-band error", piece.error)
            text.append(piece.text or "")
            out.output_tokens = piece.tokens
    except BenchError as exc:
        out.error, out.detail = exc.kind, exc.detail
        return out
    except (ValueError, AttributeError, TypeError) as exc:  # a body that is not the schema's JSON
        out.error, out.detail = "bad response", f"{type(exc).__name__}: {exc}"[:200]
        return out
    out.text, out.latency = "".join(text), last - out.start
    if opts.stream and out.ttft is None:
        out.error, out.detail = "no tokens", "the stream ended without a token"
        return out
    out.ok = True
    return out


def _note(out: Outcome, piece: Piece, stamp: float, last: float, text: list[str]) -> float:
    """Record one streamed piece; returns the time of the latest token chunk."""
    if piece.error:
        raise BenchError("in-band error", piece.error)
    if piece.tokens is not None:
        out.output_tokens = piece.tokens
    if piece.text is None:
        return last
    if out.ttft is None:
        out.ttft = stamp - out.start
    else:
        out.itl.append(stamp - last)
    text.append(piece.text)
    return stamp


async def run(
    transport: Transport,
    api: Api,
    requests: list[Request],
    opts: Options,
    schedule: Schedule,
    progress: Callable[[Outcome], None] = lambda _: None,
) -> tuple[list[Outcome], float]:
    """All requests on the schedule; returns their outcomes (in request order) and the run's wall time."""
    limit = asyncio.Semaphore(schedule.max_concurrency) if schedule.max_concurrency else contextlib.nullcontext()

    async def limited(request: Request) -> Outcome:
        async with limit:
            outcome = await one(transport, api, request, opts)
        progress(outcome)
        return outcome

    start = time.perf_counter()
    tasks = []
    for request, at in zip(requests, arrival_times(len(requests), schedule), strict=True):
        if (wait := start + at - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(limited(request)))
    outcomes = await asyncio.gather(*tasks)
    return list(outcomes), time.perf_counter() - start

"""A streaming load generator for OpenAI-compatible servers: N requests, C concurrent, fixed output length.

Per request it records the time to the first token (TTFT), the gaps between streamed chunks (inter-token latency,
ITL, as ``vllm bench serve`` counts it) and the output tokens (from ``usage``). Used by ``serve_bench.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

WORDS = (  # noqa: SIM905  (a word list is easier to read as text)
    "the of and to in is was for on are with as by at from his her they this that have had not but what "
    "all were when we there can an your which their said if do will each about how up out them then she "
    "many some so these would other into has more two like him see time could no make than first been its "
    "who now people my made over"
).split()


def prompts(n: int, words: int = 24, seed: int = 0) -> list[str]:
    """Distinct deterministic prompts (so prefix caching helps neither server more than the other)."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


@dataclass
class Result:
    ttft: float
    itl: list[float]
    latency: float
    tokens: int


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failures, for the report
    wall: float = 0.0

    def merge(self, other: Run) -> None:
        self.results += other.results
        self.failures += other.failures
        self.errors = (self.errors + other.errors)[:3]
        self.wall += other.wall

    def summary(self) -> dict[str, float]:
        tokens = sum(r.tokens for r in self.results)
        ttft = sorted(r.ttft for r in self.results)
        itl = sorted(x for r in self.results for x in r.itl)
        out = {
            "requests": len(self.results),
            "failures": self.failures,
            "request_throughput": len(self.results) / self.wall if self.wall else 0.0,
            "output_throughput": tokens / self.wall if self.wall else 0.0,
        }
        for name, values in (("ttft", ttft), ("itl", itl)):
            for q in (50, 90, 99):
                out[f"{name}_p{q}_ms"] = 1000 * percentile(values, q)
        return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, last, gaps, tokens = 0.0, 0.0, [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if not first:
                first = now
            else:
                gaps.append(now - last)
            last = now
    return Result(ttft=first - t0, itl=gaps, latency=time.perf_counter() - t0, tokens=tokens)


async def run(base: str, model: str, requests: int, concurrency: int, max_tokens: int, seed: int = 0) -> Run:
    todo = prompts(requests, seed=seed)
    out = Run()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while todo:
                prompt = todo.pop()
                try:
                    out.results.append(await one(client, model, prompt, max_tokens))
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    out.failures += 1
                    if len(out.errors) < 3:
                        out.errors.append(f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out.wall = time.perf_counter() - t0
    return out

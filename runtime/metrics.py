"""Prometheus metrics: requests by route and status, latency histograms, tokens, and the engine's own gauges.

kiln's series live in a registry per server (so several apps can exist in one process, as in tests); ``/metrics``
renders it followed by the process-wide default registry, where vLLM registers its ``vllm:*`` series.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.engines.base import EngineOutput, EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Buckets as vLLM's (seconds), so dashboards built for one read the other.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 600.0)


class EngineCollector(Collector):
    """Reads the engine's running/waiting counts and KV usage at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from _loop_tasks()
        s = self._stats()
        if s is None:
            return
        yield GaugeMetricFamily("kiln_engine_requests_running", "Requests running in the engine", value=s.running)
        yield GaugeMetricFamily("kiln_engine_requests_waiting", "Requests queued in the engine", value=s.waiting)
        if s.kv_cache_usage is not None:
            yield GaugeMetricFamily(
                "kiln_engine_kv_cache_usage_ratio", "Fraction of the KV cache in use", value=s.kv_cache_usage
            )
        yield from _speculation(s)


def _loop_tasks() -> Iterator[Metric]:
    """Tasks alive on the server's event loop: flat under steady load, back to the idle count after it (a leak of
    request tasks shows here first). Scrapes run on the loop; elsewhere there is no loop to count."""
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:
        return
    yield GaugeMetricFamily("kiln_asyncio_tasks", "Tasks alive on the server's event loop", value=tasks)


def _speculation(s: EngineStats) -> Iterator[Metric]:
    """Speculative decoding since the engine started, where it speculates: the counts, the share of drafted
    tokens the model accepted, and the mean tokens one step yields (1 + accepted per draft; vLLM's "mean
    acceptance length")."""
    if s.spec_drafts is None or s.spec_draft_tokens is None or s.spec_accepted_tokens is None:
        return
    yield CounterMetricFamily("kiln_spec_decode_drafts", "Speculative draft proposals", value=s.spec_drafts)
    yield CounterMetricFamily(
        "kiln_spec_decode_draft_tokens", "Tokens proposed by speculative drafts", value=s.spec_draft_tokens
    )
    yield CounterMetricFamily(
        "kiln_spec_decode_accepted_tokens", "Drafted tokens the model accepted", value=s.spec_accepted_tokens
    )
    rate = s.spec_accepted_tokens / s.spec_draft_tokens if s.spec_draft_tokens else 0.0
    yield GaugeMetricFamily(
        "kiln_spec_decode_acceptance_ratio", "Accepted / drafted tokens since start (0 before any draft)", value=rate
    )
    mean = 1 + s.spec_accepted_tokens / s.spec_drafts if s.spec_drafts else 0.0
    yield GaugeMetricFamily(
        "kiln_spec_decode_mean_acceptance_length",
        "Tokens per speculative step: 1 + accepted tokens per draft (0 before any draft)",
        value=mean,
    )


class Metrics:
    def __init__(self, engine_stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kiln_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.in_flight = Gauge("kiln_requests_in_flight", "Generation requests admitted and not finished", registry=r)
        self.ttft = Histogram(
            "kiln_time_to_first_token_seconds", "Request arrival to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "kiln_inter_token_latency_seconds", "Time between output tokens", buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "kiln_e2e_request_latency_seconds", "Request arrival to last token", buckets=E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated", registry=r)
        r.register(EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(DEFAULT_REGISTRY)


class RequestTimer:
    """Latency bookkeeping for one generation request, fed with each engine output."""

    __slots__ = ("_m", "_arrived", "_last", "_tokens", "_prompt")

    def __init__(self, metrics: Metrics | None, arrived: float) -> None:
        self._m = metrics
        self._arrived = arrived
        self._last: float | None = None
        self._tokens = 0
        self._prompt = 0

    def observe(self, out: EngineOutput) -> None:
        m = self._m
        if m is None:
            return
        n = sum(len(d.tokens) for d in out.deltas)
        self._prompt = out.prompt_tokens or self._prompt
        if not n:
            return
        now = time.perf_counter()
        if self._last is None:
            m.ttft.observe(now - self._arrived)
            n -= 1
        if n and self._last is not None:
            gap = (now - self._last) / n
            for _ in range(n):
                m.itl.observe(gap)
        self._tokens += sum(len(d.tokens) for d in out.deltas)
        self._last = now

    def done(self) -> None:
        m = self._m
        if m is None:
            return
        m.e2e.observe(time.perf_counter() - self._arrived)
        m.prompt_tokens.inc(self._prompt)
        m.generation_tokens.inc(self._tokens)

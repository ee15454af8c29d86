"""Load and soak: 256 concurrent streaming clients against a real server process (kiln's HTTP layer, admission
and service, with the fake engine: what leaks here is kiln's own), one minute in CI and ten in the slow tier.

Passes when: every response is a complete stream or a deliberate 503 (the admission limit is set below the
client count, so backpressure is exercised, not avoided); the server's RSS grows less than 5 % after warm-up; and
once the clients stop, its file descriptors, event-loop tasks, in-flight requests and the engine's running and
waiting counts are back where they were before the load."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import start_fake_process

pytestmark = pytest.mark.integration
CLIENTS = 256
ADMITTED = 128  # job_queue_size: half the clients at a time get 503
WARM_UP_S = 10.0
MAX_RSS_GROWTH = 0.05
BODY = {"model": "tiny-llama", "prompt": "The grass is", "max_tokens": 16, "stream": True}


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first few, for the assertion message


def gauge(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def server_state(base: str, proc: psutil.Process) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    names = (
        "kiln_asyncio_tasks",
        "kiln_requests_in_flight",
        "kiln_engine_requests_running",
        "kiln_engine_requests_waiting",
    )
    return {n: gauge(text, n) for n in names} | {"fds": proc.num_fds(), "rss": proc.memory_info().rss}


async def client(http: httpx.AsyncClient, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        stage = "before the response"
        try:
            async with http.stream("POST", "/v1/completions", json=BODY) as resp:
                stage = f"in a {resp.status_code} body"
                if resp.status_code == 503:
                    await resp.aread()
                    tally.outcomes["503"] += 1
                    await asyncio.sleep(0.05)  # a client backing off, as SageMaker's and OpenAI's retry
                    continue
                body = (await resp.aread()).decode()
            complete = resp.status_code == 200 and body.rstrip().endswith("data: [DONE]")
            tally.outcomes["ok" if complete else f"bad {resp.status_code}"] += 1
            if not complete and len(tally.failures) < 5:
                tally.failures.append(f"{resp.status_code}: {body[-200:]!r}")
        except httpx.HTTPError as exc:
            tally.outcomes[f"{type(exc).__name__} {stage}"] += 1
            if len(tally.failures) < 5:
                tally.failures.append(repr(exc))


async def load(base: str, seconds: float, proc: psutil.Process) -> tuple[Tally, int]:
    """Run the clients for ``seconds``; returns the tally and the server's RSS at the end of the warm-up."""
    tally = Tally()
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:
        until = time.monotonic() + seconds
        tasks = [asyncio.create_task(client(http, until, tally)) for _ in range(CLIENTS)]
        await asyncio.sleep(WARM_UP_S)
        warm_rss = proc.memory_info().rss
        await asyncio.gather(*tasks)
    return tally, warm_rss


def settle(base: str, proc: psutil.Process, idle: dict[str, float], timeout: float = 30) -> dict[str, float]:
    """The server's state once the in-flight work has drained (connections close, tasks finish)."""
    deadline = time.monotonic() + timeout
    while True:
        now = server_state(base, proc)
        drained = all(now[k] <= idle[k] for k in idle if k != "rss")
        if drained or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


@pytest.mark.parametrize("seconds", [60, pytest.param(600, marks=pytest.mark.slow)])
def test_256_streaming_clients_leave_nothing_behind(tiny_dir: Path, tmp_path: Path, seconds: int) -> None:
    server = start_fake_process(
        tiny_dir, tmp_path, "--job-queue-size", str(ADMITTED), "--option", "token_delay_s=0.005"
    )
    try:
        proc = psutil.Process(server.proc.pid)
        httpx.post(server.base + "/v1/completions", json=BODY | {"stream": False}, timeout=30).raise_for_status()
        idle = server_state(server.base, proc)
        tally, warm_rss = asyncio.run(load(server.base, seconds, proc))
        end_rss = proc.memory_info().rss
        after = settle(server.base, proc, idle)
        assert httpx.get(server.base + "/ping", timeout=10).status_code == 200
    finally:
        code = server.stop()

    assert code == 0, server.logs()[-3000:]  # SIGTERM drained and exited cleanly after the load
    errors = {k: v for k, v in tally.outcomes.items() if k not in ("ok", "503")}
    assert not errors, f"{errors}; first failures: {tally.failures}"
    assert tally.outcomes["ok"] > CLIENTS, tally.outcomes  # every client completed requests, more than once
    assert tally.outcomes["503"] > 0, tally.outcomes  # the admission limit was reached: backpressure, not errors
    growth = (end_rss - warm_rss) / warm_rss
    assert growth < MAX_RSS_GROWTH, f"RSS grew {growth:.1%} after warm-up ({warm_rss} -> {end_rss} bytes)"
    for key in ("fds", "kiln_asyncio_tasks", "kiln_requests_in_flight"):
        assert after[key] <= idle[key], f"{key}: {idle[key]} before the load, {after[key]} after it"
    assert after["kiln_engine_requests_running"] == 0
    assert after["kiln_engine_requests_waiting"] == 0
    print(f"\nsoak {seconds}s: {dict(tally.outcomes)}; RSS {warm_rss / 2**20:.1f} -> {end_rss / 2**20:.1f} MiB")

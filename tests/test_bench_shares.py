"""The serving bench's CPU shares (tests/bench/serve_bench.py ``busy_shares``) are taken over the window in which
the server's engine was busy, so that the load client's own start-up, while the server idles, is not counted as
load (it made ``vllm bench serve`` look like 37 % of the machine)."""

from __future__ import annotations

import os

import pytest

from tests.bench.serve_bench import busy_shares

pytestmark = pytest.mark.unit


def _samples() -> list[dict[str, float]]:
    """Every 0.5 s: the worker finishes an earlier load (0.5 s) while the client imports for 2 s (one core), the
    engine is busy for 2 s, then 0.5 s of the client writing its results."""
    rows, cpu = [], {"api": 0.0, "engine_core": 0.0, "worker": 0.0, "client": 0.0, "machine": 0.0}
    for i in range(10):
        rows.append({"t": i * 0.5, **cpu})
        busy = 4 <= i < 8  # the intervals from 2.0 s to 4.0 s
        step = {"api": 0.05, "engine_core": 0.1, "worker": 0.4, "client": 0.3} if busy else {"client": 0.5}
        if i == 0:
            step["worker"] = 0.3  # the earlier load's last steps: not this load's
        step["machine"] = sum(step.values())
        cpu = {k: v + step.get(k, 0.0) for k, v in cpu.items()}
    return rows


def test_shares_cover_only_the_window_the_engine_was_busy() -> None:
    shares = busy_shares(_samples())
    cores = os.cpu_count() or 1
    assert shares["window_s"] == pytest.approx(2.0)
    assert shares["client"] == pytest.approx(0.3 / 0.5 / cores)  # not its 2 s of importing
    assert shares["worker"] == pytest.approx(0.4 / 0.5 / cores)
    assert shares["machine"] == pytest.approx(0.85 / 0.5 / cores)


def test_the_last_seconds_alone_can_be_taken() -> None:
    """Offline, the engine's own start is busy too: only the generation's last seconds are the load."""
    shares = busy_shares(_samples(), last_s=1.0)
    assert shares["window_s"] == pytest.approx(1.0)
    assert shares["worker"] == pytest.approx(0.4 / 0.5 / (os.cpu_count() or 1))


def test_no_engine_work_gives_no_shares() -> None:
    idle = [{"t": float(i), "api": 0.0, "engine_core": 0.0, "worker": 0.0, "client": i, "machine": i} for i in range(3)]
    assert busy_shares(idle) == {}

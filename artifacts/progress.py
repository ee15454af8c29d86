"""Byte progress for long transfers: a bar with rate on a terminal; elsewhere (a container's log, CI) a structured
log line every few seconds with the bytes done, the total and the rate, so that long downloads never look hung."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOG_EVERY_S = 5.0  # seconds between progress lines where there is no terminal


@contextmanager
def byte_progress(total: int, desc: str, log: logging.Logger | None = None) -> Iterator[Callable[[int], None]]:
    """Yield a thread-safe ``advance(nbytes)`` callback that drives a tqdm bar when stderr is a terminal, else (with
    ``log``) logs progress at INFO every LOG_EVERY_S seconds."""
    bar = None
    if sys.stderr.isatty() and total > 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
        except ImportError:  # tqdm is optional; quiet is fine
            bar = None
    lock = threading.Lock()
    started = time.monotonic()
    state = {"done": 0, "logged": started}

    def advance(n: int) -> None:
        with lock:
            if bar is not None:
                bar.update(n)
                return
            state["done"] += n
            now = time.monotonic()
            if log is not None and now - state["logged"] >= LOG_EVERY_S:
                state["logged"] = now
                _log_line(log, desc, int(state["done"]), total, now - started)

    try:
        yield advance
    finally:
        if bar is not None:
            bar.close()


def _log_line(log: logging.Logger, desc: str, done: int, total: int, elapsed: float) -> None:
    rate = done / elapsed if elapsed > 0 else 0.0
    fields = {"bytes_done": done, "bytes_total": total, "bytes_per_s": round(rate)}
    pct = 100.0 * done / total if total else 100.0
    log.info(
        "%s: %.0f%% (%.1f of %.1f MiB, %.1f MiB/s)",
        desc,
        pct,
        done / 2**20,
        total / 2**20,
        rate / 2**20,
        extra={"fields": fields},
    )

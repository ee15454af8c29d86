"""Byte progress for long transfers: a bar on a terminal, nothing on a pipe (logs say start and end)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def byte_progress(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """Yield a thread-safe ``advance(nbytes)`` callback that drives a tqdm bar when stderr is a terminal."""
    bar = None
    if sys.stderr.isatty() and total > 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
        except ImportError:  # tqdm is optional; quiet is fine
            bar = None
    lock = threading.Lock()

    def advance(n: int) -> None:
        if bar is not None:
            with lock:
                bar.update(n)

    try:
        yield advance
    finally:
        if bar is not None:
            bar.close()

"""Calibration progress: decoder layers done / total and elapsed time.

Layer-by-layer quantizers (llm-compressor's sequential pipeline, ModelOpt's calibration loop) call each
decoder layer in order, so a forward pre-hook on every layer tells which one is being calibrated: when
layer *k* starts, layers before it are done. A bar is drawn on a terminal (tqdm); on a pipe, one log line per
layer at INFO (quiet by default, like every kiln log).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

log = logging.getLogger("kiln.quantize")
# Where the bar is drawn: the real stderr, also while library output is held back (see stage.library_output).
STREAM: TextIO | None = None


class LayerProgress:
    def __init__(self, total: int, desc: str) -> None:
        self.total = total
        self.desc = desc
        self.done = 0
        self.start = time.monotonic()
        self._bar: Any = None
        stream = STREAM or sys.stderr
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="layer", leave=False, file=stream)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def advance_to(self, done: int) -> None:
        done = min(done, self.total)
        if done <= self.done:
            return
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        log.info("%s: %d/%d layers (%.1fs)", self.desc, done, self.total, self.elapsed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated decoder blocks (``model.model.layers`` for Llama-style causal LMs)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


@contextmanager
def track_layers(model: Any, desc: str) -> Iterator[LayerProgress]:
    """Report progress while the model's decoder layers are called in order; closes the bar on exit."""
    layers = decoder_layers(model)
    progress = LayerProgress(len(layers), desc)

    def hook_for(index: int) -> Any:
        def hook(module: Any, args: Any) -> None:
            progress.advance_to(index)  # layer `index` starts: the ones before it are done

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield progress
        progress.advance_to(progress.total)
    finally:
        for handle in handles:
            handle.remove()
        progress.close()

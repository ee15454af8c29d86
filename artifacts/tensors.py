"""Tensor names, shapes and dtypes read from safetensors headers, never the weights: what the pre-quantized format
check (build/stages/convert.py) and the LoRA adapter checks (artifacts/adapters.py) look at."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

Shape = tuple[int, ...]


class UnreadableError(ValueError):
    """A file that is not a readable safetensors file (truncated, corrupt, not safetensors); ``reason`` is why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_headers(files: Iterable[Path]) -> dict[str, tuple[Shape, str]]:
    """name -> (shape, safetensors dtype) of every tensor in ``files``. safetensors checks that a header's offsets
    cover its file exactly, so a truncated file raises UnreadableError here."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[Shape, str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    sl = f.get_slice(name)
                    out[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UnreadableError(path, str(exc)) from None
    return out

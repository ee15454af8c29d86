"""The quantize stage, shared by every backend: params in, quantized checkpoint and report out.

Order of work, so that a bad config or model fails in seconds and leaves nothing behind (the stage writes
into a staging directory the orchestrator discards on failure):

1. parse the params into the typed config and the (method, engine) plan;
2. preflight the model against the scheme (meta device, no weights read);
3. read and tokenize calibration and held-out text (empty or too-short data fails here);
4. quantize and save, through the backend (llm-compressor or ModelOpt), with layer progress;
5. copy the source's tokenizer and generation files verbatim (libraries re-serialize them differently);
6. measure fidelity on the held-out windows, source vs the written checkpoint loaded back.

Everything is seeded, so the output is a function of (source, resolved config, library versions).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from quantize import data, fidelity, preflight, progress
from quantize.config import CalibratedConfig, from_plain
from quantize.errors import QuantizeError
from quantize.registry import Plan, UnsupportedError, get_quantizer, plan

log = logging.getLogger("kiln.quantize")
# Files a library may rewrite in its own style (transformers 5 renames the tokenizer class, drops keys older
# readers need): the source's copies are what engines have been loading, so they win.
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


@dataclass(frozen=True)
class StageParams:
    config: CalibratedConfig
    plan: Plan
    dtype: str


class Backend(Protocol):
    """What a backend module provides to :func:`run_stage`."""

    def quantize(self, model_dir: Path, p: StageParams, windows: list[list[int]], out: Path) -> dict[str, Any]:
        """Quantize with the calibration windows and save the checkpoint into ``out``; return format facts."""
        ...

    def load_quantized(self, out: Path) -> Any:
        """The written checkpoint as a float32 torch model computing with the dequantized weights."""
        ...

    def weights_only(self, model: Any) -> bool:
        """Switch off the loaded model's activation quantization; False when the scheme has none."""
        ...


def parse(params: Mapping[str, Any]) -> StageParams:
    raw = dict(params["config"])
    spec = get_quantizer(raw["method"])
    cfg = from_plain(spec.config_cls, raw)
    if not isinstance(cfg, CalibratedConfig):
        raise QuantizeError(f"method {cfg.method!r} does no quantization work", key="quantize")
    engine = params["target"]["engine"]
    try:
        p = plan(cfg, engine)
    except UnsupportedError as exc:
        raise QuantizeError(str(exc), key=exc.key) from exc
    assert p is not None
    return StageParams(config=cfg, plan=p, dtype=params["dtype"])


def run_stage(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path, backend: Backend) -> dict[str, Any]:
    p = parse(params)
    cfg = p.config
    model_dir, calibration = inputs["model"], inputs["calibration"]
    seed_everything(cfg.seed)
    timings: dict[str, float] = {}
    with _timed(timings, "preflight"):
        checked = preflight.check(model_dir, cfg, p.plan)
    with _timed(timings, "data"):
        win = data.windows(
            calibration, _tokenizer(model_dir), cfg.text_field, cfg.seq_len, cfg.num_samples, cfg.eval_samples
        )
    log.info(
        "quantize %s (%s via %s): %d layers, %d calibration + %d held-out windows of %d tokens",
        p.plan.quantization,
        p.plan.engine,
        p.plan.backend.name,
        len(checked.layers),
        len(win.calibration),
        len(win.heldout),
        cfg.seq_len,
    )
    with _timed(timings, "quantize"):
        facts = backend.quantize(model_dir, p, win.calibration, out)
    carry_files(model_dir, out)
    with _timed(timings, "fidelity"), library_output():
        report = fidelity.measure(
            lambda: load_source(model_dir), lambda: backend.load_quantized(out), win.heldout, backend.weights_only
        )
    log.info(
        "fidelity: KL %.3e nats, top-1 %.2f%%, perplexity %.3f -> %.3f",
        report.kl_mean,
        100 * report.top1_agreement,
        report.ppl_source,
        report.ppl_quantized,
    )
    return {
        "target": {"devices": list(checked.devices), "quantization": p.plan.quantization},
        "report": {
            "method": cfg.method,
            "scheme": p.plan.scheme,
            "engine": p.plan.engine,
            "backend": p.plan.backend.name,
            "format": p.plan.backend.format,
            **facts,
            "devices": list(checked.devices),
            "preflight": checked.to_dict(),
            "calibration": {"windows": len(win.calibration), "seq_len": cfg.seq_len},
            "fidelity": report.to_dict(),
        },
        "seconds": {k: round(v, 3) for k, v in timings.items()},  # volatile: stage.json only, not the manifest
    }


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_source(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES.get(name, "bfloat16"))


def carry_files(src: Path, out: Path) -> None:
    for name in CARRIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        timings[name] = time.monotonic() - start


@contextmanager
def library_output() -> Iterator[None]:
    """Hold back what quantization libraries print (loguru lines on stdout, tqdm bars and warnings on stderr)
    unless debugging (``KILN_LOG_LEVEL=DEBUG``).

    File descriptors 1 and 2 go to a temporary file for the duration (so output from C++ is caught too),
    while kiln's own log handlers and progress bar write to the real stderr. On failure the captured tail is
    logged, so nothing is lost.
    """
    if os.environ.get("KILN_LOG_LEVEL", "").upper() == "DEBUG":
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    ok = False
    with tempfile.TemporaryFile(mode="w+b") as sink, os.fdopen(os.dup(saved[2]), "w", buffering=1) as real:
        handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
        streams = [h.stream for h in handlers]
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        for handler in handlers:
            handler.setStream(real)
        previous, progress.STREAM = progress.STREAM, real
        try:
            yield
            ok = True
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            progress.STREAM = previous
            for handler, stream in zip(handlers, streams, strict=True):
                handler.setStream(stream)
            if not ok:
                sink.seek(0)
                tail = sink.read().decode(errors="replace")[-4000:]
                log.error("quantization library output before the failure:\n%s", tail)


def run_with(backend: Backend) -> Callable[[Mapping[str, Any], Mapping[str, Path], Path], dict[str, Any]]:
    """A stage entry ``run(params, inputs, out)`` for a backend."""

    def run(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path) -> dict[str, Any]:
        return run_stage(params, inputs, out, backend)

    return run

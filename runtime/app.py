"""Wire a resolved model to an engine and the HTTP server, and run it under uvicorn."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtime import compile_cache
from runtime.engines import ENGINES
from runtime.engines.base import EngineSettings
from runtime.host import check_target, detect
from runtime.resolve import ResolvedModel
from runtime.server import create_app
from runtime.service import GenerationDefaults, ModelService

log = logging.getLogger("kiln.runtime")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    served_model_name: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    dtype: str | None = None
    enforce_eager: bool | None = None
    kv_cache_gib: float | None = None
    chat_template: str | None = None
    graceful_timeout_s: float = 30.0
    ignore_compile_cache: bool = False  # serve a precompiled artifact without its cache (e.g. on another CPU)


def plan(model: ResolvedModel, opts: ServeOptions) -> tuple[str, EngineSettings]:
    """Check the artifact against this host and resolve engine settings (artifact defaults < options)."""
    host = detect()
    if model.manifest is None:
        engine, device, serving, target_len, dtype, tp = "vllm", host.devices[0], {}, None, "auto", 1
    else:
        t = model.manifest.target
        device = check_target(t, host)
        engine, serving, target_len, dtype, tp = (
            t.engine,
            dict(model.manifest.serving),
            t.max_model_len,
            t.dtype,
            t.tensor_parallel_degree,
        )
    max_len = opts.max_model_len or serving.get("max_model_len") or target_len
    if target_len and max_len and max_len > target_len:
        raise ValueError(f"max_model_len={max_len} exceeds the artifact's target.max_model_len={target_len}")
    settings = EngineSettings(
        model_dir=model.path,
        device=device,
        dtype=opts.dtype or dtype,
        max_model_len=max_len,
        max_num_seqs=opts.max_num_seqs or int(serving.get("max_num_seqs", 32)),
        tensor_parallel_degree=tp,
        enforce_eager=opts.enforce_eager
        if opts.enforce_eager is not None
        else bool(serving.get("enforce_eager", False)),
        kv_cache_gib=opts.kv_cache_gib,
    )
    if model.manifest is not None and model.manifest.target.compile:
        cache = compile_cache.prepare(
            model.path,
            model.manifest,
            settings.device,
            settings.dtype,
            enforce_eager=settings.enforce_eager,
            ignore=opts.ignore_compile_cache,
        )
        settings = replace(settings, compile_cache=cache)
    return engine, settings


async def load_service(
    model: ResolvedModel, engine_name: str, settings: EngineSettings, opts: ServeOptions
) -> ModelService:
    from transformers import AutoTokenizer

    engine = ENGINES[engine_name].create(settings)
    log.info("starting %s engine for %s on %s", engine_name, model.name, settings.device)
    await engine.start()
    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    chat_template = Path(opts.chat_template).read_text() if opts.chat_template else None
    return ModelService(
        engine,
        tokenizer,
        opts.served_model_name or model.name,
        GenerationDefaults.from_config(_generation_config(model.path)),
        chat_template=chat_template,
    )


def _generation_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "generation_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _server_class() -> type:
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would die by the signal.
        For an orchestrator SIGTERM means "drain and exit", and a drained exit is a success: exit 0."""

        def handle_exit(self, sig: int, frame: object) -> None:
            super().handle_exit(sig, frame)  # type: ignore[arg-type]
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)

    return Server


def serve(model: ResolvedModel, engine_name: str, settings: EngineSettings, opts: ServeOptions) -> int:
    """Run the server until SIGTERM/SIGINT (exit 0 after draining) or a fatal engine failure (exit 1)."""
    import uvicorn

    exit_code = 0
    server: uvicorn.Server | None = None
    server_cls = _server_class()

    def on_fatal(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        if server is not None:
            server.should_exit = True

    app = create_app(lambda: load_service(model, engine_name, settings, opts), on_fatal)
    config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(opts.graceful_timeout_s),
    )
    server = server_cls(config)
    log.info("listening on http://%s:%d", opts.host, opts.port)
    server.run()
    return exit_code

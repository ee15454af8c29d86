"""Wire a resolved model and its configuration to an engine and the HTTP server, and run it under uvicorn."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from artifacts.errors import ArtifactError
from runtime import compile_cache
from runtime.config import (
    ConfigError,
    Entry,
    Resolved,
    ServeConfig,
    Sources,
    artifact_entries,
    cli_entries,
    locate,
    properties_in,
    read_env,
    redirect,
    resolve_config,
)
from runtime.engines import ENGINES
from runtime.engines.base import EngineSettings
from runtime.host import Host, TargetMismatchError, check_target, detect
from runtime.metrics import Metrics
from runtime.resolve import ResolvedModel, resolve
from runtime.server import ServerOptions, create_app
from runtime.service import GenerationDefaults, ModelService, ServiceOptions

log = logging.getLogger("kiln.runtime")


def configure(cli: Mapping[str, Any], options: list[str], env: Mapping[str, str]) -> tuple[ResolvedModel, Resolved]:
    """Find and verify the model, then resolve the configuration from every source (see runtime.config)."""
    location = locate(cli.get("model"), env)
    first_dir = Path(location.target).expanduser()
    if location.sagemaker and not first_dir.is_dir():
        raise ArtifactError(
            f"no model given and SageMaker's model directory {first_dir} does not exist: pass an artifact URI or "
            "directory, or set SM_MODEL_DIR or HF_MODEL_ID"
        )
    props = properties_in(first_dir) if first_dir.is_dir() else []
    location = redirect(location, props)
    model = resolve(location.target)
    if not props and model.path != first_dir.resolve():
        props = properties_in(model.path)
    env_entries, hints = read_env(env)
    sources = Sources(
        artifact=artifact_entries(model.manifest),
        properties=props,
        env=env_entries,
        cli=cli_entries(cli, options),
        hints=hints,
        located=[Entry("model", location.target, location.origin)],
    )
    return model, resolve_config(sources, model.manifest, _native_keys, sagemaker=location.sagemaker)


def _native_keys(engine: str) -> set[str]:
    spec = ENGINES.get(engine)
    if spec is None:
        raise KeyError(f"no engine {engine!r} (known: {sorted(ENGINES)})")
    return spec.native_keys()


def plan(model: ResolvedModel, cfg: ServeConfig, host: Host | None = None) -> tuple[str, EngineSettings]:
    """Check the artifact against this host and derive the engine settings (the target block fills what the
    configuration leaves open). Raises TargetMismatchError naming the first target field that does not fit."""
    host = host or detect()
    if model.manifest is None:
        engine = cfg.engine or "vllm"
        spec = ENGINES.get(engine)
        if spec is None or spec.installed_version() is None:
            known = sorted(ENGINES)
            raise TargetMismatchError("engine", f"{engine!r} is not an installed engine here (known: {known})")
        device, dtype, tp, max_len = host.devices[0], str(cfg.dtype), cfg.tensor_parallel_degree or 1, cfg.max_model_len
        if tp > host.count(device):
            raise TargetMismatchError(
                "tensor_parallel_degree", f"{tp} {device} devices wanted, this host has {host.count(device)}"
            )
    else:
        t = model.manifest.target
        device = check_target(t, host)
        engine, tp = t.engine, t.tensor_parallel_degree
        dtype = t.dtype if cfg.dtype == "auto" else str(cfg.dtype)
        max_len = cfg.max_model_len or t.max_model_len
    settings = EngineSettings(
        model_dir=model.path,
        device=device,
        dtype=dtype,
        max_model_len=max_len,
        max_num_seqs=cfg.max_num_seqs,
        tensor_parallel_degree=tp,
        enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enable_chunked_prefill=cfg.enable_chunked_prefill,
        kv_cache_gib=cfg.kv_cache_gib,
        extra=dict(cfg.engine_args),
    )
    return engine, settings


def with_compile_cache(model: ResolvedModel, cfg: ServeConfig, settings: EngineSettings) -> EngineSettings:
    """For a precompiled artifact: check its compile key against this host and the settings, and point the engine
    at a verified writable copy of its cache. Only ``serve`` does this: it imports torch and copies files, work
    that ``python -m runtime config`` has no use for. Raises TargetMismatchError naming a mismatched key field."""
    if model.manifest is None or not model.manifest.target.compile:
        return settings
    cache = compile_cache.prepare(
        model.path,
        model.manifest,
        settings.device,
        settings.dtype,
        enforce_eager=settings.enforce_eager,
        ignore=cfg.ignore_compile_cache,
    )
    return replace(settings, compile_cache=cache)


def chat_template(resolved: Resolved) -> str | None:
    """``chat_template`` is a file path or the template itself (LMI and vLLM accept both)."""
    value = resolved.config.chat_template
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError([f"{resolved.origin('chat_template')}={value!r}: no such file, and not a Jinja template"])


async def load_service(
    model: ResolvedModel,
    engine_name: str,
    settings: EngineSettings,
    resolved: Resolved,
    template: str | None,
    metrics: Metrics,
) -> ModelService:
    from transformers import AutoTokenizer

    engine = ENGINES[engine_name].create(settings)
    log.info("starting %s engine for %s on %s", engine_name, model.name, settings.device)
    await engine.start()
    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    cfg = resolved.config
    return ModelService(
        engine,
        tokenizer,
        cfg.served_model_name or model.name,
        GenerationDefaults.from_config(_generation_config(model.path)),
        chat_template=template,
        options=ServiceOptions(cfg.predict_timeout, cfg.output_formatter, cfg.tgi_compat),
        metrics=metrics,
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


def serve(model: ResolvedModel, engine_name: str, settings: EngineSettings, resolved: Resolved) -> int:
    """Run the server until SIGTERM/SIGINT (exit 0 after draining) or a fatal engine failure (exit 1)."""
    import uvicorn

    cfg = resolved.config
    template = chat_template(resolved)
    exit_code = 0
    server: uvicorn.Server | None = None
    server_cls = _server_class()

    def on_fatal(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        if server is not None:
            server.should_exit = True

    app = create_app(
        lambda metrics: load_service(model, engine_name, settings, resolved, template, metrics),
        on_fatal,
        ServerOptions(job_queue_size=cfg.job_queue_size, model_loading_timeout=cfg.model_loading_timeout),
    )
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(cfg.graceful_timeout),
    )
    server = server_cls(config)
    log.info("listening on http://%s:%d", cfg.host, cfg.port)
    server.run()
    return exit_code

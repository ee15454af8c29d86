"""Wire a resolved model and its configuration to an engine and the HTTP server, and run it under uvicorn.

Everything engine-specific is reached through the engine's hooks (``plan.spec``): this module names no engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifacts.errors import ArtifactError
from runtime import engines, process
from runtime.adapters import AdapterRequestError, Adapters, Base
from runtime.config import (
    ConfigError,
    Entry,
    Location,
    PartialConfigError,
    Resolved,
    Sources,
    artifact_entries,
    cli_entries,
    locate,
    properties_in,
    read_env,
    redirect,
    resolve_config,
)
from runtime.engines.base import Engine, EngineSpec, model_config_int
from runtime.host import Host, TargetMismatchError, detect
from runtime.metrics import Metrics
from runtime.resolve import ResolvedModel, resolve
from runtime.server import ServerOptions, create_app
from runtime.service import GenerationDefaults, ModelService, ServiceOptions
from runtime.settings import Plan, derive

log = logging.getLogger("kiln.runtime")

if TYPE_CHECKING:
    from artifacts.manifest import Manifest


@dataclass(frozen=True)
class Startup:
    """Everything ``serve`` needs, checked: the verified model, its configuration, the engine plan, the template."""

    model: ResolvedModel
    location: Location
    resolved: Resolved
    plan: Plan
    template: str | None


def configure(
    cli: Mapping[str, Any],
    options: list[str],
    env: Mapping[str, str],
    *,
    prepare: bool = False,
    host: Host | None = None,
) -> Startup:
    """Find and verify the model, resolve the configuration from every source (see runtime.config), check the
    chat template and the target block against this host, and derive the engine settings. With ``prepare``
    (``serve``), also check and prepare the engine's precompiled content. Every problem is reported at once in one
    ConfigError; a model that cannot be found or verified raises ArtifactError before anything else is checked."""
    location = locate(cli.get("model"), env)
    first_dir = Path(location.target).expanduser()
    if location.sagemaker and not first_dir.is_dir():
        raise ArtifactError(
            f"no model given and SageMaker's model directory {first_dir} does not exist: pass an artifact URI or "
            "directory, or set SM_MODEL_DIR or HF_MODEL_ID"
        )
    props = properties_in(first_dir) if first_dir.is_dir() else []
    location = redirect(location, props)
    env_entries, hints = read_env(env)
    allow_pickle = _early_flag("allow_pickle", [*props, *env_entries, *cli_entries(cli, options)])
    importing = EngineImport() if prepare else None
    model = resolve(
        location.target,
        revision=env.get("HF_MODEL_REVISION") or None,
        allow_pickle=allow_pickle,
        on_manifest=importing.start if importing else None,
    )
    if importing:
        importing.join()  # before anything else here may import the engine library (two threads importing vLLM race)
    if prepare and model.weights is not None:
        model.weights.start()  # the download overlaps the checks below and the engine's start-up (load_service)
    if not props and model.path != first_dir.resolve():
        props = properties_in(model.path)
    sources = Sources(
        artifact=artifact_entries(model.manifest.serving if model.manifest else {}),
        properties=props,
        env=env_entries,
        cli=cli_entries(cli, options),
        hints=hints,
        located=[Entry("model", location.target, location.origin)],
    )
    target = model.manifest.target if model.manifest else None
    problems: list[str] = []
    try:
        resolved = resolve_config(sources, target, _native_keys, container=location.container)
    except PartialConfigError as exc:
        problems += exc.problems
        resolved = exc.partial
    problems += signature_problems(model, resolved.config.trusted_keys)
    template = _checked(chat_template, resolved, problems)
    plan: Plan | None = None
    try:
        plan = derive(model.path, target, resolved.config, host or detect())
        if prepare:
            plan = with_precompiled(plan, model, resolved)
    except TargetMismatchError as exc:
        problems.append(f"this artifact cannot run here: {exc}")
    if plan is not None:
        problems += plan.spec.check(plan.settings)
        problems += lora_problems(resolved, plan)
        plan, spec_problems = with_speculation(plan, resolved)
        problems += spec_problems
    if problems:
        raise ConfigError(problems)
    assert plan is not None
    return Startup(model, location, resolved, plan, template)


class EngineImport:
    """The engine's libraries imported in a thread while the artifact's files are pulled and hashed (``serve`` only:
    vLLM's import is 10-25 s, hashing a large checkpoint as long). Only libraries load here, never a weight: the
    engine starts after verification, as before. A failed import is left for the engine's start to report."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self, manifest: Manifest) -> None:
        if self._thread is not None:  # announced again (a damaged cache entry resolved through the store)
            return
        try:
            spec = engines.get(manifest.target.engine)
        except engines.UnknownEngineError:
            return  # the target check names it
        if spec.installed_version() is None:
            return
        log.info("importing the %s engine while %s is verified", spec.name, manifest.name)
        self._thread = threading.Thread(target=self._run, args=(spec,), name="kiln-engine-import", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    @staticmethod
    def _run(spec: EngineSpec) -> None:
        start = time.monotonic()
        try:
            spec.preload()
        except Exception as exc:  # the engine's start imports again and reports it with its context
            log.debug("importing the %s engine failed: %s", spec.name, exc)
            return
        log.info("imported the %s engine in %.1fs", spec.name, time.monotonic() - start)


def signature_problems(model: ResolvedModel, trusted_keys: list[str]) -> list[str]:
    """With ``trusted_keys``, the model must be an artifact one of them signed (checked before any weight loads)."""
    from artifacts.signing import SigningError
    from runtime.signatures import load_trusted, trusted_signer

    if not trusted_keys:
        return []
    try:
        trusted = load_trusted(trusted_keys)
    except SigningError as exc:
        return [f"trusted_keys: {exc}"]
    try:
        refresh = model.refresh_signatures if model.ref is not None else None
        what = model.source if model.manifest else f"{model.source} (a {model.kind})"
        signer = trusted_signer(model.path, model.manifest, trusted, what, refresh)
    except ArtifactError as exc:  # unsigned, untrusted, no manifest, or the store could not be read
        return [str(exc)]
    assert model.manifest is not None
    log.info("artifact %s@%s is signed by trusted key %s", model.manifest.name, model.manifest.digest, signer)
    return []


def with_speculation(plan: Plan, resolved: Resolved) -> tuple[Plan, list[str]]:
    """The plan with the speculative decoding the configuration asks for (runtime/speculative.py)."""
    from runtime.speculative import speculation

    spec, problems = speculation(resolved, plan.settings.model_dir, plan.spec, plan.settings.task)
    if spec is None:
        return plan, problems
    return replace(plan, settings=replace(plan.settings, speculative=spec)), problems


def lora_problems(resolved: Resolved, plan: Plan) -> list[str]:
    """LoRA settings that cannot work: an engine without adapters, a cache smaller than the batch, adapters listed
    while LoRA is off."""
    cfg, out = resolved.config, []
    if cfg.adapters and not cfg.enable_lora:
        out.append(f"{resolved.origin('adapters')}: adapters are listed but enable_lora is false; set enable_lora=true")
    if not cfg.enable_lora:
        return out
    if plan.settings.task != "generate":
        out.append(
            f"{resolved.origin('enable_lora')}=true: LoRA adapters are served for text generation, and this model "
            f"is for task={plan.settings.task}"
        )
    elif not plan.spec.serves_adapters:
        out.append(
            f"{resolved.origin('enable_lora')}=true: the {plan.spec.name} engine does not serve LoRA adapters; "
            "serve an artifact built for target.engine=vllm"
        )
    if cfg.max_cpu_loras is not None and cfg.max_cpu_loras < cfg.max_loras:
        out.append(
            f"{resolved.origin('max_cpu_loras')}={cfg.max_cpu_loras}: less than max_loras={cfg.max_loras} (the "
            "host-memory cache must hold a whole batch's adapters)"
        )
    return out


def _early_flag(key: str, entries: list[Entry]) -> bool:
    """A boolean the model's location needs before the configuration is resolved (entries lowest precedence
    first); resolve_config validates the same entries again, and reports a bad value naming its source."""
    values = [e.value for e in entries if e.key == key]
    return bool(values) and str(values[-1]).strip().lower() in ("1", "true", "yes", "on")


def _checked(check: Any, resolved: Resolved, problems: list[str]) -> Any:
    try:
        return check(resolved)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def _native_keys(engine: str) -> set[str]:
    return engines.get(engine).native_keys()


def with_precompiled(plan: Plan, model: ResolvedModel, resolved: Resolved) -> Plan:
    """For an artifact with precompiled content (``target.compile``): the engine's compile hook checks its key
    against this host and points the engine at it. Only ``serve`` does this: it imports the engine's libraries
    and copies files, work that ``python -m runtime config`` has no use for."""
    manifest = model.manifest
    if manifest is None or not manifest.target.compile:
        return plan
    if plan.spec.compile is None:
        raise TargetMismatchError("compile", f"the {plan.spec.name} engine cannot use precompiled content")
    settings = plan.spec.compile.prepare(
        model.path, manifest, plan.settings, ignore=resolved.config.ignore_compile_cache
    )
    return replace(plan, settings=settings)


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


async def load_service(startup: Startup, metrics: Metrics) -> ModelService:
    model, plan, cfg = startup.model, startup.plan, startup.resolved.config
    # Importing the engine's module and transformers takes seconds on a first start: in a thread, so the event loop
    # keeps answering /ping (503 while the engine loads) instead of leaving probes unanswered.
    engine = await asyncio.to_thread(plan.spec.create, plan.settings)
    if model.weights is not None:  # import the engine's libraries while the weights finish downloading
        log.info("importing the %s engine while the weights download", plan.spec.name)
        await asyncio.gather(asyncio.to_thread(plan.spec.preload), asyncio.to_thread(model.weights.wait))
    log.info("starting %s engine for %s on %s", plan.spec.name, model.name, plan.settings.device)
    await engine.start()
    tokenizer = await asyncio.to_thread(_tokenizer, model.path)
    served = cfg.served_model_name or model.name
    loras = await _startup_adapters(startup, engine, served) if cfg.enable_lora else None
    return ModelService(
        engine,
        tokenizer,
        served,
        GenerationDefaults.from_config(_generation_config(model.path)),
        chat_template=startup.template,
        options=ServiceOptions(
            cfg.predict_timeout,
            cfg.output_formatter,
            cfg.tgi_compat,
            cfg.normalize,
            max_prompt_chars=cfg.max_prompt_chars,
            max_stop_sequences=cfg.max_stop_sequences,
        ),
        metrics=metrics,
        root=str(model.path),
        vocab_size=model_config_int(model.path, "vocab_size"),
        adapters=loras,
        task=plan.settings.task,
    )


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


async def _startup_adapters(startup: Startup, engine: Engine, served: str) -> Adapters:
    """The adapter registry, holding the configured adapters and the model directory's ``adapters/<name>/``
    folders (LMI registers those at load too); one that cannot be used stops the start, naming it."""
    cfg, model = startup.resolved.config, startup.model
    base = Base(served, model.path, model.manifest.digest if model.manifest else None)
    registry = Adapters.create(
        engine, base, cfg.max_lora_rank, cfg.adapter_roots, cfg.allow_pickle, trusted_keys=cfg.trusted_keys
    )
    listed = dict(cfg.adapters)
    folder = model.path / "adapters"
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        if sub.is_dir():
            listed.setdefault(sub.name, str(sub))
    for name, src in listed.items():
        try:
            await registry.register(name, src)
        except AdapterRequestError as exc:
            raise ConfigError([f"{startup.resolved.origin('adapters')}: {exc.message}"]) from None
    return registry


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


def make_server(startup: Startup) -> tuple[Any, Callable[[], int]]:
    """The uvicorn server for ``startup`` and a function giving its exit code once it stopped: 0 after a drain,
    1 after a fatal engine failure."""
    import uvicorn

    cfg = startup.resolved.config
    exit_code = [0]
    server: uvicorn.Server | None = None

    def on_fatal(code: int) -> None:
        exit_code[0] = code
        if server is not None:
            server.should_exit = True

    async def load(metrics: Metrics) -> ModelService:
        try:
            return await load_service(startup, metrics)
        except Exception:
            if tail := process.engine_log_tail():  # the engine's own account of what went wrong
                log.error("the engine failed to start; %s", tail)
            raise

    app = create_app(
        load,
        on_fatal,
        ServerOptions(
            job_queue_size=cfg.job_queue_size,
            model_loading_timeout=cfg.model_loading_timeout,
            enable_lora=cfg.enable_lora,
            api_key=cfg.api_key,
            max_request_size=cfg.max_request_size,
        ),
    )
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(cfg.graceful_timeout),
        # uvicorn's default is 5 s: a client reusing a connection just as the server drops it sees the request fail
        # before any response (4 of ~3000 requests in tests/test_soak.py under load; none at 75 s)
        timeout_keep_alive=int(cfg.timeout_keep_alive),
    )
    server = _server_class()(config)
    return server, lambda: exit_code[0]


def serve(startup: Startup) -> int:
    """Run the server until SIGTERM/SIGINT (exit 0 after draining) or a fatal engine failure (exit 1); no engine
    process outlives it (runtime/process.py)."""
    cfg = startup.resolved.config
    server, exit_code = make_server(startup)
    log.info("listening on http://%s:%d", cfg.host, cfg.port)
    process.forked_children_close_http(cfg.port)
    with process.reaped_children():
        server.run()
    return exit_code()

"""The build pipeline: source → convert → quantize → compile → publish, as plain functions.

:func:`run_build` takes a validated :class:`BuildConfig` and returns a :class:`BuildResult`; the Hydra entry
point in ``build/__main__.py`` is only a shell around it.
"""

from __future__ import annotations

import getpass
import logging
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from artifacts import __version__ as kiln_version
from artifacts import ops
from artifacts.devices import nvidia_gpus
from artifacts.errors import ArtifactError
from artifacts.manifest import Manifest, Target
from artifacts.paths import cache_root, default_store_uri
from artifacts.store import SCHEME_TO_STORE, STORES, open_store
from artifacts.targets import ENGINES, quant_scheme, runs_on
from artifacts.uri import ArtifactRef, normalize_store_uri, scheme_of
from build import calibration, toolchains
from build.cache import StageCache, StageRecord
from build.config import BuildConfig, ModelConfig, parse_size, to_plain
from build.errors import BuildError
from build.source import Source, acquire
from build.stages import StageInput, StageSpec, run_stage
from compile.registry import COMPILERS
from quantize.config import stage_config
from quantize.fidelity import gate_failures
from quantize.registry import plan

log = logging.getLogger("kiln.build")
CONVERT = StageSpec(name="convert", toolchain="build", entry="build.stages.convert:run")
# The draft model (speculative=draft_model) is converted as the model is, under its own stage name, then packaged.
DRAFT_CONVERT = StageSpec(name="draft-convert", toolchain="build", entry="build.stages.convert:run")
DRAFT = StageSpec(name="draft", toolchain="build", entry="build.stages.draft:run", code=("artifacts.tokenizers",))
DRAFT_FOLDER = "draft"


@dataclass(frozen=True)
class BuildResult:
    ref: ArtifactRef
    manifest: Manifest
    stages: tuple[StageRecord, ...]
    seconds: float
    base: ArtifactRef | None = None  # an adapter build: the base artifact (ref and manifest are the adapter's)

    @property
    def uri(self) -> str:
        return str(self.ref)


def run_build(cfg: BuildConfig) -> BuildResult:
    start = time.monotonic()
    store_uri = _store_uri(cfg)
    c = COMPILERS[cfg.compile.backend]
    device = cfg.compile.build_device(("cuda", "cpu") if nvidia_gpus() else ("cpu",))
    compile_toolchain = c.toolchain_for(device) if c.entry else None
    if compile_toolchain:  # one that cannot be created fails the build now, not after the stages before it
        toolchains.preflight(toolchains.get(compile_toolchain))
    cache = StageCache(cache_root() / "stages")
    source = acquire(cfg.model, cache, force=cfg.force)
    stages = [source.stage] if source.stage else []
    convert_params = {
        "dtype": cfg.model.dtype,
        "max_shard_size": parse_size(cfg.convert.max_shard_size),
        "check_finite": cfg.convert.check_finite,
        "allow_pickle": cfg.model.allow_pickle,
        "quantize": cfg.quantize.method,
        "task": cfg.target.task,
    }
    if ENGINES[cfg.target.engine].transformers_4:  # only then: other targets keep their convert cache keys
        convert_params["tokenizer_format"] = "transformers4"
    final = run_stage(CONVERT, convert_params, {"source": source.input}, cache, force=cfg.force)
    stages.append(final)
    check_prequantized_engine(cfg, final)
    record_extra: dict[str, Any] = {}
    q = plan(cfg.quantize, cfg.target.engine)  # validated already: None means no quantization
    if q is not None:
        spec, params, extra = _quantize_stage(cfg, q.backend.toolchain, q.backend.entry, record_extra)
        final = run_stage(spec, params, {"model": _input(final), **extra}, cache, force=cfg.force)
        stages.append(final)
        check_quantize_gate(cfg, stages)  # before compiling: a checkpoint that will not be published is not compiled
    if compile_toolchain:
        spec = StageSpec("compile", compile_toolchain, c.entry or "", host_bound=True, code=c.code)
        # The warm-up derives the engine settings as serve will, from this artifact's target block (as far as the
        # stages so far determined it) and its serving block.
        target = build_target(cfg, stages).to_dict()
        params = {"config": to_plain(cfg.compile), "target": target, "serving": serving_block(cfg), "device": device}
        if device == "cuda":  # content tuned or compiled for this GPU: another GPU model must not reuse the cache
            params["gpus"] = [f"{g.name} (sm {g.capability})" for g in nvidia_gpus()]
        final = run_stage(spec, params, {"model": _input(final)}, cache, force=cfg.force)
        stages.append(final)
    if cfg.speculative.method == "draft_model":
        final = _with_draft(cfg, convert_params, final, cache, stages)
    manifest = assemble_manifest(cfg, source, final, stages)
    record = _build_record(source, stages, time.monotonic() - start) | record_extra
    ref = ops.publish(
        final.path, manifest, store_uri, tags=cfg.publish.tags, record=record, signing_key=cfg.publish.key_path()
    )
    if cfg.adapter.source is not None:
        from build.adapter import package_adapter

        adapter_ref, adapter = package_adapter(cfg, final, manifest, cache, store_uri)
        return BuildResult(adapter_ref, adapter, tuple(stages), time.monotonic() - start, base=ref)
    return BuildResult(ref=ref, manifest=manifest, stages=tuple(stages), seconds=time.monotonic() - start)


def _with_draft(
    cfg: BuildConfig, convert_params: dict[str, Any], model: StageRecord, cache: StageCache, stages: list[StageRecord]
) -> StageRecord:
    """Convert the draft model (as the model: same dtype, checks and shards) and package it as ``draft/``."""
    d = cfg.speculative.draft
    assert d.source is not None  # validated: speculative=draft_model needs speculative.draft.source
    draft_model = ModelConfig(
        name=f"{cfg.model.name}-draft", source=d.source, revision=d.revision, allow_pickle=d.allow_pickle, synth=d.synth
    )
    params = {**convert_params, "quantize": "none", "allow_pickle": d.allow_pickle}
    try:
        source = acquire(draft_model, cache, force=cfg.force)
        draft = run_stage(DRAFT_CONVERT, params, {"source": source.input}, cache, force=cfg.force)
    except BuildError as exc:  # the source and convert errors name model.*; here they are the draft's keys
        fix = exc.fix.replace("model.", "speculative.draft.") if exc.fix else None
        key = (exc.key or "model.source").replace("model.", "speculative.draft.")
        raise BuildError("draft", exc.message, key=key, fix=fix) from None
    stages += [source.stage, draft] if source.stage is not None else [draft]
    inputs = {"model": _input(model), "draft": _input(draft)}
    packaged = run_stage(DRAFT, {"folder": DRAFT_FOLDER}, inputs, cache, force=cfg.force)
    stages.append(packaged)
    return packaged


def _input(rec: StageRecord) -> StageInput:
    return StageInput(rec.path, rec.output_digest)


def _quantize_stage(
    cfg: BuildConfig, toolchain: str, entry: str, record: dict[str, Any]
) -> tuple[StageSpec, dict[str, Any], dict[str, StageInput]]:
    """The quantize stage: its params hold what the checkpoint depends on (its own config, the target engine and
    dtype); the calibration text is an input (keyed by content digest), and the publication gate stays out so
    loosening it reuses the cached output."""
    context = {"target": asdict(cfg.target), "dtype": cfg.model.dtype}
    q = cfg.quantize
    data = calibration.acquire(q.calibration, min_tokens=(q.num_samples + q.eval_samples) * q.seq_len)
    record.update(data.record)
    params = {"config": stage_config(to_plain(q)), "calibration": data.provenance, **context}
    return StageSpec("quantize", toolchain, entry), params, {"calibration": data.input}


def check_prequantized_engine(cfg: BuildConfig, converted: StageRecord) -> None:
    """A pre-quantized source is built only for an engine that loads its format."""
    pre = converted.result.get("prequantized")
    if pre is None or cfg.target.engine in pre["engines"]:
        return
    raise BuildError(
        "convert",
        f"{cfg.target.engine} does not load {pre['format']} checkpoints ({pre['quantization']}); engines that do: "
        f"{', '.join(pre['engines'])}",
        key="target.engine",
        fix=" or ".join(f"target.engine={e}" for e in pre["engines"]),
    )


def check_quantize_gate(cfg: BuildConfig, stages: list[StageRecord]) -> None:
    """Refuse to publish when the fidelity report breaks ``quantize.max_kl`` / ``quantize.min_top1``."""
    rec = next((s for s in stages if s.stage == "quantize"), None)
    if rec is None:
        return
    report = rec.result["report"]["fidelity"]
    failures = gate_failures(report, getattr(cfg.quantize, "max_kl", None), getattr(cfg.quantize, "min_top1", None))
    if failures:
        raise BuildError(
            "quantize",
            "fidelity gate failed, nothing was published: "
            + "; ".join(failures)
            + f" (held-out: KL {report['kl_mean']:.3e} nats, top-1 {100 * report['top1_agreement']:.2f}%, "
            f"perplexity {report['ppl_source']:.3f} -> {report['ppl_quantized']:.3f})",
            key="quantize.max_kl" if "max_kl" in failures[0] else "quantize.min_top1",
            fix="the quantized checkpoint is cached: loosen the gate to publish it, or pick a gentler scheme "
            "(smaller quantize.group_size, quantize=smoothquant or quantize=fp8)",
        )


def _store_uri(cfg: BuildConfig) -> str:
    """The publish store's URI, checked against publish.store and probed before any stage runs (fail fast)."""
    if cfg.publish.store not in STORES:
        raise BuildError("publish", f"unknown store {cfg.publish.store!r}; known: {sorted(STORES)}", key="publish")
    try:
        uri = normalize_store_uri(cfg.publish.uri) if cfg.publish.uri else default_store_uri()
        if SCHEME_TO_STORE.get(scheme_of(uri)) != cfg.publish.store:
            raise BuildError("publish", f"{uri!r} is not a {cfg.publish.store} store URI", key="publish.uri")
        open_store(uri).preflight()
    except ArtifactError as exc:
        raise BuildError("publish", str(exc), key="publish.uri") from None
    return uri


def assemble_manifest(cfg: BuildConfig, source: Source, final: StageRecord, stages: list[StageRecord]) -> Manifest:
    return Manifest.create(
        name=cfg.model.name,
        files=final.files,
        target=build_target(cfg, stages),
        serving=serving_block(cfg),
        provenance={
            "kiln_version": kiln_version,
            "source": source.provenance,
            "stages": [_stage_provenance(s) for s in stages],
        },
    )


def serving_block(cfg: BuildConfig) -> dict[str, Any]:
    """The manifest's serving block: the ``serving.*`` settings the build config sets (unset ones are left to the
    runtime's defaults, so each default is written once, there)."""
    block = {k: v for k, v in asdict(cfg.serving).items() if v is not None}
    sp = cfg.speculative
    if sp.method == "ngram":
        block["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": sp.num_speculative_tokens,
            "prompt_lookup_min": sp.prompt_lookup_min,
            "prompt_lookup_max": sp.prompt_lookup_max,
        }
    elif sp.method == "draft_model":  # a path inside the artifact (runtime/speculative.py resolves it there)
        block["speculative_config"] = {
            "method": "draft_model",
            "model": DRAFT_FOLDER,
            "num_speculative_tokens": sp.num_speculative_tokens,
        }
    return block


def build_target(cfg: BuildConfig, stages: list[StageRecord]) -> Target:
    """The target block: the engine's device kinds, narrowed by what each stage reports in ``result["target"]``.

    A stage may report ``devices`` (the kinds that can run its output), ``engine_version`` (a specifier),
    ``quantization`` and ``compile`` (the compatibility key of precompiled content); later stages win.
    """
    engine = cfg.target.engine  # validated at the edge (build/config.py)
    converted = next(s for s in stages if s.stage == "convert")
    max_pos = int(converted.result.get("max_position_embeddings") or 0)
    max_len = cfg.target.max_model_len or max_pos
    if max_pos and max_len > max_pos:
        raise BuildError(
            "publish",
            f"{max_len} exceeds the model's max_position_embeddings ({max_pos})",
            key="target.max_model_len",
            fix=f"set target.max_model_len<={max_pos}",
        )
    devices = list(ENGINES[engine].devices)
    if (pre := converted.result.get("prequantized")) is not None:  # narrowed as a quantize stage's plan narrows
        devices = [d for d in devices if d in runs_on(engine, quant_scheme(pre["quantization"])).devices]
    fields: dict[str, Any] = {"engine_version": "", "quantization": cfg.quantize.method, "compile": {}}
    for stage in stages:
        reported = dict(stage.result.get("target") or {})
        if "devices" in reported:
            allowed = reported.pop("devices")
            devices = [d for d in devices if d in allowed]
        fields.update({k: v for k, v in reported.items() if k in fields})
    if not devices:
        raise BuildError("publish", f"no device can run this artifact on engine {engine}", key="target.engine")
    return Target(
        engine=engine,
        devices=tuple(devices),
        dtype=str(converted.result["dtype"]),
        tensor_parallel_degree=cfg.target.tensor_parallel_degree,
        max_model_len=max_len,
        task=cfg.target.task,
        **fields,
    )


def _stage_provenance(rec: StageRecord) -> dict[str, Any]:
    m = rec.key_material
    # A stage's "report" (e.g. the quantize stage's scheme, format and fidelity figures) is part of what the
    # artifact is; timings and other volatile facts stay in stage.json.
    report = {"report": rec.result["report"]} if "report" in rec.result else {}
    return {
        **report,
        "stage": rec.stage,
        "toolchain": m["toolchain"],
        "packages": dict(rec.packages),
        "params": m["params"],
        "inputs": m["inputs"],
        "code": m["code"],
        "output": rec.output_digest,
    }


def _build_record(source: Source, stages: list[StageRecord], seconds: float) -> dict[str, Any]:
    """Volatile facts about this build: stored beside the artifact, never inside its digest."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "user": getpass.getuser(),
        "kiln_version": kiln_version,
        "seconds": round(seconds, 3),
        "stages": {s.stage: s.key for s in stages},
        **source.record,
    }

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
from artifacts.manifest import ENGINE_DEVICES, Manifest, Target
from artifacts.paths import cache_root, default_store_uri
from artifacts.store import SCHEME_TO_STORE, STORES
from artifacts.uri import ArtifactRef, normalize_store_uri, scheme_of
from build.cache import StageCache, StageRecord
from build.config import BuildConfig, parse_size, to_plain
from build.errors import BuildError
from build.source import Source, acquire
from build.stages import StageInput, StageSpec, run_stage
from compile.registry import COMPILERS
from quantize.registry import QUANTIZERS

log = logging.getLogger("kiln.build")
CONVERT = StageSpec(name="convert", toolchain="build", entry="build.stages.convert:run")


@dataclass(frozen=True)
class BuildResult:
    ref: ArtifactRef
    manifest: Manifest
    stages: tuple[StageRecord, ...]
    seconds: float

    @property
    def uri(self) -> str:
        return str(self.ref)


def run_build(cfg: BuildConfig) -> BuildResult:
    start = time.monotonic()
    store_uri = _store_uri(cfg)
    cache = StageCache(cache_root() / "stages")
    source = acquire(cfg.model, cache, force=cfg.force)
    stages = [source.stage] if source.stage else []
    convert_params = {
        "dtype": cfg.model.dtype,
        "max_shard_size": parse_size(cfg.convert.max_shard_size),
        "check_finite": cfg.convert.check_finite,
        "allow_pickle": cfg.model.allow_pickle,
    }
    final = run_stage(CONVERT, convert_params, {"source": source.input}, cache, force=cfg.force)
    stages.append(final)
    for spec, params in _optional_stages(cfg):
        final = run_stage(spec, params, {"model": StageInput(final.path, final.output_digest)}, cache, force=cfg.force)
        stages.append(final)
    manifest = assemble_manifest(cfg, source, final, stages)
    record = _build_record(source, stages, time.monotonic() - start)
    ref = ops.publish(final.path, manifest, store_uri, tags=cfg.publish.tags, record=record)
    return BuildResult(ref=ref, manifest=manifest, stages=tuple(stages), seconds=time.monotonic() - start)


def _optional_stages(cfg: BuildConfig) -> list[tuple[StageSpec, dict[str, Any]]]:
    """The quantize and compile stages the config asks for (``none`` asks for no work).

    Both receive their own resolved config plus the target and serving settings, because what they produce
    depends on them (the quantized format follows the engine; a compile cache is keyed by engine settings).
    """
    context = {"target": asdict(cfg.target), "serving": asdict(cfg.serving), "dtype": cfg.model.dtype}
    out = []
    q = QUANTIZERS[cfg.quantize.method]
    if q.entry and q.toolchain:
        out.append((StageSpec("quantize", q.toolchain, q.entry), {"config": to_plain(cfg.quantize), **context}))
    c = COMPILERS[cfg.compile.backend]
    if c.entry and c.toolchain:
        spec = StageSpec("compile", c.toolchain, c.entry, host_bound=True, code=c.code)
        out.append((spec, {"config": to_plain(cfg.compile), **context}))
    return out


def _store_uri(cfg: BuildConfig) -> str:
    if cfg.publish.store not in STORES:
        raise BuildError("publish", f"unknown store {cfg.publish.store!r}; known: {sorted(STORES)}", key="publish")
    uri = normalize_store_uri(cfg.publish.uri) if cfg.publish.uri else default_store_uri()
    if SCHEME_TO_STORE.get(scheme_of(uri)) != cfg.publish.store:
        raise BuildError("publish", f"publish.uri {uri!r} is not a {cfg.publish.store} store URI", key="publish.uri")
    return uri


def assemble_manifest(cfg: BuildConfig, source: Source, final: StageRecord, stages: list[StageRecord]) -> Manifest:
    return Manifest.create(
        name=cfg.model.name,
        files=final.files,
        target=build_target(cfg, stages),
        serving=asdict(cfg.serving),
        provenance={
            "kiln_version": kiln_version,
            "source": source.provenance,
            "stages": [_stage_provenance(s) for s in stages],
        },
    )


def build_target(cfg: BuildConfig, stages: list[StageRecord]) -> Target:
    """The target block: the engine's device kinds, narrowed by what each stage reports in ``result["target"]``.

    A stage may report ``devices`` (the kinds that can run its output), ``engine_version`` (a specifier),
    ``quantization`` and ``compile`` (the compatibility key of precompiled content); later stages win.
    """
    engine = cfg.target.engine
    if engine not in ENGINE_DEVICES:
        raise BuildError("publish", f"unknown engine {engine!r}; known: {sorted(ENGINE_DEVICES)}", key="target.engine")
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
    devices = list(ENGINE_DEVICES[engine])
    fields: dict[str, Any] = {"engine_version": "", "quantization": cfg.quantize.method, "compile": {}}
    for stage in stages:
        reported = dict(stage.result.get("target") or {})
        if "devices" in reported:
            devices = [d for d in devices if d in reported.pop("devices")]
        fields.update({k: v for k, v in reported.items() if k in fields})
    if not devices:
        raise BuildError("publish", f"no device can run this artifact on engine {engine}", key="target.engine")
    return Target(
        engine=engine,
        devices=tuple(devices),
        dtype=str(converted.result["dtype"]),
        tensor_parallel_degree=cfg.target.tensor_parallel_degree,
        max_model_len=max_len,
        **fields,
    )


def _stage_provenance(rec: StageRecord) -> dict[str, Any]:
    m = rec.key_material
    return {
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

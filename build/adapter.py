"""Package a PEFT LoRA adapter as an adapter artifact for the model a build just published.

The adapter's files are checked (PEFT LoRA, safetensors only, readable headers, ranks consistent) and matched
against the base's own tensors (artifacts/adapters.py), then published like any artifact: each file hashed, a
manifest whose ``adapter`` block names the base artifact's name and digest, rank, alpha, target modules and dtype.
Its target block is the base's: the runtime checks an adapter against the host exactly as it checks its base.
"""

from __future__ import annotations

from pathlib import Path

from artifacts import __version__ as kiln_version
from artifacts import ops
from artifacts.adapters import FILES, AdapterError, base_tensors, check_base, read_adapter
from artifacts.digest import sha256_file
from artifacts.manifest import FileEntry, Manifest
from artifacts.uri import ArtifactRef
from build.cache import StageCache, StageRecord
from build.config import ADAPTER_SYNTH, BuildConfig
from build.errors import BuildError
from build.stages import StageInput, StageSpec, run_stage

SYNTH = StageSpec(name="synth-adapter", toolchain="build", entry="build.tiny.lora:run")


def package_adapter(
    cfg: BuildConfig, base: StageRecord, base_manifest: Manifest, cache: StageCache, store: str
) -> tuple[ArtifactRef, Manifest]:
    directory, provenance, name = _source(cfg, base, cache)
    try:
        info = read_adapter(directory, allow_pickle=cfg.adapter.allow_pickle)
        check_base(info, base_tensors(base.path), f"{base_manifest.name} ({base_manifest.digest[:19]}…)")
    except AdapterError as exc:
        raise BuildError("adapter", exc.message, key="adapter.source", fix=exc.fix) from None
    files = [FileEntry(f, *_hashed(directory / f)) for f in FILES]
    manifest = Manifest.create(
        name=name,
        files=files,
        target=base_manifest.target,
        serving={},
        provenance={"kiln_version": kiln_version, "source": provenance},
        adapter=info.to_dict() | {"base": {"name": base_manifest.name, "digest": base_manifest.digest}},
    )
    ref = ops.publish(directory, manifest, store, tags=cfg.publish.tags, signing_key=cfg.publish.key_path())
    return ref, manifest


def _source(cfg: BuildConfig, base: StageRecord, cache: StageCache) -> tuple[Path, dict[str, str], str]:
    a = cfg.adapter
    assert a.source is not None
    if a.source == ADAPTER_SYNTH:
        params = {"seed": a.synth.seed, "rank": a.synth.rank, "target_modules": list(a.synth.target_modules)}
        params["base_name"] = cfg.model.name
        rec = run_stage(SYNTH, params, {"base": StageInput(base.path, base.output_digest)}, cache, force=cfg.force)
        name = a.name or f"{cfg.model.name}-lora{a.synth.seed}"
        return rec.path, {"kind": "synthesized", "uri": a.source, "digest": rec.output_digest}, _named(name)
    path = Path(a.source).expanduser()
    if not path.is_dir():
        raise BuildError(
            "adapter",
            f"{a.source!r} is not a directory",
            key="adapter.source",
            fix="pass the PEFT adapter directory (the one holding adapter_config.json), or kiln:tiny-lora",
        )
    return path, {"kind": "local", "uri": str(path.resolve())}, _named(a.name or path.name)


def _named(name: str) -> str:
    from artifacts.names import name_problem

    if (why := name_problem(name)) is not None:
        raise BuildError("adapter", why, key="adapter.name", fix="set adapter.name=<a valid name>")
    return name


def _hashed(path: Path) -> tuple[int, str]:
    digest, size = sha256_file(path)
    return size, digest

"""The artifact manifest: schema, canonical bytes and digest.

An artifact is a directory of files plus ``manifest.json``. The manifest lists every file with its size and
sha256, the provenance of the build, the *target* block the runtime checks against its host before loading,
and serving defaults. The artifact's identity is the sha256 of the manifest's canonical bytes, so nothing
volatile (time, host, user) may enter it: identical inputs give the identical digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

from artifacts.digest import is_digest, sha256_bytes
from artifacts.errors import ManifestError
from artifacts.names import name_problem
from artifacts.targets import DEVICE_KINDS, task_problem

SCHEMA = "kiln.artifact/v1"
MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "signatures.json"  # beside manifest.json: the artifact's signatures (artifacts/signing.py)
# Bounds on what a reader parses: real checkpoints hold a few thousand files at most and a manifest of a few MB; a
# hostile one of 10^6 entries (120 MB of JSON) would take half a minute of validation before anything was refused.
MAX_FILES = 100_000
MAX_MANIFEST_BYTES = 64 << 20
COMPILE_CACHE_DIR = "compile_cache"  # an engine's precompiled cache inside an artifact (compile=vllm, tensorrt_llm)
# compile=tensorrt_llm: the LLM-API options (a YAML of TorchLlmArgs fields, also `trtllm-serve --config`'s file) and,
# from a GPU build host, the autotuner's cache (TLLM_AUTOTUNER_CACHE_PATH) under COMPILE_CACHE_DIR.
LLM_API_OPTIONS = "llm_api_options.yaml"
AUTOTUNER_CACHE = "trtllm_autotuner_cache.json"


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside an artifact, else raise ManifestError.

    Refuses absolute paths, ``..`` and ``.`` components, empty components, backslashes and NUL bytes: a
    manifest must never make a reader write or read outside the artifact directory.
    """
    if not path or "\x00" in path or "\\" in path or path.startswith("/"):
        raise ManifestError(f"unsafe path in manifest: {path!r} (paths must be relative, '/'-separated)")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"unsafe path in manifest: {path!r} (no '.', '..' or empty components)")
    if path in (MANIFEST_NAME, SIGNATURES_NAME):
        raise ManifestError(f"{path!r} is reserved for the manifest and its signatures; a manifest cannot list it")
    return str(PurePosixPath(path))


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact."""

    path: str
    size: int
    sha256: str  # "sha256:<hex>"

    def __post_init__(self) -> None:
        check_relpath(self.path)
        if not isinstance(self.size, int) or self.size < 0:
            raise ManifestError(f"file {self.path!r}: size must be a non-negative integer, got {self.size!r}")
        if not is_digest(self.sha256):
            raise ManifestError(f"file {self.path!r}: sha256 must look like 'sha256:<64 hex>', got {self.sha256!r}")


@dataclass(frozen=True)
class Target:
    """What the artifact needs from the host: the runtime's compatibility key.

    ``engine_version`` is a PEP 440 specifier ("" accepts any version). ``devices`` lists the device kinds
    the artifact runs on. ``compile`` holds the compatibility key of precompiled content (empty when nothing
    was compiled ahead of time); every entry must match the host exactly. ``unknown`` keeps fields written
    by a newer kiln, which this runtime cannot check and therefore refuses.
    """

    engine: str
    engine_version: str
    devices: tuple[str, ...]
    dtype: str
    tensor_parallel_degree: int
    max_model_len: int
    quantization: str = "none"
    compile: Mapping[str, str] = field(default_factory=dict)
    task: str = "generate"
    unknown: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["devices"] = list(self.devices)
        data["compile"] = dict(self.compile)
        if self.task == Target.task:
            del data["task"]
        data.update(data.pop("unknown"))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        known = {f for f in cls.__dataclass_fields__ if f != "unknown"}
        missing = sorted(k for k in known - {"quantization", "compile", "task"} if k not in data)
        if missing:
            raise ManifestError(f"target block is missing {', '.join(missing)}")
        try:
            target = cls(
                engine=str(data["engine"]),
                engine_version=str(data["engine_version"]),
                devices=tuple(str(d) for d in data["devices"]),
                dtype=str(data["dtype"]),
                tensor_parallel_degree=int(data["tensor_parallel_degree"]),
                max_model_len=int(data["max_model_len"]),
                quantization=str(data.get("quantization", "none")),
                compile={str(k): str(v) for k, v in dict(data.get("compile") or {}).items()},
                task=str(data.get("task", cls.task)),
                unknown={k: v for k, v in data.items() if k not in known},
            )
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"target block is malformed: {exc}") from exc
        bad = [d for d in target.devices if d not in DEVICE_KINDS]
        if bad or not target.devices:
            raise ManifestError(f"target.devices must be a non-empty subset of {list(DEVICE_KINDS)}, got {bad}")
        if (why := task_problem(target.task)) is not None:
            raise ManifestError(f"target.task: {why}")
        return target


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. Build one with :meth:`create` or :meth:`from_bytes`."""

    name: str
    files: tuple[FileEntry, ...]
    target: Target
    serving: Mapping[str, Any]
    provenance: Mapping[str, Any]
    schema: str = SCHEMA
    # A LoRA adapter artifact's description (artifacts/adapters.py: AdapterInfo.to_dict plus "base": the base
    # artifact's name and digest); None for a model. Absent from the bytes when None, so model digests are as before.
    adapter: Mapping[str, Any] | None = None

    @classmethod
    def create(
        cls,
        name: str,
        files: Iterable[FileEntry],
        target: Target,
        serving: Mapping[str, Any],
        provenance: Mapping[str, Any],
        adapter: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Validate and build a manifest; files are sorted by path so the bytes are canonical."""
        if (why := name_problem(name)) is not None:
            raise ManifestError(why)
        entries = tuple(sorted(files, key=lambda e: e.path))
        seen: set[str] = set()
        for entry in entries:
            if entry.path in seen:
                raise ManifestError(f"file {entry.path!r} is listed twice")
            seen.add(entry.path)
        _check_no_file_dir_clash(seen)
        if adapter is not None and not isinstance(adapter.get("base"), Mapping):
            raise ManifestError("adapter block must name its base artifact (adapter.base)")
        return cls(
            name=name,
            files=entries,
            target=target,
            serving=dict(serving),
            provenance=dict(provenance),
            adapter=None if adapter is None else dict(adapter),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "name": self.name,
            "files": [asdict(e) for e in self.files],
            "target": self.target.to_dict(),
            "serving": dict(self.serving),
            "provenance": dict(self.provenance),
        } | ({} if self.adapter is None else {"adapter": dict(self.adapter)})

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, UTF-8. These exact bytes are what gets digested."""
        return canonical_json(self.to_dict())

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical bytes: the artifact's identity."""
        return sha256_bytes(self.to_bytes())

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate manifest bytes; raises ManifestError naming the first problem."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(data)} bytes, more than kiln reads ({MAX_MANIFEST_BYTES})")
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ManifestError("manifest must be a JSON object")
        schema = raw.get("schema")
        if schema != SCHEMA:
            raise ManifestError(f"unsupported manifest schema {schema!r}; this kiln reads {SCHEMA!r}")
        if isinstance(raw.get("files"), list) and len(raw["files"]) > MAX_FILES:
            raise ManifestError(f"manifest lists {len(raw['files'])} files, more than kiln accepts ({MAX_FILES})")
        try:
            files = [FileEntry(path=f["path"], size=f["size"], sha256=f["sha256"]) for f in raw["files"]]
            return cls.create(
                name=raw["name"],
                files=files,
                target=Target.from_dict(raw["target"]),
                serving=raw.get("serving") or {},
                provenance=raw.get("provenance") or {},
                adapter=raw.get("adapter"),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"manifest is missing or has a malformed field: {exc}") from exc


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes for digesting: sorted keys, compact separators, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _check_no_file_dir_clash(paths: set[str]) -> None:
    """Refuse manifests where one entry is both a file and a parent directory of another."""
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                raise ManifestError(f"{'/'.join(parts[:i])!r} is listed as a file and as a directory")

"""Acquire the model source named by ``model.source``: synthesized, a local directory, or a hub id."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from artifacts.errors import ArtifactError
from artifacts.ops import scan_dir
from artifacts.paths import cache_root
from build.cache import StageCache, StageRecord, files_digest
from build.config import SYNTH_SCHEME, ModelConfig
from build.errors import BuildError
from build.stages import StageInput, StageSpec, run_stage

SYNTH = StageSpec(name="synth", toolchain="build", entry="build.tiny.model:run")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class Source:
    input: StageInput
    provenance: dict[str, Any]  # stable facts: enter the manifest
    record: dict[str, Any] = field(default_factory=dict)  # volatile facts (paths): the build record only
    stage: StageRecord | None = None  # set when the source itself was produced by a stage (synthesis)


def acquire(model: ModelConfig, cache: StageCache, *, force: bool) -> Source:
    src = model.source
    if src.startswith(SYNTH_SCHEME):
        rec = run_stage(SYNTH, asdict(model.synth), {}, cache, force=force)
        return Source(
            StageInput(rec.path, rec.output_digest),
            {"kind": "synthesized", "uri": src, "digest": rec.output_digest},
            stage=rec,
        )
    if src.startswith("s3://"):
        return _s3(src, model.allow_pickle)
    path = Path(src).expanduser()
    if path.exists():
        return _local(path)
    if HUB_ID_RE.match(src) and not src.startswith((".", "/", "~")):
        return _hub(src, model.revision)
    raise BuildError(
        "source",
        f"{src!r} is not an existing directory, an s3:// prefix or a hub id (org/name)",
        key="model.source",
        fix="pass model.source=/path/to/hf-checkpoint",
    )


def _local(path: Path) -> Source:
    if not path.is_dir():
        raise BuildError("source", f"{path} is a file; model.source must be a checkpoint directory", key="model.source")
    digest = files_digest(scan_dir(path))
    return Source(
        StageInput(path.resolve(), digest),
        {"kind": "local", "digest": digest},
        record={"source_path": str(path.resolve())},
    )


def _s3(uri: str, allow_pickle: bool) -> Source:
    """An HF checkpoint stored as a plain S3 prefix, mirrored into the cache (see :mod:`artifacts.s3_mirror`)."""
    from artifacts.s3_mirror import fetch_prefix

    patterns = HUB_FILES + (["pytorch_model*.bin"] if allow_pickle else [])
    try:
        path, files = fetch_prefix(uri, patterns)
    except ArtifactError as exc:
        raise BuildError(
            "source",
            str(exc),
            key="model.source",
            fix="model.source=s3://bucket/prefix/ must hold config.json and weights",
        ) from None
    digest = files_digest(files)
    return Source(
        StageInput(path, digest),
        {"kind": "s3", "uri": uri, "digest": digest},
        record={"source_path": str(path)},
    )


def _hub(repo_id: str, revision: str | None) -> Source:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    _probe(endpoint, repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        local = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, cache_dir=str(cache_root() / "hub"))
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise BuildError(
            "source",
            f"downloading {repo_id} from {endpoint} failed: {exc}",
            key="model.source",
            fix="check the id and revision, and HF_TOKEN for gated models",
        ) from exc
    src = _local(local)
    commit = local.name  # snapshot directories are named by commit sha
    return Source(
        src.input,
        {"kind": "hub", "uri": repo_id, "revision": commit, "digest": src.input.digest},
        record={"source_path": str(local)},
    )


def _probe(endpoint: str, repo_id: str, timeout: float = 5.0) -> None:
    """Fail fast, with the fix, when the hub cannot be reached (offline machines, closed networks)."""
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise BuildError(
            "source",
            f"{repo_id!r} looks like a hub id, but the hub at {endpoint} is unreachable ({exc.strerror or exc})",
            key="model.source",
            fix="download the checkpoint where the hub is reachable and pass model.source=/path/to/dir "
            "(or set HF_ENDPOINT to a reachable mirror)",
        ) from exc

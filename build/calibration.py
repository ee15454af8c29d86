"""Acquire the quantize stage's calibration text named by ``quantize.calibration``.

The stage reads its text from an *input* (a file or directory with a content digest), never from a path in
its params: the cache key then follows the content, and no host path enters the manifest. Sources:

* ``kiln:corpus`` (default): kiln's deterministic corpus (``build/tiny/corpus.py``, split ``calibration``,
  disjoint from the tiny model's training stream), written once into the cache under its content digest, so
  builds run offline. The corpus stays in ``build/``: ``quantize/`` only ever sees a text file.
* a local file (.txt, .jsonl, .json, .parquet) or a directory of them;
* a hub dataset id (``org/name``) where the hub is reachable: its data files are downloaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.digest import sha256_bytes, sha256_file
from artifacts.manifest import FileEntry
from artifacts.ops import scan_dir
from artifacts.paths import cache_root
from build.cache import files_digest
from build.errors import BuildError
from build.source import HUB_ID_RE, _probe
from build.stages import StageInput

KEY = "quantize.calibration"
KILN_CORPUS = "kiln:corpus"
SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")
HUB_PATTERNS = ["*.parquet", "*.jsonl", "*.json", "*.txt"]
CHARS_PER_TOKEN_MARGIN = 8  # the corpus is written with this many characters per needed token (BPE uses ~4)


@dataclass(frozen=True)
class Calibration:
    input: StageInput
    provenance: dict[str, Any]  # stable facts: enter the stage params and the manifest
    record: dict[str, Any] = field(default_factory=dict)  # host paths: the build record only


def problems(source: str) -> list[tuple[str, str]]:
    """Config-time checks of a calibration source (existence, emptiness, file type); hub ids are checked later."""
    if source == KILN_CORPUS:
        return []
    if source.startswith("kiln:"):
        return [(KEY, f"{source!r}: the only built-in calibration source is {KILN_CORPUS!r}")]
    path = Path(source).expanduser()
    if not path.exists():
        if HUB_ID_RE.match(source) and not source.startswith((".", "/", "~")):
            return []
        return [(KEY, f"{source!r} is not an existing file or directory, nor a hub dataset id (org/name)")]
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            return [(KEY, f"{path} is not a text, JSONL, JSON or parquet file ({', '.join(SUFFIXES)})")]
        if path.stat().st_size == 0 or not path.read_bytes()[:65536].strip():
            return [(KEY, f"{path} is empty")]
        return []
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES]
    if not files:
        return [(KEY, f"{path} holds no {', '.join(SUFFIXES)} files")]
    if all(p.stat().st_size == 0 for p in files):
        return [(KEY, f"every calibration file under {path} is empty")]
    return []


def acquire(source: str, *, min_tokens: int) -> Calibration:
    if source == KILN_CORPUS:
        return _kiln_corpus(min_tokens)
    path = Path(source).expanduser()
    if path.exists():
        return _local(path.resolve())
    return _hub(source)


def _kiln_corpus(min_tokens: int) -> Calibration:
    from build.tiny.corpus import documents

    lines, size, n = [], 0, 0
    # Enough text for any tokenizer that averages under CHARS_PER_TOKEN_MARGIN characters per token.
    for doc in documents(1_000_000, seed=0, split="calibration"):
        lines.append(json.dumps({"text": doc}))
        size += len(doc)
        n += 1
        if size >= min_tokens * CHARS_PER_TOKEN_MARGIN:
            break
    body = ("\n".join(lines) + "\n").encode()
    digest = sha256_bytes(body)
    target = cache_root() / "calibration" / f"kiln-corpus-{digest.split(':')[1][:16]}" / "calibration.jsonl"
    if not (target.is_file() and target.read_bytes() == body):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, target)
    inp = StageInput(target, _file_digest(target))
    return Calibration(inp, {"kind": "kiln-corpus", "uri": KILN_CORPUS, "documents": n, "digest": inp.digest})


def _local(path: Path) -> Calibration:
    if path.is_file():
        digest = _file_digest(path)
        kind = "file"
    else:
        digest = files_digest(scan_dir(path))
        kind = "directory"
    return Calibration(StageInput(path, digest), {"kind": kind, "digest": digest}, {"calibration_path": str(path)})


def _hub(repo_id: str) -> Calibration:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        _probe(endpoint, repo_id)
    except BuildError as exc:
        raise BuildError(
            "calibration",
            f"{repo_id!r} looks like a hub dataset id, but the hub at {endpoint} is unreachable",
            key=KEY,
            fix="pass a local text/JSONL file or directory, or leave quantize.calibration at kiln:corpus",
        ) from exc
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        local = Path(
            snapshot_download(
                repo_id, repo_type="dataset", allow_patterns=HUB_PATTERNS, cache_dir=str(cache_root() / "hub")
            )
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise BuildError("calibration", f"downloading dataset {repo_id} failed: {exc}", key=KEY) from exc
    found = _local(local)
    return Calibration(
        found.input,
        {"kind": "hub", "uri": repo_id, "revision": local.name, "digest": found.input.digest},
        found.record,
    )


def _file_digest(path: Path) -> str:
    """A single file's content digest, in the same form as a directory's (so a file and a directory holding
    only that file under the same name digest alike)."""
    digest, size = sha256_file(path)
    return files_digest([FileEntry(path=path.name, size=size, sha256=digest)])

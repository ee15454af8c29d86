"""The stage cache: every stage's output stored under the digest of its inputs, verified before reuse.

    <kiln cache>/stages/<stage>/<key hex>/out/        the stage's output files
    <kiln cache>/stages/<stage>/<key hex>/stage.json  key material, result, file list, output digest

The key covers the stage's params, its input digests, its toolchain lock and the digest of the stage's code,
so any change that could change the output misses. Entries are written to a staging directory and renamed
into place, so an interrupted stage never leaves a half entry. Concurrent builds (a --multirun sweep, two CI jobs
on one cache) may run the same stage at once: the first commit wins and later ones adopt it, because deleting an
entry another build has just committed pulls its files from under that build's next stage or publish. Entries are
only ever removed by renaming them aside first, so no reader sees one half-deleted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from artifacts.digest import sha256_bytes
from artifacts.errors import ArtifactError
from artifacts.manifest import FileEntry, canonical_json
from artifacts.ops import scan_dir, verify_files

log = logging.getLogger("kiln.build.cache")


@dataclass(frozen=True)
class StageRecord:
    stage: str
    key: str
    path: Path  # the output directory
    files: tuple[FileEntry, ...]
    output_digest: str
    result: Mapping[str, Any]
    packages: Mapping[str, str]
    key_material: Mapping[str, Any]
    cached: bool = False  # True when lookup() found it instead of the stage running
    seconds: float = 0.0  # this build's wall time for it (set by run_stage): the work, or a hit's lookup


def files_digest(files: tuple[FileEntry, ...] | list[FileEntry]) -> str:
    """Digest of a directory's content: the canonical list of (path, size, sha256)."""
    return sha256_bytes(canonical_json([[f.path, f.size, f.sha256] for f in sorted(files, key=lambda f: f.path)]))


def code_digest(entry: str, *modules: str) -> str:
    """Digest of the .py files in the entry module's package directory, plus the files of ``modules`` (code of
    other packages the stage runs, e.g. the runtime's warm-up; a package counts with every module under it):
    stage code changes invalidate the cache."""
    h = hashlib.sha256()
    for path in sorted(_module_files(entry.partition(":")[0])[0].parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for module in modules:
        for path in _module_files(module):
            h.update(module.encode() + b"\0" + path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def _module_files(module: str) -> list[Path]:
    """The source files of ``module`` (all of a package's), found without importing anything: a stage's code may
    belong to a package the build must not import (the runtime's warm-up)."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"stage code {module!r} names no importable module")
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest.split(".")) if rest else None
    if base is None or base.is_dir():
        root = base or Path(next(iter(spec.submodule_search_locations)))
        return sorted(root.rglob("*.py"))
    if base.with_suffix(".py").is_file():
        return [base.with_suffix(".py")]
    raise ValueError(f"stage code {module!r} names no importable module")


class StageCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def key_of(self, material: Mapping[str, Any]) -> str:
        return sha256_bytes(canonical_json(dict(material)))

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key.split(":")[1]

    def lookup(self, stage: str, material: Mapping[str, Any]) -> StageRecord | None:
        key = self.key_of(material)
        entry = self.entry_dir(stage, key)
        meta_path = entry / "stage.json"
        if not meta_path.is_file():
            return None
        try:
            record = self._load(stage, key, entry)
            verify_files(record.path, record.files)
        except (ArtifactError, OSError, ValueError, KeyError) as exc:
            log.warning("%s: cache entry %s is damaged (%s); rebuilding it", stage, entry, exc)
            self._discard(entry)
            return None
        return replace(record, cached=True)

    @contextmanager
    def staging(self, stage: str) -> Iterator[Path]:
        """An empty output directory next to the cache entries; removed unless committed."""
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root / stage, prefix=".staging-"))
        try:
            (tmp / "out").mkdir()
            yield tmp / "out"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(
        self,
        stage: str,
        material: Mapping[str, Any],
        out: Path,
        *,
        result: Mapping[str, Any],
        packages: Mapping[str, str],
        seconds: float,
        overwrite: bool = False,
    ) -> StageRecord:
        """Move ``out`` into the cache as the entry for ``material``. An intact entry already there (a concurrent
        build of the same stage) is kept and returned instead, unless ``overwrite`` (force=true) and its output
        differs."""
        key = self.key_of(material)
        files = tuple(scan_dir(out))
        meta = {
            "stage": stage,
            "key": key,
            "key_material": dict(material),
            "result": dict(result),
            "packages": dict(packages),
            "files": [[f.path, f.size, f.sha256] for f in files],
            "output_digest": files_digest(files),
            "seconds": round(seconds, 3),
        }
        (out.parent / "stage.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        entry = self.entry_dir(stage, key)
        peer = self._intact(stage, key, entry)
        if peer is not None and (not overwrite or peer.output_digest == meta["output_digest"]):
            return peer  # a concurrent build committed first and may be reading its files: keep them, drop ours
        if entry.exists():  # damaged, or replaced by force=true with a different output
            self._discard(entry)
        try:
            out.parent.rename(entry)
        except OSError:
            if not (entry / "stage.json").is_file():  # not a concurrent build of the same stage
                raise
        return self._load(stage, key, entry)

    def _intact(self, stage: str, key: str, entry: Path) -> StageRecord | None:
        """The committed entry at ``entry`` if its files verify, else None (absent or damaged)."""
        if not (entry / "stage.json").is_file():
            return None
        try:
            record = self._load(stage, key, entry)
            verify_files(record.path, record.files)
        except (ArtifactError, OSError, ValueError, KeyError):
            return None
        return record

    def _discard(self, entry: Path) -> None:
        """Remove an entry atomically for readers: rename it aside (a lookup then misses), then delete it."""
        trash = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".discard-"))
        with suppress(FileNotFoundError):  # a concurrent build discarded it first
            entry.rename(trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)

    def _load(self, stage: str, key: str, entry: Path) -> StageRecord:
        meta = json.loads((entry / "stage.json").read_text())
        files = tuple(FileEntry(path=p, size=s, sha256=d) for p, s, d in meta["files"])
        if files_digest(files) != meta["output_digest"]:
            raise ValueError("stage.json file list does not match its output digest")
        return StageRecord(
            stage=stage,
            key=key,
            path=entry / "out",
            files=files,
            output_digest=meta["output_digest"],
            result=meta["result"],
            packages=meta["packages"],
            key_material=meta["key_material"],
        )

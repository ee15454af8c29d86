"""What every engine with precompiled content (``target.compile``) shares: comparing the artifact's compatibility
key with this host's, the CUDA fields of such a key, and the writable copy of the artifact's ``compile_cache/``.

The vLLM engine (``vllm/compile_cache.py``: inductor's cache) and the TensorRT-LLM engine (``tensorrt_llm/``: the
autotuner's cache) each name their key's fields, the order they are checked in and why each matters
(:class:`KeyRules`); the comparison and the copy are the same for both.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from artifacts.devices import Gpu
from artifacts.digest import hex_of, sha256_file
from artifacts.manifest import COMPILE_CACHE_DIR, FileEntry, Manifest
from artifacts.paths import cache_root
from runtime.host import TargetMismatchError

log = logging.getLogger("kiln.runtime.compiled")


@dataclass(frozen=True)
class KeyRules:
    """How one engine's compile key is compared: fields in ``order`` first (a device or version mismatch explains
    the rest), ``at_least`` fields by major version (a newer host is fine), ``why`` each field matters."""

    order: tuple[str, ...]
    why: Mapping[str, str]
    at_least: frozenset[str] = frozenset()
    # Fields the runtime does not compare with the host (they say what the content was made for, e.g. the limits).
    informational: frozenset[str] = field(default_factory=frozenset)


def mismatch(recorded: Mapping[str, str], here: Mapping[str, str], rules: KeyRules) -> tuple[str, str] | None:
    """The first recorded field this host does not match, with the reason, or None when all match."""
    n = len(rules.order)
    fields = sorted(recorded, key=lambda f: (rules.order.index(f) if f in rules.order else n, f))
    for name in fields:
        if name in rules.informational:
            continue
        if name not in here:
            return name, "this runtime cannot check this field (the artifact was built by a newer kiln); upgrade kiln"
        if name in rules.at_least:
            if major(here[name]) < major(recorded[name]):
                why = rules.why[name]
                return name, f"the cache was compiled under {recorded[name]!r}, this host has {here[name]!r} ({why})"
            continue
        if recorded[name] != here[name]:
            why = rules.why.get(name, "the compiled content depends on it")
            return name, f"the cache was compiled for {recorded[name]!r}, this host has {here[name]!r} ({why})"
    return None


def major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def cuda_key(torch_cuda: str | None, gpus: tuple[Gpu, ...], install_hint: str) -> dict[str, str]:
    """The CUDA fields of a key: torch's CUDA version, the GPU's compute capability (from the driver, so a CPU
    torch cannot misreport it) and the driver version. ``install_hint`` says what to install where torch has no
    CUDA."""
    if torch_cuda is None:
        raise TargetMismatchError(
            "compile.cuda", f"this environment's torch is built without CUDA: {install_hint} on GPU hosts"
        )
    if not gpus:
        raise TargetMismatchError("compile.device", "no NVIDIA GPU is visible (nvidia-smi lists none)")
    if len({g.capability for g in gpus}) > 1:
        log.warning("GPUs of different compute capabilities: the key records the first (%s)", gpus[0].capability)
    return {"cuda": torch_cuda, "gpu_capability": gpus[0].capability, "cuda_driver": gpus[0].driver}


# ---------------------------------------------------------------------------------------------- the writable copy


def copy_root() -> Path:
    """Where writable copies of artifacts' caches live: ``<kiln cache>/compile``."""
    return cache_root() / "compile"


def writable_copy(model_dir: Path, manifest: Manifest) -> Path:
    """The artifact's ``compile_cache/``, copied where the engine may write (engines take locks, add entries on a
    miss, or rewrite a cache file after tuning).

    The copy is kept per artifact digest and checked against the manifest on every start: a damaged or missing
    file is restored from the (verified) artifact; entries a previous start added are kept.
    """
    dest = copy_root() / hex_of(manifest.digest)
    prefix = COMPILE_CACHE_DIR + "/"
    entries = [e for e in manifest.files if e.path.startswith(prefix)]
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent starts of one artifact repair the copy one at a time
        restored = [e.path for e in entries if _restore(model_dir / e.path, dest / e.path[len(prefix) :], e)]
    fresh = len(restored) == len(entries)
    if restored and not fresh:
        log.warning("compile cache copy %s: restored %s from the artifact (damaged or missing)", dest, restored[:5])
    log.info("compile cache: %d files at %s%s", len(entries), dest, " (new copy)" if fresh else "")
    return dest


def _restore(src: Path, dest: Path, entry: FileEntry) -> bool:
    """Make ``dest`` hold ``entry``'s content; True when it had to be copied. Atomic for concurrent readers."""
    intact = dest.is_file() and not dest.is_symlink() and dest.stat().st_size == entry.size
    if intact and sha256_file(dest)[0] == entry.sha256:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".restore-")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True

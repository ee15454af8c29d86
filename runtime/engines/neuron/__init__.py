"""The neuron engine package: vLLM with the vLLM Neuron plugin serving the graphs NxD Inference compiled in the build
(``compile=neuron``, compile/neuron.py), exposed to the rest of kiln as :data:`SPEC`.

``engine.py`` holds the engine and the settings mapping, ``compiled.py`` the compiled graphs' record and the check of
``target.compile`` against the host. Written for AWS Neuron SDK 2.29 (NxD Inference 0.9, read at
aws-neuron/neuronx-distributed-inference @ 4bcdc54) and vLLM Neuron 0.2.0 (vllm-project/vllm-neuron @ a5ef7c8, which
pins vllm 0.11.0). Nothing here imports vLLM or a Neuron library at import time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.engines.base import Engine, EngineDefault, EngineSettings, EngineSpec

if TYPE_CHECKING:
    from artifacts.manifest import Manifest

log = logging.getLogger("kiln.runtime.neuron")
# LMI's option.rolling_batch values for its Neuron backend: "tnx" (djl-serving 0.32.0-dlc at 3d6ad83,
# properties.py RollingBatchEnum; on LMI's Neuron image its continuous batching ran transformers-neuronx, whose
# successor, NxD Inference, kiln serves). LMI's Neuron image also took "vllm" (vLLM with the Neuron plugin, as
# here) and "lmi-dist", but those name kiln's vllm engine; for a Neuron artifact the artifact picks the engine.
LMI_NAMES = ("tnx",)
INSTALL_HINT = (
    "use AWS's Neuron DLAMI or Neuron Deep Learning Container of SDK 2.29, or pip install "
    "--extra-index-url https://pip.repos.neuron.amazonaws.com neuronx-distributed-inference==0.9.17334 vllm==0.11.0 "
    "and vllm-neuron 0.2.0 (github.com/vllm-project/vllm-neuron), with kiln[runtime]"
)


def _create(settings: EngineSettings) -> Engine:
    from runtime.engines.neuron.engine import NeuronEngine

    return NeuronEngine(settings)


def _native_keys() -> set[str]:
    from runtime.engines.vllm.engine import accepted_keys

    return accepted_keys()  # vLLM's AsyncEngineArgs, as installed (check() refuses what the graphs fixed)


def _native_args(s: EngineSettings) -> dict[str, Any]:
    """vLLM's arguments, the plugin's environment and the compiled graphs they serve (``runtime config``)."""
    from dataclasses import asdict

    from runtime.engines.neuron.compiled import Compiled, NotCompiledError
    from runtime.engines.neuron.engine import engine_args, environment

    try:
        compiled = Compiled.read(s.model_dir)
    except NotCompiledError as exc:
        return {"error": str(exc)}
    return {"vllm": engine_args(s), "environment": environment(s), "compiled": asdict(compiled)}


def _defaults(s: EngineSettings) -> dict[str, EngineDefault]:
    from runtime.engines.neuron.compiled import Compiled, NotCompiledError

    try:
        compiled = Compiled.read(s.model_dir)
    except NotCompiledError:
        return {}  # check() says why
    out = {}
    if s.max_num_seqs is None:
        out["max_num_seqs"] = EngineDefault(compiled.batch_size, "the compiled graphs' batch size")
    if s.max_model_len is None:
        out["max_model_len"] = EngineDefault(compiled.seq_len, "the compiled graphs' sequence length")
    for key in ("enable_prefix_caching", "enable_chunked_prefill"):
        if getattr(s, key) is None:
            out[key] = EngineDefault(False, "the graphs were compiled with a contiguous KV cache")
    return out


def _check(s: EngineSettings) -> list[str]:
    from runtime.engines.neuron.compiled import NotCompiledError
    from runtime.engines.neuron.engine import problems

    try:
        return problems(s)
    except NotCompiledError as exc:
        return [str(exc)]


class _Compile:
    """The compiled graphs' key (``target.compile``), checked against this host before anything loads."""

    def prepare(self, model_dir: Path, manifest: Manifest, settings: EngineSettings, ignore: bool) -> EngineSettings:
        from runtime.engines.neuron.compiled import installed, mismatch
        from runtime.host import TargetMismatchError, detect

        bad = mismatch(manifest.target.compile, detect(), installed(), settings.dtype)
        if bad is None:
            return settings
        if ignore:  # the plugin would recompile into the artifact's directory: kiln never lets it
            log.warning("--ignore-compile-cache cannot serve Neuron graphs that do not fit (compile.%s)", bad[0])
        raise TargetMismatchError(f"compile.{bad[0]}", bad[1])

    async def warm_up(self, settings: EngineSettings, cache_dir: Path) -> dict[str, Any]:
        raise NotImplementedError("compile=neuron compiles with NxD Inference in the build (compile/neuron.py)")


def _preload() -> None:
    from runtime.engines.vllm import SPEC as VLLM

    VLLM.preload()  # the plugin runs inside vLLM: the same import


SPEC = EngineSpec(
    name="neuron",
    distributions=("vllm-neuron",),
    install_hint=INSTALL_HINT,
    create=_create,
    native_keys=_native_keys,
    native_args=_native_args,
    defaults=_defaults,
    lmi_names=LMI_NAMES,
    compile=_Compile(),
    preload=_preload,
    check=_check,
    tasks=("generate",),
)

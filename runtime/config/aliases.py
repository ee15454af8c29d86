"""The names operators use for kiln's settings: LMI's, vLLM's, TGI's and SageMaker's aliases, LMI keys kiln accepts
without effect, and key canonicalization (``option.Max_Rolling_Batch_Size`` -> ``max_rolling_batch_size``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from runtime import engines

GIB = 1 << 30

# Other names for canonical settings (LMI, vLLM), with a conversion where the units differ.
ALIASES: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "model_id": ("model", None),
    "max_rolling_batch_size": ("max_num_seqs", None),
    "tensor_parallel_size": ("tensor_parallel_degree", None),
    "rolling_batch": ("engine", lambda v: rolling_batch(str(v))),
    "kv_cache_memory_bytes": ("kv_cache_gib", lambda v: finite(v) / GIB),
    "max_request_size_mb": ("max_request_size", lambda v: int(finite(v) * (1 << 20))),  # SAGEMAKER_MAX_PAYLOAD_IN_MB
    # engine-native settings with an LMI name: they pass through under vLLM's name
    "quantize": ("quantization", None),
    "max_rolling_batch_prefill_tokens": ("max_num_batched_tokens", None),
    "cpu_offload_gb_per_gpu": ("cpu_offload_gb", None),
    "pipeline_parallel_degree": ("pipeline_parallel_size", None),
}
# LMI's option.task values (and HF_TASK) as kiln's target tasks (artifacts/targets.py: TASKS).
TASK_NAMES = {
    "text-generation": "generate",
    "generate": "generate",
    "text-embedding": "embed",
    "feature-extraction": "embed",
    "embed": "embed",
    "embedding": "embed",
}
DTYPE_NAMES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}

# Environment variables that are not OPTION_*/SERVING_*: LMI, TGI and SageMaker names. Rank 0 entries are the
# container-level translations LMI applies only when its own variable is unset.
ENV_ALIASES: dict[str, tuple[str, int]] = {
    "HF_MODEL_ID": ("model_id", 1),
    "HF_REVISION": ("revision", 1),
    "TENSOR_PARALLEL_DEGREE": ("tensor_parallel_degree", 1),
    "HF_MODEL_QUANTIZE": ("quantize", 0),
    "HF_MODEL_TRUST_REMOTE_CODE": ("trust_remote_code", 0),
    "HF_TASK": ("task", 1),
    "MAX_BATCH_SIZE": ("max_rolling_batch_size", 0),
    "MAX_BATCH_PREFILL_TOKENS": ("max_rolling_batch_prefill_tokens", 0),
    "MAX_CONCURRENT_REQUESTS": ("job_queue_size", 0),
    "ENABLE_CUDA_GRAPHS": ("enforce_eager", 0),  # inverted below
    "CUDA_MEMORY_FRACTION": ("gpu_memory_utilization", 0),
    "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": ("predict_timeout", 0),
    "SAGEMAKER_STARTUP_TIMEOUT": ("model_loading_timeout", 0),
    "PREDICT_TIMEOUT": ("predict_timeout", 0),
    "MODEL_LOADING_TIMEOUT": ("model_loading_timeout", 0),
    "SAGEMAKER_BIND_TO_PORT": ("port", 0),
    "SAGEMAKER_MAX_REQUEST_SIZE": ("max_request_size", 0),
    "SAGEMAKER_MAX_PAYLOAD_IN_MB": ("max_request_size_mb", 0),
    "VLLM_API_KEY": ("api_key", 1),  # vLLM's variable for --api-key
    # SageMaker inference components start a LoRA-serving base with these (vLLM DLC spellings)
    "SM_VLLM_ENABLE_LORA": ("enable_lora", 1),
    "SM_VLLM_MAX_LORA_RANK": ("max_lora_rank", 1),
    "SM_VLLM_MAX_LORAS": ("max_loras", 1),
    "SM_VLLM_MAX_CPU_LORAS": ("max_cpu_loras", 1),
}
# SageMaker sets SM_NUM_GPUS on every instance: a fact about the host, used only when no artifact fixes the degree.
HOST_HINTS = {"SM_NUM_GPUS": "tensor_parallel_degree"}

# LMI keys about its Java front end and worker pool: accepted, without effect here, and listed by `config`.
IGNORED: dict[str, str] = {
    "async_mode": "kiln always serves requests asynchronously",
    "mpi_mode": "kiln runs one Python process; the engine manages its own workers",
    "minworkers": "one engine per server",
    "maxworkers": "one engine per server",
    "min_worker": "one engine per server",
    "max_worker": "one engine per server",
    "load_on_devices": "the engine places the model",
    "max_idle_time": "requests are not batched by the front end",
    "max_batch_delay": "requests are not batched by the front end",
    "enable_streaming": "streaming is per request (`stream: true`)",
    "parallel_loading": "one engine per server",
    "required_memory_mb": "no front-end memory check",
    "reserved_memory_mb": "no front-end memory check",
    "chunked_read_timeout": "streams are bounded by predict_timeout",
    "features": "the engine comes from the artifact's target block",
    "download_dir": "pulled artifacts live in kiln's pull cache",
    "device_map": "the engine places the model",
    "load_models": "the server serves the one model it was started with",
    "model_store": "the server serves the one model it was started with",
    "inference_address": "use host and port",
    "management_address": "the adapter routes share the inference address",
    "prometheus": "/metrics is always served",
}


def finite(value: Any) -> float:
    """A number for a unit conversion: NaN and infinities are refused (ValueError), not converted."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def canonical(key: str) -> str:
    """``option.Max_Rolling_Batch_Size`` → ``max_rolling_batch_size`` (aliases are resolved later)."""
    key = key.strip()
    if key.lower().startswith("option."):
        key = key[len("option.") :]
    return key.lower()


def rolling_batch(value: str) -> str | None:
    """LMI's ``option.rolling_batch`` as a kiln engine name (None: "let the artifact decide"); each engine package
    names the LMI values that mean it. An unknown value is returned as is, for validation to name."""
    low = value.strip().lower()
    if low in ("auto", "disable"):
        return None
    for name in engines.ENGINES:
        if low in engines.get(name).lmi_names:
            return name
    return value

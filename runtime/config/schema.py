"""The serving configuration's schema (every kiln setting, its default and help text, written once here) and the
types resolution works with: where a value came from (:class:`Origin`), one value from one source (:class:`Entry`),
and the validated result (:class:`Resolved`).

``runtime/__main__.py`` generates its flags from :class:`ServeConfig`; engine defaults (``max_num_seqs``, the KV
cache on CPU) are left None here and filled by the engine's ``defaults`` hook (runtime/settings.py: derive).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from artifacts.errors import KilnError

SOURCES = ("default", "artifact", "serving.properties", "env", "cli")
PROPERTIES = "serving.properties"
SAGEMAKER_MODEL_DIR = "/opt/ml/model"
CONTAINER_HOST, CONTAINER_PORT = "0.0.0.0", 8080  # LMI's and SageMaker's container contract


class ConfigError(KilnError):
    """Configuration and start-up problems, all of them, each naming the key and where it was set."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        listed = [f"  - {p}" for p in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:  # a file of 100 000 bad lines: the first ones say what is wrong
            listed.append(f"  … and {len(problems) - MAX_LISTED} more problems of the same sources")
        super().__init__("cannot start the server:\n" + "\n".join(listed))


MAX_LISTED = 40
SHOWN_CHARS = 80


def shown(key: str, value: Any) -> str:
    """A value as an error message quotes it: a secret setting's masked, a long one cut to its start."""
    if key in SECRET_FIELDS:
        return "'***'"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({len(text)} characters)"


SECRET_FIELDS = frozenset({"api_key"})  # shown as "***" wherever settings are printed (`runtime config`, logs)
# Settings only the operator may give (environment, command line): the model's own files (its manifest's serving
# block, a serving.properties beside it) must not choose whose signature the server trusts.
OPERATOR_ONLY = frozenset({"trusted_keys"})


class ServeConfig(BaseModel):
    """Every kiln serving setting (canonical names). Engine-native extras live in ``engine_args``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="artifact URI or directory (LMI: option.model_id, HF_MODEL_ID)")
    served_model_name: str | None = Field(None, description="model name in API responses (default: artifact name)")
    host: str = Field(
        "127.0.0.1", description="bind address (0.0.0.0 in container mode: the model from HF_MODEL_ID or /opt/ml/model)"
    )
    port: int = Field(8080, ge=0, le=65535, description="listen port")
    api_key: str | None = Field(
        None,
        description="require 'Authorization: Bearer <key>' on every route but /ping, /health and /metrics (vLLM: "
        "--api-key, VLLM_API_KEY); give it through the environment (OPTION_API_KEY), not the command line",
    )
    engine: str | None = Field(None, description="engine for a plain Hugging Face dir (an artifact names its own)")
    task: Literal["generate", "embed"] | None = Field(
        None,
        description="what the model serves: generate (text) or embed (vectors; LMI: option.task text-embedding, "
        "HF_TASK); default: the artifact's target.task, a plain directory's architecture",
    )
    normalize: bool = Field(True, description="embeddings: L2-normalize the vectors (LMI: option.normalize)")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", description="weights/activations")
    max_model_len: int | None = Field(None, ge=1, description="max prompt + output tokens")
    max_num_seqs: int | None = Field(
        None, ge=1, description="max concurrent sequences (LMI: max_rolling_batch_size; default: the engine's)"
    )
    tensor_parallel_degree: int | None = Field(None, ge=1, description="devices per model (vLLM: tensor_parallel_size)")
    enforce_eager: bool = Field(False, description="no CUDA graphs / compilation")
    enable_prefix_caching: bool | None = Field(None, description="reuse KV of shared prompt prefixes")
    enable_chunked_prefill: bool | None = Field(None, description="split long prefills across steps")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV cache budget in GiB (default on CPU: the engine's)")
    job_queue_size: int = Field(1000, ge=1, description="generation requests in flight before 503")
    max_request_size: int = Field(
        16 << 20,
        ge=1,
        description="bytes a request body may hold; a larger one gets 413 before it is read (LMI's name; "
        "SageMaker: SAGEMAKER_MAX_REQUEST_SIZE, SAGEMAKER_MAX_PAYLOAD_IN_MB)",
    )
    max_prompt_chars: int | None = Field(
        None,
        ge=1,
        description="characters a prompt may have, checked before tokenizing (default: 64 per token of "
        "max_model_len, more than any prompt that fits)",
    )
    max_stop_sequences: int = Field(64, ge=0, description="stop sequences one request may give (TGI's name)")
    predict_timeout: float = Field(240.0, gt=0, description="seconds one request may take (LMI: predict_timeout)")
    model_loading_timeout: float = Field(1800.0, gt=0, description="seconds the engine may take to load")
    output_formatter: Literal["json", "jsonlines", "sse"] = Field("json", description="LMI response form")
    tgi_compat: bool = Field(False, description="LMI responses in TGI's form (array, SSE streaming)")
    chat_template: str | None = Field(None, description="Jinja chat template (a file or the template text)")
    graceful_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    timeout_keep_alive: float = Field(
        75.0,
        gt=0,
        description="seconds an idle keep-alive connection stays open (vLLM: --timeout-keep-alive, 5 by default); "
        "longer than the 60 s idle timeout of SageMaker's and AWS load balancers' front ends, so the server never "
        "closes a connection a client or proxy is about to reuse",
    )
    ignore_compile_cache: bool = Field(
        False,
        description="serve a precompiled artifact without its compile cache where its target.compile key does not "
        "match this host (vLLM then compiles at start)",
    )
    allow_pickle: bool = Field(
        False,
        description="fetch pickle weights (*.bin, *.pt) from a plain S3 checkpoint that has no safetensors (loading "
        "pickle can run code: allow it only for checkpoints you trust)",
    )
    enable_lora: bool = Field(
        False,
        description="serve LoRA adapters: the adapter routes (/adapters, /models/{model}/adapters, "
        "/v1/load_lora_adapter) and per-request adapters (SageMaker: SM_VLLM_ENABLE_LORA)",
    )
    max_loras: int = Field(4, ge=1, description="LoRA adapters in one batch (LMI's default)")
    max_lora_rank: int = Field(16, ge=1, description="the largest LoRA rank accepted (vLLM: 1, 8, 16, 32, 64 …)")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="LoRA adapters kept loaded in host memory (default: the engine's, max_loras in vLLM)"
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters registered at start, name=src[,name=src…] (src: an adapter directory or an "
        "adapter artifact URI); the model directory's adapters/<name>/ folders are registered too",
    )
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="directories a local adapter src may lie in (comma-separated), beside /opt/ml and the model "
        "directory's adapters/ folder; artifact URIs are verified instead",
    )
    speculative_config: dict[str, Any] | None = Field(
        None,
        description='speculative decoding, as vLLM\'s JSON object: {"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4} or {"method": "draft_model", "model": <dir or artifact URI>, '
        '"num_speculative_tokens": 4}; an artifact built with speculative=… records one',
    )
    speculative_draft_model: str | None = Field(
        None, description='LMI\'s draft-model name: {"method": "draft_model", "model": this} (a dir or artifact URI)'
    )
    speculative_length: int | None = Field(
        None, ge=1, description="LMI's tokens proposed per step (num_speculative_tokens; default 4 with a draft model)"
    )
    draft_model_tp_size: int | None = Field(
        None, ge=1, description="LMI's draft tensor-parallel degree (vLLM: draft_tensor_parallel_size)"
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="serve only artifacts signed by one of these Ed25519 public keys (PEM files, comma-separated; "
        "`python -m artifacts keygen` makes them, publish.signing_key signs); environment or command line only",
    )
    engine_args: dict[str, Any] = Field(default_factory=dict, description="engine-native keys passed through")

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        """Text sources (serving.properties, the environment, the command line) give the object as JSON."""
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else None
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
            if value is not None and not isinstance(value, dict):
                raise ValueError('expected a JSON object such as {"method": "ngram", "num_speculative_tokens": 4}')
        return value

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapter_pairs(cls, value: Any) -> Any:
        """Text sources give ``name=src,name=src`` (or a JSON object)."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        pairs = [p.partition("=") for p in text.split(",") if p.strip()]
        bad = [name for name, sep, src in pairs if not sep or not name.strip() or not src.strip()]
        if bad:
            raise ValueError(f"expected name=src pairs separated by commas, got {bad[0]!r}")
        return {name.strip(): src.strip() for name, _, src in pairs}

    @field_validator("adapter_roots", "trusted_keys", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value


FIELDS = set(ServeConfig.model_fields) - {"engine_args"}


@dataclass(frozen=True)
class Origin:
    """Where a value was set: the source and the name the operator used there."""

    source: str  # one of SOURCES
    name: str  # "option.max_rolling_batch_size", "MAX_BATCH_SIZE", "--max-num-seqs", "serving.max_num_seqs"

    def __str__(self) -> str:
        if self.source == "default":
            return f"default ({self.name})" if self.name else "default"
        return f"{self.source} {self.name}"


@dataclass
class Entry:
    key: str  # canonical key
    value: Any
    origin: Origin
    rank: int = 1  # within one source, a translated alias (0) yields to the native name (1) without a conflict


@dataclass(frozen=True)
class Resolved:
    """The validated configuration, the origin of every value that was set, and the keys kiln ignored."""

    config: ServeConfig
    origins: Mapping[str, Origin]  # canonical key (or "engine_args.<key>") -> origin; absent: default
    ignored: tuple[tuple[Origin, str], ...] = ()

    def origin(self, key: str) -> Origin:
        return self.origins.get(key, Origin("default", ""))

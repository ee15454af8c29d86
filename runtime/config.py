"""The serving configuration: one model, one precedence, validated once, every value traced to its source.

Sources, lowest precedence first::

    default < artifact (the manifest's "serving" block) < serving.properties (in the model directory)
            < environment (OPTION_* / SERVING_* and the LMI, TGI and SageMaker aliases) < command line

LMI users' names work (``option.max_rolling_batch_size``, ``MAX_BATCH_SIZE``, ``option.tensor_parallel_degree`` …)
beside vLLM's (``max_num_seqs``, ``tensor_parallel_size`` …); two names for one setting in one source must agree.
A key that is not a kiln setting passes through to the engine when the engine accepts it (vLLM: an
``AsyncEngineArgs`` field), else the server refuses to start naming it. The artifact's target block wins where an
operator value would contradict what was built (a longer ``max_model_len``, another engine or parallel degree).
All problems are reported together in one :class:`ConfigError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from artifacts.manifest import Manifest

SOURCES = ("default", "artifact", "serving.properties", "env", "cli")
PROPERTIES = "serving.properties"
SAGEMAKER_MODEL_DIR = "/opt/ml/model"
GIB = 1 << 30


class ConfigError(Exception):
    """Configuration problems, all of them, each naming the key and where it was set."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid serving configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class ServeConfig(BaseModel):
    """Every kiln serving setting (canonical names). Engine-native extras live in ``engine_args``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="artifact URI or directory (LMI: option.model_id, HF_MODEL_ID)")
    served_model_name: str | None = Field(None, description="model name in API responses (default: artifact name)")
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 when serving SageMaker's model directory)")
    port: int = Field(8080, ge=0, le=65535, description="listen port")
    engine: str | None = Field(None, description="serving engine (default: the artifact's target.engine)")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", description="weights/activations")
    max_model_len: int | None = Field(None, ge=1, description="max prompt + output tokens")
    max_num_seqs: int = Field(32, ge=1, description="max concurrent sequences (LMI: max_rolling_batch_size)")
    tensor_parallel_degree: int | None = Field(None, ge=1, description="devices per model (vLLM: tensor_parallel_size)")
    enforce_eager: bool = Field(False, description="no CUDA graphs / compilation")
    enable_prefix_caching: bool | None = Field(None, description="reuse KV of shared prompt prefixes")
    enable_chunked_prefill: bool | None = Field(None, description="split long prefills across steps")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV cache budget in GiB (CPU default 1)")
    job_queue_size: int = Field(1000, ge=1, description="requests in flight before 503 (MAX_CONCURRENT_REQUESTS)")
    predict_timeout: float = Field(240.0, gt=0, description="seconds one request may take (LMI: predict_timeout)")
    model_loading_timeout: float = Field(1800.0, gt=0, description="seconds the engine may take to load")
    output_formatter: Literal["json", "jsonlines", "sse"] = Field("json", description="LMI response form")
    tgi_compat: bool = Field(False, description="LMI responses in TGI's form (array, SSE streaming)")
    chat_template: str | None = Field(None, description="Jinja chat template: a file path or the template text")
    graceful_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    ignore_compile_cache: bool = Field(
        False, description="serve a precompiled artifact without its compile cache where its key does not match"
    )
    engine_args: dict[str, Any] = Field(default_factory=dict, description="engine-native keys passed through")


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


# -- names ------------------------------------------------------------------------------------------------------

# LMI's option.rolling_batch values: "scheduler" was its HF-Accelerate backend, whose successor is transformers.
ROLLING_BATCH = {"auto": None, "disable": None, "vllm": "vllm", "lmi-dist": "vllm", "scheduler": "transformers"}
# Other names for canonical settings (LMI, vLLM), with a conversion where the units differ.
ALIASES: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "model_id": ("model", None),
    "max_rolling_batch_size": ("max_num_seqs", None),
    "tensor_parallel_size": ("tensor_parallel_degree", None),
    "rolling_batch": ("engine", lambda v: ROLLING_BATCH.get(str(v).lower(), v)),
    "kv_cache_memory_bytes": ("kv_cache_gib", lambda v: float(v) / GIB),
    # engine-native settings with an LMI name: they pass through under vLLM's name
    "quantize": ("quantization", None),
    "max_rolling_batch_prefill_tokens": ("max_num_batched_tokens", None),
    "cpu_offload_gb_per_gpu": ("cpu_offload_gb", None),
    "pipeline_parallel_degree": ("pipeline_parallel_size", None),
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
    "management_address": "kiln has no management API",
    "prometheus": "/metrics is always served",
}


def canonical(key: str) -> str:
    """``option.Max_Rolling_Batch_Size`` → ``max_rolling_batch_size`` (aliases are resolved later)."""
    key = key.strip()
    if key.lower().startswith("option."):
        key = key[len("option.") :]
    return key.lower()


# -- sources ----------------------------------------------------------------------------------------------------


def read_properties(path: Path) -> list[Entry]:
    """``serving.properties``: Java-properties lines ``key=value`` (``#``/``!`` comments, ``:`` also separates)."""
    entries = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        sep = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if sep < 0:
            entries.append(Entry("", None, Origin(PROPERTIES, f"line {n}: {line!r} (expected key=value)")))
            continue
        key, value = line[:sep].strip(), line[sep + 1 :].strip()
        entries.append(Entry(canonical(key), value, Origin(PROPERTIES, key)))
    return entries


def read_env(env: Mapping[str, str]) -> tuple[list[Entry], list[Entry]]:
    """OPTION_<KEY> and SERVING_<KEY> (lower-cased), plus the alias table; returns (entries, host hints)."""
    entries, hints = [], []
    for name, value in sorted(env.items()):
        if name.startswith(("OPTION_", "SERVING_")):
            key = canonical(name.split("_", 1)[1])
            if key:
                entries.append(Entry(key, value, Origin("env", name)))
        elif name in ENV_ALIASES:
            key, rank = ENV_ALIASES[name]
            if name == "ENABLE_CUDA_GRAPHS":
                value = _invert_bool(value)
            entries.append(Entry(key, value, Origin("env", name), rank=rank))
        elif name in HOST_HINTS and value.strip() not in ("", "0"):
            hints.append(Entry(HOST_HINTS[name], value, Origin("env", name), rank=0))
    return entries, hints


def _invert_bool(value: str) -> Any:
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return "false"
    if low in ("false", "0", "no", "off"):
        return "true"
    return value  # left for validation to name


def artifact_entries(manifest: Manifest | None) -> list[Entry]:
    if manifest is None:
        return []
    return [Entry(canonical(k), v, Origin("artifact", f"serving.{k}")) for k, v in manifest.serving.items()]


def cli_entries(values: Mapping[str, Any], options: list[str]) -> list[Entry]:
    """Explicit flags (already canonical names) plus ``--option KEY=VALUE`` pairs."""
    entries = [
        Entry(k, v, Origin("cli", "--" + k.replace("_", "-")))
        for k, v in values.items()
        if v is not None and k != "model"
    ]
    if values.get("model"):
        entries.append(Entry("model", values["model"], Origin("cli", "MODEL argument")))
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            entries.append(Entry("", None, Origin("cli", f"--option {item!r} (expected KEY=VALUE)")))
        else:
            entries.append(Entry(canonical(key), value, Origin("cli", f"--option {key.strip()}")))
    return entries


# -- resolution -------------------------------------------------------------------------------------------------


@dataclass
class Sources:
    """Everything the configuration is made from, in precedence order."""

    artifact: list[Entry] = field(default_factory=list)
    properties: list[Entry] = field(default_factory=list)
    env: list[Entry] = field(default_factory=list)
    cli: list[Entry] = field(default_factory=list)
    hints: list[Entry] = field(default_factory=list)  # host facts (SM_NUM_GPUS), below every source
    located: list[Entry] = field(default_factory=list)  # where the model was found (SM_MODEL_DIR …), lowest

    def layers(self) -> list[list[Entry]]:
        return [self.artifact, self.properties, self.env, self.cli]


def resolve_config(
    sources: Sources,
    manifest: Manifest | None,
    native_keys: Callable[[str], set[str]] | None = None,
    sagemaker: bool = False,
) -> Resolved:
    """Merge the sources by precedence, validate, and check the result against the artifact's target block.

    ``native_keys(engine)`` lists the engine's own keys; it is called only when some key needs passing through
    (it imports the engine library). Raises :class:`ConfigError` listing every problem.
    """
    problems: list[str] = []
    ignored: list[tuple[Origin, str]] = []
    merged: dict[str, Entry] = {e.key: e for e in sources.located}
    if manifest is None:
        for hint in sources.hints:
            merged[hint.key] = hint
    for layer in sources.layers():
        merged.update(_merge_layer(layer, problems, ignored))
    if sagemaker and "host" not in merged:
        merged["host"] = Entry("host", "0.0.0.0", Origin("default", "SageMaker"))

    known = {k: e for k, e in merged.items() if k in FIELDS}
    extra = {k: e for k, e in merged.items() if k not in FIELDS}
    engine = _engine_name(known, manifest)
    _check_native(extra, engine, native_keys, problems)
    values = {k: e.value for k, e in known.items()}
    values["engine_args"] = {k: _parse_scalar(e.value) for k, e in extra.items()}
    config = _validate(values, known, problems)
    if manifest is not None:
        # Check the target block even when some values are invalid (all problems in one message): the valid ones.
        checked = config or _validate_valid(values)
        _check_target(checked, known, manifest, problems)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    origins = {k: e.origin for k, e in known.items()} | {f"engine_args.{k}": e.origin for k, e in extra.items()}
    return Resolved(config, origins, tuple(ignored))


def _merge_layer(layer: list[Entry], problems: list[str], ignored: list[tuple[Origin, str]]) -> dict[str, Entry]:
    """Resolve aliases within one source; two names for one setting must agree unless one is a translation."""
    out: dict[str, Entry] = {}
    for raw in layer:
        if not raw.key:
            problems.append(f"{raw.origin}: not a setting")
            continue
        entry = _normalize(raw, problems, ignored)
        if entry is None:
            continue
        prev = out.get(entry.key)
        if prev is None or entry.rank > prev.rank:
            out[entry.key] = entry
        elif entry.rank == prev.rank and str(prev.value) != str(entry.value):
            problems.append(
                f"{prev.origin}={prev.value!r} and {entry.origin.name}={entry.value!r} set the same setting "
                f"({entry.key}) to different values; keep one"
            )
    return out


def _normalize(entry: Entry, problems: list[str], ignored: list[tuple[Origin, str]]) -> Entry | None:
    key, value = entry.key, entry.value
    if key in IGNORED:
        ignored.append((entry.origin, IGNORED[key]))
        return None
    if key == "engine" and str(value).lower() in ("python", "mpi"):
        ignored.append((entry.origin, "LMI's worker type; kiln runs the engine named by the artifact"))
        return None
    if key == "entrypoint":
        if str(value).startswith("djl_python"):
            ignored.append((entry.origin, "LMI's built-in handler; kiln's routes replace it"))
        else:
            problems.append(f"{entry.origin}={value!r}: custom handler modules are not supported")
        return None
    if key in ("batch_size", "task"):
        _lmi_mode(entry, problems, ignored)
        return None
    if key in ("tensor_parallel_degree", "tensor_parallel_size") and str(value).strip().lower() == "max":
        ignored.append((entry.origin, "the degree comes from the artifact's target block (a plain directory: 1)"))
        return None
    if key in ALIASES:
        key, convert = ALIASES[key]
        if convert is not None:
            try:
                value = convert(value)
            except (TypeError, ValueError):
                problems.append(f"{entry.origin}={value!r}: not a valid value")
                return None
        if key == "engine" and value is None:
            ignored.append((entry.origin, "the engine comes from the artifact's target block"))
            return None
    if key == "dtype" and isinstance(value, str):
        value = DTYPE_NAMES.get(value.lower(), value.lower())
    return Entry(key, value, entry.origin, entry.rank)


def _lmi_mode(entry: Entry, problems: list[str], ignored: list[tuple[Origin, str]]) -> None:
    """LMI's dynamic batching (batch_size > 1) and non-generation tasks have no kiln equivalent yet."""
    value = str(entry.value).strip().lower()
    if entry.key == "batch_size" and value == "1":
        ignored.append((entry.origin, "requests are batched by the engine"))
    elif entry.key == "task" and value in ("text-generation", "generate"):
        ignored.append((entry.origin, "text generation is what kiln serves"))
    else:
        what = "dynamic batching" if entry.key == "batch_size" else "this task"
        problems.append(f"{entry.origin}={entry.value!r}: {what} is not supported; kiln serves text generation")


def _engine_name(known: dict[str, Entry], manifest: Manifest | None) -> str:
    if "engine" in known:
        return str(known["engine"].value)
    return manifest.target.engine if manifest is not None else "vllm"


def _check_native(
    extra: dict[str, Entry], engine: str, native_keys: Callable[[str], set[str]] | None, problems: list[str]
) -> None:
    if not extra:
        return
    accepted: set[str] = set()
    if native_keys is not None:
        try:
            accepted = native_keys(engine)
        except (ImportError, KeyError) as exc:
            problems.append(f"cannot list the {engine} engine's own keys to check {sorted(extra)}: {exc}")
            return
    for key, entry in sorted(extra.items()):
        if key not in accepted:
            problems.append(f"{entry.origin}: not a kiln setting and not a {engine} engine argument")


def _validate(values: dict[str, Any], known: dict[str, Entry], problems: list[str]) -> ServeConfig | None:
    try:
        return ServeConfig.model_validate(values)
    except ValidationError as exc:
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            where = known[key].origin if key in known else Origin("default", "")
            problems.append(f"{where}={values.get(key)!r}: {err['msg']}")
        return None


def _validate_valid(values: dict[str, Any]) -> ServeConfig:
    """The configuration without the values that failed validation (their defaults instead)."""
    try:
        return ServeConfig.model_validate(values)
    except ValidationError as exc:
        bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        return ServeConfig.model_validate({k: v for k, v in values.items() if k not in bad})


def _check_target(config: ServeConfig, known: dict[str, Entry], manifest: Manifest, problems: list[str]) -> None:
    """The artifact was built for its target block; operator values that contradict it are refused."""
    t = manifest.target

    def where(key: str) -> Origin:
        return known[key].origin

    if config.engine is not None and config.engine != t.engine:
        problems.append(f"{where('engine')}={config.engine!r}: the artifact was built for target.engine={t.engine!r}")
    if config.max_model_len is not None and config.max_model_len > t.max_model_len:
        problems.append(
            f"{where('max_model_len')}={config.max_model_len}: exceeds the artifact's "
            f"target.max_model_len={t.max_model_len}"
        )
    tp = config.tensor_parallel_degree
    if tp is not None and tp != t.tensor_parallel_degree:
        problems.append(
            f"{where('tensor_parallel_degree')}={tp}: the artifact was built for "
            f"target.tensor_parallel_degree={t.tensor_parallel_degree}"
        )
    if config.dtype not in ("auto", t.dtype) and t.quantization != "none":
        problems.append(
            f"{where('dtype')}={config.dtype!r}: the artifact is quantized ({t.quantization}) at "
            f"target.dtype={t.dtype!r}"
        )


def _parse_scalar(value: Any) -> Any:
    """Engine pass-through values from text sources: JSON where it parses (numbers, true/false, objects)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# -- model location ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    target: str  # what to resolve: URI or directory
    origin: Origin
    sagemaker: bool  # no model named anywhere: SageMaker's model directory


def locate(cli_model: str | None, env: Mapping[str, str]) -> Location:
    """Where the model is, before serving.properties is read: the argument, then the environment, then SageMaker's
    model directory ($SM_MODEL_DIR or /opt/ml/model)."""
    if cli_model:
        return Location(cli_model, Origin("cli", "MODEL argument"), False)
    for name in ("OPTION_MODEL_ID", "HF_MODEL_ID"):
        if env.get(name):
            return Location(env[name], Origin("env", name), False)
    sm = env.get("SM_MODEL_DIR") or SAGEMAKER_MODEL_DIR
    return Location(sm, Origin("env" if env.get("SM_MODEL_DIR") else "default", "SM_MODEL_DIR"), True)


def properties_in(path: Path) -> list[Entry]:
    f = path / PROPERTIES
    return read_properties(f) if f.is_file() else []


def redirect(location: Location, props: list[Entry]) -> Location:
    """LMI: a model directory holding no model but a serving.properties that names one with option.model_id (an
    artifact URI or another directory) points there. A directory with weights is the model itself."""
    d = Path(location.target).expanduser()
    if (d / "manifest.json").is_file() or (d / "config.json").is_file():
        return location
    for e in props:
        if e.key == "model_id" and e.value:
            return Location(str(e.value), e.origin, location.sagemaker)
    return location


# -- rendering --------------------------------------------------------------------------------------------------


def render(resolved: Resolved) -> str:
    """The resolved configuration, one setting per line with its source (``python -m runtime config``)."""
    cfg = resolved.config.model_dump()
    args = cfg.pop("engine_args")
    width = max(len(k) for k in [*cfg, *(f"engine_args.{k}" for k in args)])
    lines = [f"{k:<{width}}  {_show(v):<24}  {resolved.origin(k)}" for k, v in cfg.items()]
    lines += [
        f"{'engine_args.' + k:<{width}}  {_show(v):<24}  {resolved.origin('engine_args.' + k)}" for k, v in args.items()
    ]
    lines += [f"ignored: {o} ({why})" for o, why in resolved.ignored]
    return "\n".join(lines)


def as_json(resolved: Resolved) -> dict[str, Any]:
    cfg = resolved.config.model_dump()
    args = cfg.pop("engine_args")
    out: dict[str, Any] = {k: {"value": v, "source": str(resolved.origin(k))} for k, v in cfg.items()}
    out.update(
        {f"engine_args.{k}": {"value": v, "source": str(resolved.origin(f"engine_args.{k}"))} for k, v in args.items()}
    )
    out["ignored"] = [{"key": str(o), "why": why} for o, why in resolved.ignored]
    return out


def _show(value: Any) -> str:
    return "-" if value is None else json.dumps(value) if not isinstance(value, str) else value

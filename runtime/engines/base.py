"""The engine interface every serving backend implements, the types that cross it, and the hooks an engine
package exposes to the rest of kiln (:class:`EngineSpec`).

The HTTP layer speaks only the :class:`Engine` interface: it tokenizes and renders prompts itself, hands the engine
token ids and a :class:`SamplingSpec`, and receives :class:`EngineOutput` deltas (new text and tokens per sequence)
as the engine produces them. Continuous batching is the engine's business. Everything else engine-specific (its
settings mapping and defaults, accepted native keys, kernel needs, precompiled-cache checks, warm-up) is reached
through the hooks of its :class:`EngineSpec`, so ``runtime/app.py``, the HTTP layer and the compile stage never
name an engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from artifacts.manifest import Manifest

# The KV-cache budget an engine gets on a CPU host when the operator sets none (CPU engines cannot size it from
# free device memory as on a GPU: that would be most of the RAM).
DEFAULT_CPU_KV_CACHE_GIB = 1.0
GIB = 1 << 30
# The constraints SamplingSpec.structured may hold (vLLM's StructuredOutputsParams; one at most per request).
STRUCTURED_CONSTRAINTS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


class EngineError(Exception):
    """A request failed inside the engine (the engine itself may still be healthy)."""


class EngineDeadError(EngineError):
    """The engine is gone; the process should report unhealthy and exit so it can be restarted."""


class EngineRequestError(EngineError):
    """The engine refused a request as invalid (maps to HTTP 400); ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter as an engine sees it: ``id`` is unique for the server's lifetime (a name registered again
    gets a new one), ``path`` a verified local PEFT directory (runtime/adapters.py checked it)."""

    name: str
    id: int
    path: Path
    rank: int


@dataclass(frozen=True)
class LoraSettings:
    """How many adapters an engine keeps and how large they may be (LMI's and vLLM's option names)."""

    max_loras: int  # adapters in one batch
    max_lora_rank: int
    max_cpu_loras: int | None = None  # adapters cached in host memory (None: the engine's default)


@dataclass(frozen=True)
class SamplingSpec:
    """Engine-neutral sampling parameters (already validated by the HTTP layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token plus the top k
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured output, in vLLM's StructuredOutputsParams terms: one of STRUCTURED_CONSTRAINTS ("json" schema,
    # "json_object", "regex", …) plus options such as "disable_any_whitespace". None: unconstrained.
    structured: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # engine-specific pass-through
    adapter: AdapterRef | None = None  # the LoRA adapter the request runs with (None: the base model)


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding as the engine runs it (runtime/speculative.py derived and checked it): ``method`` one of
    artifacts/targets.py: SPECULATIVE_METHODS, the engine's own names for the rest."""

    method: str
    num_speculative_tokens: int
    draft: Path | None = None  # draft_model: a verified local checkpoint sharing the target's tokenizer
    options: Mapping[str, Any] = field(default_factory=dict)  # the method's other keys (prompt_lookup_max …)

    def config(self) -> dict[str, Any]:
        """As a ``speculative_config`` object (vLLM's form, and the one an artifact records), the draft by path."""
        conf = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens, **self.options}
        return conf | ({"model": str(self.draft)} if self.draft is not None else {})


@dataclass(frozen=True)
class EmbedSpec:
    """One embedding request's options (validated by the HTTP layer)."""

    normalize: bool = True  # L2-normalize the pooled vector (vLLM: use_activation; LMI: option.normalize)
    dimensions: int | None = None  # Matryoshka truncation, where the model supports it (None: the full vector)


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None = None
    # (id, text, logprob) of the most likely alternatives, likeliest first: the j-th has rank j + 1.
    top: tuple[tuple[int, str, float], ...] = ()
    rank: int | None = None  # this token's rank among all (1: the likeliest), where the engine reports it


@dataclass(frozen=True)
class SeqDelta:
    """What one sequence (``index`` < n) produced since the previous output."""

    index: int
    text: str
    tokens: tuple[TokenInfo, ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class EngineOutput:
    deltas: tuple[SeqDelta, ...]
    prompt_tokens: int
    finished: bool
    prompt_logprobs: tuple[TokenInfo | None, ...] | None = None
    cached_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float | None = None  # 0..1, where the engine reports it
    # Speculative decoding since the engine started (None: the engine does not speculate): draft proposals, the
    # tokens they held, and the tokens the target model accepted.
    spec_drafts: int | None = None
    spec_draft_tokens: int | None = None
    spec_accepted_tokens: int | None = None


@dataclass(frozen=True)
class EngineSettings:
    """Engine settings derived from the artifact, the operator's configuration and the host (runtime/settings.py:
    derive, the one place that makes them). None leaves a value to the engine's ``defaults`` hook."""

    model_dir: Path
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_degree: int = 1
    enforce_eager: bool = False
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    kv_cache_gib: float | None = None  # KV cache budget (CPU hosts need one)
    device: str = "cpu"
    extra: Mapping[str, Any] = field(default_factory=dict)  # engine-native keys passed through
    compile_cache: Path | None = None  # writable copy of the artifact's precompiled cache (runtime/compile_cache.py)
    lora: LoraSettings | None = None  # None: LoRA adapters disabled (enable_lora=false)
    task: str = "generate"  # artifacts/targets.py: TASKS; "embed" engines answer embed(), not generate()
    speculative: Speculation | None = None  # None: no speculative decoding


class Engine(Protocol):
    """A text-generation engine with continuous batching and streaming."""

    name: str
    max_model_len: int

    async def start(self) -> None:
        """Load the model; may take minutes. Called once, before any request."""
        ...

    def validate(self, spec: SamplingSpec) -> None:
        """Raise EngineRequestError if the engine would refuse ``spec`` (checked before a response starts)."""
        ...

    def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> AsyncIterator[EngineOutput]:
        """Stream outputs for one request. Cancelling the iterator aborts the request in the engine."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def embed(self, request_id: str, prompt_ids: list[int], spec: EmbedSpec) -> list[float]:
        """The pooled vector of one input (only called when ``settings.task`` is "embed"); batched with concurrent
        calls by the engine. Raises EngineRequestError naming the field the engine refuses (e.g. dimensions)."""
        ...

    async def add_adapter(self, adapter: AdapterRef, pin: bool = False) -> None:
        """Load a LoRA adapter for requests naming it (only called when ``settings.lora`` is set and the spec says
        ``serves_adapters``); raise EngineRequestError when the engine refuses it."""
        ...

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        """Drop a loaded adapter; called once no request uses it any more."""
        ...

    async def check_health(self) -> None:
        """Raise EngineDeadError when the engine can no longer serve."""
        ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...


# -- the hooks an engine package exposes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelNeed:
    """CPU flags an engine's kernel for one quantization scheme needs, on hosts where ``applies_to`` holds."""

    flags: frozenset[str]
    applies_to: frozenset[str]  # flags marking the CPU family the need concerns (e.g. x86: sse2)
    why: str

    def unmet(self, cpu_flags: frozenset[str]) -> bool:
        return self.applies_to <= cpu_flags and not self.flags <= cpu_flags


@dataclass(frozen=True)
class EngineDefault:
    """A value an engine chose for a setting the configuration left open, and why (shown by ``runtime config``)."""

    value: Any
    why: str


class CompileSupport(Protocol):
    """Precompiled content (``target.compile``): checked and prepared at serve time, filled by the build's warm-up."""

    def prepare(self, model_dir: Path, manifest: Manifest, settings: EngineSettings, ignore: bool) -> EngineSettings:
        """Check the artifact's compile key against this host; return the settings that start from its cache.
        Raises runtime.host.TargetMismatchError naming ``compile.<field>`` (unless ``ignore``)."""
        ...

    def warm_up(self, settings: EngineSettings, cache_dir: Path) -> Coroutine[Any, Any, dict[str, Any]]:
        """Start the engine with ``cache_dir`` as its compile cache, exercise it, stop it; return a report holding
        ``key`` (this host's compile key, recorded as target.compile)."""
        ...


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its registry entry. Heavy libraries are imported inside the hooks, never when this is built."""

    name: str
    distributions: tuple[str, ...]  # any one of these provides the engine (host check, error messages)
    install_hint: str
    create: Callable[[EngineSettings], Engine]
    native_keys: Callable[[], set[str]]  # engine-native keys an operator may pass through (imports the library)
    native_args: Callable[[EngineSettings], dict[str, Any]]  # the engine's own arguments for these settings
    defaults: Callable[[EngineSettings], dict[str, EngineDefault]]  # values for settings left None
    lmi_names: tuple[str, ...] = ()  # LMI's option.rolling_batch values that mean this engine
    # (device kind, quantization scheme) -> KernelNeed; schemes are the suffix of target.quantization
    # ("gptq-w4a16" -> "w4a16").
    kernel_needs: Mapping[tuple[str, str], KernelNeed] = field(default_factory=dict)
    compile: CompileSupport | None = None  # None: the engine has no precompiled content
    # Import the engine's heavy libraries ahead of ``create(...).start()``; serve runs it while the weights of a
    # plain S3 checkpoint still download, so the two overlap.
    preload: Callable[[], None] = lambda: None
    serves_adapters: bool = False  # the engine implements add_adapter / remove_adapter (LoRA)
    tasks: tuple[str, ...] = ("generate",)  # the target tasks it serves (one per engine instance: settings.task)
    speculative_methods: tuple[str, ...] = ()  # artifacts/targets.py: SPECULATIVE_METHODS it runs
    # The keys a speculative configuration may hold for this engine (imports the library); None: only kiln's own
    # (method, num_speculative_tokens, model).
    speculative_keys: Callable[[], set[str]] | None = None
    # What the engine refuses in these settings (a pass-through key it cannot serve, a TP degree its sharding cannot
    # split the model by), each a line naming the key and the fix: checked before the server starts.
    check: Callable[[EngineSettings], list[str]] = lambda s: []

    def cannot_run(self, quantization: str, device: str, cpu_flags: frozenset[str]) -> str | None:
        """Why this engine's kernels cannot run ``quantization`` on ``device`` here (None: they can)."""
        for (kind, scheme), need in self.kernel_needs.items():
            if kind == device and quantization.endswith(scheme) and need.unmet(cpu_flags):
                return need.why
        return None

    def installed_version(self) -> str | None:
        for dist in self.distributions:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int | None:
    """KV-cache bytes one token takes for the checkpoint in ``model_dir`` (keys and values of every layer), from its
    ``config.json``; None when the config does not say (an engine then cannot bound its batch by the budget)."""
    import json

    try:
        return kv_bytes_per_token_of(json.loads((model_dir / "config.json").read_text()), dtype)
    except (OSError, ValueError):
        return None


def kv_bytes_per_token_of(config: dict[str, Any], dtype: str) -> int | None:
    """:func:`kv_bytes_per_token` for a parsed ``config.json`` (``runtime deploy`` sizes an artifact still in S3)."""
    try:
        cfg = config.get("text_config", config)
        heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
        layers = int(cfg["num_hidden_layers"])
        if dtype == "auto":
            dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    except (AttributeError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 2)
    return 2 * layers * heads * head_dim * width


def model_config_int(model_dir: Path, key: str) -> int | None:
    """An integer of the checkpoint's ``config.json`` (its text model's, for multimodal configs); None if absent."""
    import json

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        return int(cfg.get("text_config", cfg)[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def max_position_embeddings(model_dir: Path) -> int | None:
    return model_config_int(model_dir, "max_position_embeddings")

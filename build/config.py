"""Typed build configuration: dataclass schemas registered in Hydra's ConfigStore, validated once at the edge.

The YAML files in ``conf/`` hold the values; these classes are the schema. :func:`validate` turns a composed
``DictConfig`` into a frozen :class:`BuildConfig` and reports every problem at once, each named by the
override key the user types (``model.dtype``, ``convert.max_shard_size`` …).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from artifacts.targets import DTYPES, engine_problem, task_problem
from build.errors import ConfigError

SYNTH_SCHEME = "kiln:"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass
class SynthConfig:
    """Dimensions and training of a synthesized tiny Llama (``model=tiny`` / ``model=tiny_trained``)."""

    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    corpus_sentences: int = 6000
    train_steps: int = 0
    train_batch_size: int = 16
    train_seq_len: int = 128
    learning_rate: float = 3e-3
    train_threads: int = 2


@dataclass
class ModelConfig:
    """Where the checkpoint comes from and what to call the artifact."""

    name: str = MISSING
    source: str = MISSING  # local HF dir | s3://bucket/prefix/ | hub id | kiln:tiny (synthesized)
    revision: str | None = None
    dtype: str = "bfloat16"
    allow_pickle: bool = False
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ConvertConfig:
    max_shard_size: str = "2GB"
    check_finite: bool = True


@dataclass
class PublishConfig:
    store: str = "local"
    uri: str | None = None  # None: $KILN_STORE or the per-user local store
    tags: list[str] = field(default_factory=lambda: ["latest"])
    # An Ed25519 private key (PEM; `python -m artifacts keygen PATH`): the published manifest is signed with it, so a
    # runtime with trusted_keys serves it. None: unsigned.
    signing_key: str | None = None

    def key_path(self) -> Path | None:
        return Path(self.signing_key).expanduser() if self.signing_key else None


@dataclass
class TargetConfig:
    """Engine the artifact is for and the limits recorded in its target block."""

    engine: str = "vllm"
    task: str = "generate"  # generate | embed (artifacts/targets.py: TASKS)
    tensor_parallel_degree: int = 1
    # None: the model's max_position_embeddings (an embedding model's sentence-transformers max_seq_length)
    max_model_len: int | None = None


@dataclass
class ServingConfig:
    """Serving settings written into the manifest's serving block (lowest precedence at serve time). None: not
    recorded, so the runtime's own default applies (for max_num_seqs, the engine's)."""

    max_num_seqs: int | None = None
    enforce_eager: bool | None = None


@dataclass
class AdapterSynthConfig:
    """A synthesized tiny LoRA adapter (``adapter.source=kiln:tiny-lora``): seeded, non-zero, shaped by the base."""

    seed: int = 0
    rank: int = 8
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class AdapterConfig:
    """A PEFT LoRA adapter to package for the model this build makes, published as an adapter artifact that names
    the base artifact's digest. ``source`` None: the build makes the model only."""

    source: str | None = None  # local PEFT adapter directory | kiln:tiny-lora (synthesized)
    name: str | None = None  # None: the directory's name (synthesized: <model.name>-lora<seed>)
    allow_pickle: bool = False  # accept adapter_model.bin (kiln still publishes safetensors only)
    synth: AdapterSynthConfig = field(default_factory=AdapterSynthConfig)


@dataclass
class DraftConfig:
    """The draft model packaged inside the artifact (``speculative=draft_model``), as its ``draft/`` folder: it is
    converted like the model (same dtype) and must use the model's tokenizer."""

    source: str | None = None  # local HF dir | s3://bucket/prefix/ | hub id | kiln:tiny (synthesized from synth)
    revision: str | None = None
    allow_pickle: bool = False
    # A synthesized draft: the tiny model's dimensions with one layer (conf/speculative/draft_model.yaml makes its
    # tokenizer and training follow model.synth, so a synthesized draft fits a synthesized model).
    synth: SynthConfig = field(default_factory=lambda: SynthConfig(num_hidden_layers=1))


@dataclass
class SpeculativeConfig:
    """Speculative decoding recorded in the artifact's serving block (the runtime starts the engine with it).
    ``method`` None: none recorded (an operator may still set option.speculative_config at serve time)."""

    method: str | None = None  # artifacts/targets.py: BUILD_SPECULATIVE_METHODS (ngram | draft_model)
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2  # ngram: the shortest prompt n-gram matched
    prompt_lookup_max: int = 4  # ngram: the longest
    draft: DraftConfig = field(default_factory=DraftConfig)


@dataclass
class BuildConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    # Typed per option (the registry names each option's schema), so the field itself is Any.
    quantize: Any = MISSING
    compile: Any = MISSING
    publish: PublishConfig = field(default_factory=PublishConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    force: bool = False
    debug: bool = False
    # Write the build summary (URI, digest, sizes, fidelity, stage timings; build/summary.py) as JSON to this path
    # after a successful publish. None: none written. `nox -s artifact` sets it and verifies before keeping it.
    summary: str | None = None


def register_configs() -> None:
    """Register the schemas as ``base_<group>`` so each YAML option can declare ``defaults: [base_…]``."""
    from hydra.core.config_store import ConfigStore

    from compile.registry import COMPILERS
    from quantize.registry import QUANTIZERS

    cs = ConfigStore.instance()
    cs.store(name="base_build", node=BuildConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    for name, qspec in QUANTIZERS.items():
        cs.store(group="quantize", name=f"base_{name}", node=qspec.config_cls)
    for name, cspec in COMPILERS.items():
        cs.store(group="compile", name=f"base_{name}", node=cspec.config_cls)
    cs.store(group="publish", name="base_publish", node=PublishConfig)
    cs.store(group="speculative", name="base_speculative", node=SpeculativeConfig)


def parse_size(text: str) -> int:
    """``"2GB"`` → 2_000_000_000, ``"512MiB"`` → 536_870_912. Raises ValueError."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r} (e.g. 2GB, 500MB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def validate(cfg: DictConfig | BuildConfig) -> BuildConfig:
    """Build the typed config and check cross-field rules; raise ConfigError listing every problem."""
    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(
                [(k, "is required (set it on the command line, e.g. model.source=/path)") for k in missing]
            )
        typed = OmegaConf.to_object(cfg)
        assert isinstance(typed, BuildConfig)
    else:
        typed = cfg
    problems = list(_problems(typed))
    if problems:
        raise ConfigError(problems)
    return typed


def _problems(cfg: BuildConfig) -> list[tuple[str, str]]:
    from artifacts.names import name_problem, tag_problem
    from compile.registry import COMPILERS
    from quantize.registry import QUANTIZERS

    out: list[tuple[str, str]] = []
    if (why := name_problem(cfg.model.name)) is not None:
        out.append(("model.name", why))
    out.extend(("publish.tags", why) for tag in cfg.publish.tags if (why := tag_problem(tag)) is not None)
    if (bad_engine := engine_problem(cfg.target.engine)) is not None:
        out.append(("target.engine", bad_engine))
    out.extend(_task_problems(cfg))
    if cfg.model.dtype not in DTYPES:
        out.append(("model.dtype", f"{cfg.model.dtype!r} is not one of {list(DTYPES)}"))
    try:
        parse_size(cfg.convert.max_shard_size)
    except ValueError as exc:
        out.append(("convert.max_shard_size", str(exc)))
    if cfg.quantize.method not in QUANTIZERS:
        out.append(("quantize", f"unknown method {cfg.quantize.method!r}; known: {sorted(QUANTIZERS)}"))
    elif bad_engine is None:  # the (method, engine) route needs a known engine
        out.extend(_quantize_problems(cfg))
    if cfg.compile.backend not in COMPILERS:
        out.append(("compile", f"unknown backend {cfg.compile.backend!r}; known: {sorted(COMPILERS)}"))
    elif bad_engine is None:
        out.extend(cfg.compile.problems(cfg))
    if cfg.target.tensor_parallel_degree < 1:
        out.append(("target.tensor_parallel_degree", "must be >= 1"))
    if cfg.target.max_model_len is not None and cfg.target.max_model_len < 1:
        out.append(("target.max_model_len", "must be >= 1"))
    if cfg.serving.max_num_seqs is not None and cfg.serving.max_num_seqs < 1:
        out.append(("serving.max_num_seqs", "must be >= 1"))
    if cfg.summary is not None and not Path(cfg.summary).parent.is_dir():  # fail before the build, not after it
        out.append(("summary", f"{cfg.summary}: directory {Path(cfg.summary).parent} does not exist; create it"))
    out.extend(_signing_problems(cfg.publish))
    if cfg.publish.store != "local" and not cfg.publish.uri:  # only the local store has a default location
        out.append(
            ("publish.uri", f"is required with publish={cfg.publish.store} (e.g. publish.uri=s3://bucket/prefix)")
        )
    out.extend(_synth_problems(cfg.model))
    out.extend(_adapter_problems(cfg.adapter))
    out.extend(_speculative_problems(cfg))
    return out


def _signing_problems(publish: PublishConfig) -> list[tuple[str, str]]:
    """A signing key that cannot sign fails the build before any stage runs, not at publish time."""
    from artifacts.signing import SigningError, load_private

    key = publish.key_path()
    if key is None:
        return []
    try:
        load_private(key)
    except SigningError as exc:
        return [("publish.signing_key", str(exc))]
    return []


def _speculative_problems(cfg: BuildConfig) -> list[tuple[str, str]]:
    from artifacts.targets import BUILD_SPECULATIVE_METHODS, ENGINES

    sp = cfg.speculative
    if sp.method is None:
        if sp.draft.source is not None:
            return [("speculative.draft.source", "is set but speculative.method is not; use speculative=draft_model")]
        return []
    if sp.method not in BUILD_SPECULATIVE_METHODS:
        return [("speculative.method", f"{sp.method!r} is not one of {list(BUILD_SPECULATIVE_METHODS)}")]
    out = []
    if sp.num_speculative_tokens < 1:
        out.append(("speculative.num_speculative_tokens", "must be >= 1 (tokens proposed per step)"))
    if sp.method == "ngram" and not 1 <= sp.prompt_lookup_min <= sp.prompt_lookup_max:
        out.append(("speculative.prompt_lookup_min", "must be >= 1 and no more than speculative.prompt_lookup_max"))
    if sp.method == "draft_model" and not sp.draft.source:
        out.append(("speculative.draft.source", "is required with speculative=draft_model (the draft checkpoint)"))
    if sp.method == "ngram" and sp.draft.source:
        out.append(("speculative.draft.source", "n-gram speculation needs no draft model; use speculative=draft_model"))
    if cfg.target.task != "generate":
        out.append(("speculative", f"speculative decoding is for text generation, not target.task={cfg.target.task}"))
    engine = ENGINES.get(cfg.target.engine)
    if engine is not None and sp.method not in engine.speculative:
        out.append(("speculative", f"target.engine={cfg.target.engine} does not serve {sp.method} speculation"))
    if cfg.compile.backend != "none":
        out.append(
            (
                "compile",
                "the compile warm-up does not run speculative decoding yet, so its cache would not fit; build with "
                "compile=none (a compiled artifact served with option.speculative_config compiles at start)",
            )
        )
    return out


ADAPTER_SYNTH = "kiln:tiny-lora"


def _task_problems(cfg: BuildConfig) -> list[tuple[str, str]]:
    """An embedding artifact is converted and published as it is: the quantizers' fidelity gates and the compile
    warm-up measure and exercise text generation, and a LoRA adapter is for a generation model."""
    if (why := task_problem(cfg.target.task)) is not None:
        return [("target.task", why)]
    if cfg.target.task == "generate":
        return []
    out = []
    if cfg.quantize.method != "none":
        out.append(("quantize", f"target.task={cfg.target.task} artifacts are not quantized; use quantize=none"))
    if cfg.compile.backend != "none":
        out.append(("compile", f"target.task={cfg.target.task} artifacts are not precompiled; use compile=none"))
    if cfg.adapter.source is not None:
        out.append(("adapter.source", f"LoRA adapters are for target.task=generate, not {cfg.target.task}"))
    if cfg.model.source.startswith(SYNTH_SCHEME):
        out.append(
            ("model.source", f"{cfg.model.source} is a text-generation model; an embedding build needs an encoder")
        )
    return out


def _adapter_problems(a: AdapterConfig) -> list[tuple[str, str]]:
    from artifacts.names import name_problem

    out = []
    if a.name is not None and (why := name_problem(a.name)) is not None:
        out.append(("adapter.name", why))
    if a.source is not None and a.source.startswith(SYNTH_SCHEME):
        if a.source != ADAPTER_SYNTH:
            out.append(("adapter.source", f"{a.source!r}: the only synthesized adapter is {ADAPTER_SYNTH!r}"))
        if a.synth.rank < 1:
            out.append(("adapter.synth.rank", "must be >= 1"))
        if not a.synth.target_modules:
            out.append(("adapter.synth.target_modules", "must name at least one module (e.g. [q_proj,v_proj])"))
    return out


def _quantize_problems(cfg: BuildConfig) -> list[tuple[str, str]]:
    """Value ranges, the (method, engine) pair and the calibration source, before any stage runs."""
    from build import calibration
    from quantize.config import CalibratedConfig, problems
    from quantize.registry import UnsupportedError, plan

    out = problems(cfg.quantize)
    try:
        plan(cfg.quantize, cfg.target.engine)
    except UnsupportedError as exc:
        out.append((exc.key, str(exc)))
    if isinstance(cfg.quantize, CalibratedConfig):
        out.extend(calibration.problems(cfg.quantize.calibration))
    return out


def _synth_problems(model: ModelConfig) -> list[tuple[str, str]]:
    if not model.source.startswith(SYNTH_SCHEME):
        return []
    s = model.synth
    out = []
    if model.source != "kiln:tiny":
        out.append(("model.source", f"{model.source!r}: the only synthesized source is 'kiln:tiny'"))
    if s.hidden_size % s.num_attention_heads:
        out.append(
            (
                "model.synth.hidden_size",
                f"{s.hidden_size} is not divisible by num_attention_heads={s.num_attention_heads}",
            )
        )
    if s.num_attention_heads % s.num_key_value_heads:
        out.append(
            (
                "model.synth.num_key_value_heads",
                f"{s.num_key_value_heads} does not divide num_attention_heads={s.num_attention_heads}",
            )
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
        if getattr(s, key) < 1:
            out.append((f"model.synth.{key}", "must be >= 1"))
    if s.vocab_size < 512:
        out.append(("model.synth.vocab_size", "must be >= 512 (the byte-level alphabet and special tokens need room)"))
    if s.train_steps < 0:
        out.append(("model.synth.train_steps", "must be >= 0"))
    return out


def to_plain(obj: Any) -> Any:
    """A dataclass config as plain JSON-able data (for provenance and cache keys)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)

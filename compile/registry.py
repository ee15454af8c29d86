"""The compiler registry, keyed by the ``compile=`` config option name.

``none`` does no ahead-of-time work: the artifact is served as converted (or quantized). ``vllm`` starts vLLM in
the build and packages its torch.compile cache (compile/vllm.py), on the build host's CPU or NVIDIA GPU. ``neuron``
compiles the Neuron graphs with NxD Inference into the artifact (compile/neuron.py), for one instance family.
``tensorrt_llm`` writes TensorRT-LLM's LLM-API options and, on an NVIDIA GPU build host, its autotuner cache
(compile/tensorrt_llm.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from compile.config import CompileConfig
from compile.neuron import NeuronCompileConfig
from compile.tensorrt_llm import TensorrtLlmCompileConfig
from compile.vllm import VllmCompileConfig


@dataclass(frozen=True)
class CompilerSpec:
    config_cls: type[CompileConfig]
    toolchain: str | None  # None: no stage work
    entry: str | None  # "module:function" run inside the toolchain
    engine: str | None = None  # the target engine whose artifacts it compiles (None: any)
    code: tuple[str, ...] = ()  # modules outside compile/ the stage runs (their code joins its cache key)
    # The toolchain per device kind the stage compiles for (CompileConfig.build_device), where it is not
    # ``toolchain``: compiling for a GPU needs the engine built against CUDA.
    device_toolchains: Mapping[str, str] = field(default_factory=dict)

    def toolchain_for(self, device: str | None) -> str | None:
        return self.device_toolchains.get(device or "", self.toolchain)


COMPILERS: dict[str, CompilerSpec] = {
    "none": CompilerSpec(config_cls=CompileConfig, toolchain=None, entry=None),
    "vllm": CompilerSpec(
        config_cls=VllmCompileConfig,
        toolchain="vllm-cpu",
        device_toolchains={"cuda": "vllm-cuda"},
        entry="compile.vllm:run",
        engine="vllm",
        # The warm-up derives the settings as serve does and runs the engine's hook: a change in any of these can
        # change the compiled graph or the settings it was compiled for.
        code=(
            "runtime.warmup",
            "runtime.settings",
            "runtime.config",
            "runtime.host",
            "runtime.engines.base",
            "runtime.engines.compiled",
            "runtime.engines.vllm",
        ),
    ),
    "neuron": CompilerSpec(
        config_cls=NeuronCompileConfig,
        toolchain="neuron",
        entry="compile.neuron:run",
        engine="neuron",
    ),
    "tensorrt_llm": CompilerSpec(
        config_cls=TensorrtLlmCompileConfig,
        toolchain="build",  # options only: no TensorRT-LLM needed
        device_toolchains={"cuda": "tensorrt-llm"},  # the autotuner warm-up
        entry="compile.tensorrt_llm:run",
        engine="tensorrt_llm",
        # the GPU warm-up derives the settings as serve does and runs the engine's warm-up hook
        code=(
            "runtime.warmup",
            "runtime.settings",
            "runtime.config",
            "runtime.host",
            "runtime.engines.base",
            "runtime.engines.compiled",
            "runtime.engines.tensorrt_llm",
        ),
    ),
}

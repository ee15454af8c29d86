"""``compile=tensorrt_llm``: the artifact TensorRT-LLM 1.x's PyTorch backend serves fastest.

TensorRT-LLM 1.x has no engine build any more (``trtllm-build`` and ``LLM(backend="tensorrt")`` are gone): its
``LLM`` loads a Hugging Face or ModelOpt checkpoint directly. What a build can still fix ahead of time is

* the LLM-API options (``llm_api_options.yaml``: ``TorchLlmArgs`` fields, the same file ``trtllm-serve --config``
  reads): parallelism, dtype, the limits (``max_seq_len`` from ``target.max_model_len``, ``max_batch_size`` from
  ``compile.max_batch_size`` or ``serving.max_num_seqs``, ``max_num_tokens``), the KV cache, the CUDA-graph batch
  sizes and the autotuner switch;
* on an NVIDIA GPU build host, the autotuner's cache (``compile_cache/trtllm_autotuner_cache.json``, what
  ``TLLM_AUTOTUNER_CACHE_PATH`` names): the build starts the runtime's own warm-up of the engine, whose start runs
  the autotuner over the shapes these options allow and saves the tactics it chose.

The stage's result ``target.compile`` is the compatibility key: the TensorRT-LLM version the options were written
for, TP and PP, dtype, quantization and the limits, and with an autotuner cache the CUDA fields (CUDA, GPU compute
capability, GPU name, driver). TensorRT-LLM records its version and GPU in the cache file but never checks them on
load; the runtime (runtime/engines/tensorrt_llm) compares the key with the host before it loads anything.

On a CPU build host the stage runs in the ``build`` toolchain and needs no TensorRT-LLM (options and key only); on
a GPU build host (``compile.device=auto|cuda``) it runs in the ``tensorrt-llm`` toolchain.

Written for tensorrt_llm 1.2.1 (PyPI's newest final release, read 2026-12-07). The option names were read from
NVIDIA/TensorRT-LLM ``tensorrt_llm/llmapi/llm_args.py`` (BaseLlmArgs / TorchLlmArgs / KvCacheConfig /
CudaGraphConfig of the 1.1-1.2 line, and main at 0004396, 2026, where they are unchanged); tests/test_tensorrt_llm.py
holds them as data. This module imports only ``artifacts/``: the warm-up is a separate process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts.manifest import AUTOTUNER_CACHE, COMPILE_CACHE_DIR, LLM_API_OPTIONS
from artifacts.ops import link_tree
from compile import warmup
from compile.config import CompileConfig

log = logging.getLogger("kiln.compile.tensorrt_llm")
# The TensorRT-LLM version the options are written for (build/toolchains/tensorrt-llm.txt pins it; a test holds
# the two together). A GPU build records the version its toolchain has instead.
TRTLLM_VERSION = "1.2.1"
COMPILE_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TensorrtLlmCompileConfig(CompileConfig):
    """``compile=tensorrt_llm``: LLM-API options for TensorRT-LLM 1.x, and on a GPU build host its autotuner cache."""

    backend: str = "tensorrt_llm"
    # Requests in one batch. None: serving.max_num_seqs where the build sets it, else the runtime's default (LMI's
    # max_rolling_batch_size for TensorRT-LLM, 256), applied at serve time.
    max_batch_size: int | None = None
    max_num_tokens: int = 8192  # tokens one forward pass takes (prefill and decode together); TensorRT-LLM's default
    free_gpu_memory_fraction: float = 0.9  # of the GPU memory free after loading, for the KV cache (its default)
    enable_block_reuse: bool = True  # KV-cache block reuse across requests (prefix caching; its default)
    # Batch sizes CUDA graphs are captured for. None: TensorRT-LLM generates them up to the batch.
    # serving.enforce_eager=true captures none.
    cuda_graph_batch_sizes: list[int] | None = None
    # Round a batch up to the next captured size: TensorRT-LLM's own description calls it "usually a net win for
    # performance" (its default is off).
    cuda_graph_padding: bool = True
    enable_autotuner: bool = True  # tune GEMM/MoE tactics at start; a GPU build packages the tuned cache
    pipeline_parallel_size: int = 1  # GPUs = target.tensor_parallel_degree x this
    # Where the stage runs: "auto" is the build host's NVIDIA GPU when it has one (options plus the autotuner cache,
    # in the tensorrt-llm toolchain), else its CPU (options only, no TensorRT-LLM needed). The artifact serves on
    # NVIDIA GPUs either way.
    device: str = "auto"
    timeout_s: int = 3600  # the GPU warm-up (model load, autotuner, CUDA graphs)

    def problems(self, build: Any) -> list[tuple[str, str]]:
        out = []
        if build.target.engine != "tensorrt_llm":
            out.append(
                (
                    "target.engine",
                    f"compile=tensorrt_llm builds for TensorRT-LLM, not {build.target.engine!r}: set "
                    "target.engine=tensorrt_llm",
                )
            )
        out += self._batch_problems(build.serving.max_num_seqs, bool(build.serving.enforce_eager))
        if self.max_num_tokens < 1:
            out.append(("compile.max_num_tokens", "must be >= 1"))
        if not 0 < self.free_gpu_memory_fraction <= 1:
            out.append(("compile.free_gpu_memory_fraction", "must be in (0, 1]"))
        if self.pipeline_parallel_size < 1:
            out.append(("compile.pipeline_parallel_size", "must be >= 1"))
        if self.device not in COMPILE_DEVICES:
            out.append(("compile.device", f"{self.device!r} is not one of {list(COMPILE_DEVICES)}"))
        if self.timeout_s <= 0:
            out.append(("compile.timeout_s", "must be > 0"))
        return out

    def _batch_problems(self, max_num_seqs: int | None, eager: bool) -> list[tuple[str, str]]:
        out = []
        if self.max_batch_size is not None and self.max_batch_size < 1:
            out.append(("compile.max_batch_size", "must be >= 1"))
        elif self.max_batch_size is not None and max_num_seqs is not None and self.max_batch_size != max_num_seqs:
            out.append(
                (
                    "compile.max_batch_size",
                    f"{self.max_batch_size} differs from serving.max_num_seqs={max_num_seqs}, which sets the batch "
                    "already: set one of them",
                )
            )
        sizes = self.cuda_graph_batch_sizes
        if sizes is None:
            return out
        batch = self.max_batch_size or max_num_seqs
        if eager:
            out.append(("compile.cuda_graph_batch_sizes", "serving.enforce_eager=true captures no CUDA graphs"))
        elif not sizes or min(sizes) < 1:
            out.append(("compile.cuda_graph_batch_sizes", "must be a non-empty list of sizes >= 1"))
        elif batch is not None and max(sizes) > batch:
            out.append(("compile.cuda_graph_batch_sizes", f"{max(sizes)} exceeds the batch ({batch} requests)"))
        return out

    def build_device(self, host_devices: tuple[str, ...]) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if "cuda" in host_devices else "cpu"


def llm_api_options(
    cfg: TensorrtLlmCompileConfig, target: Mapping[str, Any], serving: Mapping[str, Any]
) -> dict[str, Any]:
    """The LLM-API options (TorchLlmArgs field names) for this build's target and serving blocks."""
    opts: dict[str, Any] = {
        "tensor_parallel_size": int(target["tensor_parallel_degree"]),
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "dtype": str(target["dtype"]),
    }
    if target.get("max_model_len"):
        opts["max_seq_len"] = int(target["max_model_len"])
    batch = cfg.max_batch_size or serving.get("max_num_seqs")
    if batch is not None:
        opts["max_batch_size"] = int(batch)
    opts["max_num_tokens"] = cfg.max_num_tokens
    opts["kv_cache_config"] = {
        "free_gpu_memory_fraction": cfg.free_gpu_memory_fraction,
        "enable_block_reuse": cfg.enable_block_reuse,
    }
    if serving.get("enforce_eager"):
        opts["cuda_graph_config"] = None  # TorchLlmArgs: None turns CUDA graphs off
    else:
        graphs: dict[str, Any] = {"enable_padding": cfg.cuda_graph_padding}
        if cfg.cuda_graph_batch_sizes:
            graphs["batch_sizes"] = sorted(cfg.cuda_graph_batch_sizes)
        elif batch is not None:
            graphs["max_batch_size"] = int(batch)  # TensorRT-LLM generates the sizes up to it
        opts["cuda_graph_config"] = graphs
    opts["enable_autotuner"] = cfg.enable_autotuner
    return opts


def compile_key(opts: Mapping[str, Any], target: Mapping[str, Any], version: str) -> dict[str, str]:
    """The key of options-only content: what the runtime compares (version, device, dtype; TP x PP against its GPUs)
    and, for the record, the quantization and the limits the options fix."""
    key = {
        "device": "cuda",
        "tensorrt_llm": version,
        "tp": str(opts["tensor_parallel_size"]),
        "pp": str(opts["pipeline_parallel_size"]),
        "dtype": str(opts["dtype"]),
        "quantization": str(target.get("quantization", "none")),
        "max_num_tokens": str(opts["max_num_tokens"]),
    }
    for limit in ("max_seq_len", "max_batch_size"):
        if limit in opts:
            key[limit] = str(opts[limit])
    return key


def render(opts: Mapping[str, Any], version: str) -> str:
    import yaml  # PyYAML comes with transformers in every toolchain

    head = (
        f"# TensorRT-LLM LLM-API options (TorchLlmArgs) written by kiln's compile=tensorrt_llm for tensorrt_llm "
        f"{version}.\n# kiln's runtime passes them to tensorrt_llm.LLM; also usable as: "
        f"trtllm-serve <this directory> --config {LLM_API_OPTIONS}\n"
    )
    return head + yaml.safe_dump(dict(opts), sort_keys=False)


def run(params: Mapping[str, Any], inputs: Mapping[str, Path], out: Path) -> dict[str, Any]:
    """Stage entry: link the checkpoint into ``out``, write the LLM-API options, on a GPU warm the autotuner cache
    into ``out/compile_cache``; report the key."""
    cfg = TensorrtLlmCompileConfig(**params["config"])
    target, serving = params["target"], params["serving"]
    link_tree(inputs["model"], out)
    device = params.get("device") or cfg.build_device(("cpu",))
    opts = llm_api_options(cfg, target, serving)
    (out / LLM_API_OPTIONS).write_text(render(opts, TRTLLM_VERSION))
    key = compile_key(opts, target, TRTLLM_VERSION)
    result: dict[str, Any] = {"options": opts}
    if device == "cuda" and cfg.enable_autotuner:
        report = _warm_up(out, target, serving, cfg)
        tuned = (out / COMPILE_CACHE_DIR / AUTOTUNER_CACHE).is_file()
        # the installed version, and where a cache was saved the GPU fields it is valid for
        key |= report["key"] if tuned else {"tensorrt_llm": report["key"]["tensorrt_llm"]}
        result["warmup"] = {k: report[k] for k in ("engine_start_s", "total_s")}
    elif device == "cuda":
        log.info("compile: enable_autotuner=false: no autotuner cache to warm, options only")
    else:
        log.info("compile: CPU build host: LLM-API options only (an NVIDIA GPU build host adds the autotuner cache)")
    return result | {"target": {"compile": key}}


def _warm_up(
    out: Path, target: Mapping[str, Any], serving: Mapping[str, Any], cfg: TensorrtLlmCompileConfig
) -> dict[str, Any]:
    """The runtime's warm-up of TensorRT-LLM on this GPU: its start runs the autotuner, which saves its cache."""
    cache_dir = out / COMPILE_CACHE_DIR
    cache_dir.mkdir(exist_ok=True)
    report = warmup.run(
        out,
        target,
        serving,
        engine="TensorRT-LLM",
        cache_dir=cache_dir,
        device="cuda",
        timeout_s=cfg.timeout_s,
        log_path=out.parent / "warmup.log",
        fix="check that tensorrt_llm.LLM loads this checkpoint with these options (log above)",
    )
    if not (cache_dir / AUTOTUNER_CACHE).is_file():
        log.warning("compile: the warm-up saved no autotuner cache (no tunable op ran): the artifact has options only")
        if not any(cache_dir.iterdir()):
            cache_dir.rmdir()
    return report

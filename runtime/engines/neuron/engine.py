"""The neuron engine: vLLM with the vLLM Neuron plugin serves the graphs NxD Inference compiled in the build.

vLLM Neuron 0.2.0 (vllm-project/vllm-neuron @ a5ef7c8, read 2025-11-17 snapshot) is a vLLM platform plugin: on a
host with ``/dev/neuron*`` vLLM's ``AsyncLLM`` runs its Neuron worker, whose model loader
(``worker/neuronx_distributed_model_loader.py``) loads NxD Inference's compiled model from ``NEURON_COMPILED_ARTIFACTS``
(``model.pt`` + ``neuron_config.json``) and warms it up; its scheduler (``core/scheduler.py``,
``ContinuousBatchingNeuronScheduler``) batches requests continuously into the compiled batch, and vLLM streams the
tokens. So kiln's own vLLM engine (``runtime/engines/vllm/engine.py``: request conversion, streaming, abort, stats)
serves it, with the arguments below. Why not NxD Inference's own path: it has no server or request scheduler
(``HuggingFaceGenerationAdapter`` runs ``generate`` over one static batch), so continuous batching and streaming
would have to be rebuilt here.

What the compiled graphs fix, and vLLM Neuron 0.2.0 therefore needs to agree with (its loader ignores overrides when
it loads precompiled graphs, and recompiles, into the artifact's directory, when it cannot load them): at most
``batch_size`` sequences (``max_num_seqs``), ``seq_len`` tokens (``max_model_len``), the TP degree, the dtype, a
contiguous KV cache (prefix caching and chunked prefill off; the plugin sets the block size to the model length).
Values above the compiled ones are refused; kiln's defaults are the compiled ones. Smaller ones are passed on, but
vLLM Neuron's own flow always compiles ``batch_size = max_num_seqs`` and ``seq_len = max_model_len``, so a smaller
batch or length is a path its source does not exercise (its sampler pads parameters to ``max_num_seqs``).
With on-device sampling (the build's default) the NeuronCores sample with per-request temperature, top_k (at most
the compiled ``global_topk``) and top_p only, and return no logprobs (``NeuronCausalLM.sample`` returns
``logprobs_tensors=None``): requests asking for more are refused with the parameter named.

Written for vLLM Neuron 0.2.0, which pins vllm 0.11.0; kiln's vLLM engine was written for vLLM 0.32.0, and the part
of vLLM it uses here (``AsyncEngineArgs``, ``AsyncLLM.from_engine_args/generate/abort``, ``SamplingParams``,
``TokensPrompt``) has not been run against 0.11.0: the ``neuron``-marked test in tests/test_neuron.py is that check.
"""

from __future__ import annotations

import os
from typing import Any

from runtime.engines.base import EngineRequestError, EngineSettings, SamplingSpec
from runtime.engines.neuron.compiled import Compiled
from runtime.engines.vllm.engine import VllmEngine

# Serving settings kiln sets from its own (or the compiled graphs'), by AsyncEngineArgs name -> kiln's setting.
OWNED = {
    "tensor_parallel_size": "tensor_parallel_degree (the compiled tp_degree)",
    "max_num_seqs": "max_num_seqs",
    "max_model_len": "max_model_len",
    "dtype": "dtype",
    "model": "the model location",
    "tokenizer": "the model location",
}
# AsyncEngineArgs keys the compiled graphs rule out, and why.
REFUSED = {
    "enable_prefix_caching": "the graphs were compiled with a contiguous KV cache (no prefix caching)",
    "enable_chunked_prefill": "the graphs were compiled with a contiguous KV cache (no chunked prefill)",
    "block_size": "vLLM Neuron sets the block size to max_model_len for a contiguous KV cache",
    "num_gpu_blocks_override": "the compiled KV cache is one block per sequence",
    "additional_config": "vLLM Neuron ignores override_neuron_config when it loads precompiled graphs: rebuild with "
    "the compile.* options instead",
    "speculative_config": "the graphs were compiled without fused speculation",
    "enable_lora": "the graphs were compiled without LoRA",
}


def engine_args(s: EngineSettings) -> dict[str, Any]:
    """vLLM ``AsyncEngineArgs`` for the compiled graphs in ``s.model_dir``."""
    compiled = Compiled.read(s.model_dir)
    kwargs: dict[str, Any] = {
        "model": str(s.model_dir),
        "tokenizer": str(s.model_dir),
        "dtype": compiled.dtype,
        "tensor_parallel_size": compiled.tp_degree,
        "max_num_seqs": s.max_num_seqs or compiled.batch_size,
        "max_model_len": s.max_model_len or compiled.seq_len,
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
        "disable_log_stats": False,
    }
    return kwargs | dict(s.extra)


def environment(s: EngineSettings) -> dict[str, str]:
    """The variables vLLM Neuron reads: where the compiled graphs are (its loader's NEURON_COMPILED_ARTIFACTS)."""
    return {"NEURON_COMPILED_ARTIFACTS": str(s.model_dir), "VLLM_NO_USAGE_STATS": "1"}


def problems(s: EngineSettings) -> list[str]:
    """What these settings ask of the compiled graphs that they cannot give, one line each with the fix."""
    compiled = Compiled.read(s.model_dir)
    out = []
    if s.max_num_seqs is not None and s.max_num_seqs > compiled.batch_size:
        out.append(
            f"max_num_seqs={s.max_num_seqs} exceeds the compiled batch size ({compiled.batch_size}): set max_num_seqs"
            f"<={compiled.batch_size}, or rebuild with compile.batch_size={s.max_num_seqs}"
        )
    if s.max_model_len is not None and s.max_model_len > compiled.seq_len:
        out.append(
            f"max_model_len={s.max_model_len} exceeds the compiled sequence length ({compiled.seq_len}): set "
            f"max_model_len<={compiled.seq_len}, or rebuild with target.max_model_len={s.max_model_len}"
        )
    if s.tensor_parallel_degree != compiled.tp_degree:
        out.append(
            f"tensor_parallel_degree={s.tensor_parallel_degree}: the graphs are sharded over {compiled.tp_degree} "
            f"NeuronCores; rebuild with target.tensor_parallel_degree={s.tensor_parallel_degree}"
        )
    for key in ("enable_prefix_caching", "enable_chunked_prefill"):
        if getattr(s, key):
            out.append(f"{key}=true: {REFUSED[key]}; unset it")
    for key in s.extra:
        if key in OWNED:
            out.append(f"{key} is kiln's own setting for this engine: set {OWNED[key]} instead")
        elif key in REFUSED:
            out.append(f"{key} is not supported by the neuron engine: {REFUSED[key]}")
    return out


def refused_sampling(spec: SamplingSpec, compiled: Compiled) -> tuple[str, str] | None:
    """(request field, why) when on-device sampling cannot honour ``spec``; None when it can."""
    if not compiled.on_device_sampling:
        return None
    asks = {
        "logprobs": spec.logprobs is not None,
        "prompt_logprobs": spec.prompt_logprobs is not None,
        "presence_penalty": spec.presence_penalty != 0.0,
        "frequency_penalty": spec.frequency_penalty != 0.0,
        "repetition_penalty": spec.repetition_penalty != 1.0,
        "min_p": spec.min_p != 0.0,
        "seed": spec.seed is not None,
        "response_format": spec.structured is not None,
    }
    for param, asked in asks.items():
        if asked:
            return param, (
                f"{param} is not available: this artifact samples on the NeuronCores (temperature, top_k, top_p "
                "only); rebuild it with compile.on_device_sampling=false for host sampling"
            )
    if spec.top_k > compiled.global_topk:
        return "top_k", f"top_k={spec.top_k} exceeds the compiled on-device top-k ({compiled.global_topk})"
    return None


class NeuronEngine(VllmEngine):
    """kiln's vLLM engine on vLLM's Neuron platform, started on the compiled graphs."""

    name = "neuron"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self.compiled = Compiled.read(settings.model_dir)  # before loading: a directory without graphs fails here

    async def start(self) -> None:
        for var, value in environment(self.settings).items():
            os.environ[var] = value  # the compiled graphs are the artifact's, whatever the caller's environment says
        await super().start()

    def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(self.settings)), stat_loggers=[self._stat_sink])

    def validate(self, spec: SamplingSpec) -> None:
        if (bad := refused_sampling(spec, self.compiled)) is not None:
            raise EngineRequestError(bad[1], bad[0])
        super().validate(spec)

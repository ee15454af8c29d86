"""``compile=tensorrt_llm`` and the ``tensorrt_llm`` engine, without TensorRT-LLM (it cannot be installed here).

kiln's argument mapping is held against TensorRT-LLM's own field names, written below as data from the source read
in NVIDIA/TensorRT-LLM (the search index's stored versions; PyPI's tensorrt-llm 1.2.1, the version kiln is written
for, is a stub whose wheel lives on NVIDIA's index):

* ``tensorrt_llm/llmapi/llm_args.py``, the stored version of the 1.1-1.2 line (121,745 characters: BaseLlmArgs with
  ``orchestrator_type``, TorchLlmArgs with ``ray_worker_extension_cls``): BaseLlmArgs, TorchLlmArgs, KvCacheConfig.
  CudaGraphConfig's fields as its validator there reads them, and as main at 0004396 (2026) declares them.
* ``tensorrt_llm/sampling_params.py`` at 000a01d (tensorrt_llm/version.py there: 1.0.0rc4): SamplingParams,
  GuidedDecodingParams.
* ``tensorrt_llm/executor/result.py`` at 005bc84: CompletionOutput (the stand-in below has its fields' shape).

TorchLlmArgs forbids unknown keys and SamplingParams is a slotted dataclass: a key outside these sets would fail the
engine's start or every request, so each mapping test checks its keys against them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from artifacts.devices import Gpu, nvidia_gpus
from artifacts.manifest import AUTOTUNER_CACHE, COMPILE_CACHE_DIR, LLM_API_OPTIONS, Manifest, Target
from artifacts.ops import scan_dir
from compile.tensorrt_llm import TRTLLM_VERSION, TensorrtLlmCompileConfig, compile_key, llm_api_options
from runtime.engines.base import EngineRequestError, EngineSettings, SamplingSpec
from runtime.engines.tensorrt_llm import SPEC, compat
from runtime.engines.tensorrt_llm.args import llm_kwargs
from runtime.engines.tensorrt_llm.engine import guided_kwargs, sampling_kwargs
from runtime.exitcodes import EX_CONFIG
from runtime.host import Host, TargetMismatchError
from tests.conftest import ROOT, build, run_cli

# -- TensorRT-LLM's field names, as read (see the module docstring) -----------------------------------------------

BASE_LLM_ARGS = {
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "tensor_parallel_size",
    "dtype", "revision", "tokenizer_revision", "pipeline_parallel_size", "context_parallel_size", "gpus_per_node",
    "moe_cluster_parallel_size", "moe_tensor_parallel_size", "moe_expert_parallel_size", "enable_attention_dp",
    "enable_lm_head_tp_in_adp", "cp_config", "load_format", "fail_fast_on_attention_window_too_large",
    "enable_lora", "lora_config", "kv_cache_config", "enable_chunked_prefill", "guided_decoding_backend",
    "batched_logits_processor", "iter_stats_max_iterations", "request_stats_max_iterations", "peft_cache_config",
    "scheduler_config", "cache_transceiver_config", "sparse_attention_config", "speculative_config",
    "max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens", "gather_generation_logits",
    "num_postprocess_workers", "postprocess_tokenizer_dir", "reasoning_parser", "decoding_config", "mpi_session",
    "backend", "return_perf_metrics", "orchestrator_type",
}  # fmt: skip
TORCH_LLM_ARGS = BASE_LLM_ARGS | {
    "build_config", "garbage_collection_gen0_threshold", "cuda_graph_config", "attention_dp_config",
    "disable_overlap_scheduler", "moe_config", "attn_backend", "sampler_type", "enable_iter_perf_stats",
    "enable_iter_req_stats", "print_iter_log", "perf_metrics_max_requests", "batch_wait_timeout_ms",
    "batch_wait_timeout_iters", "batch_wait_max_tokens_ratio", "torch_compile_config", "enable_autotuner",
    "enable_layerwise_nvtx_marker", "enable_min_latency", "stream_interval", "force_dynamic_quantization",
    "allreduce_strategy", "checkpoint_loader", "checkpoint_format", "kv_connector_config", "mm_encoder_only",
    "ray_worker_extension_cls",
}  # fmt: skip
KV_CACHE_CONFIG = {
    "enable_block_reuse", "max_tokens", "max_attention_window", "sink_token_length", "free_gpu_memory_fraction",
    "host_cache_size", "onboard_blocks", "cross_kv_cache_fraction", "secondary_offload_min_priority",
    "event_buffer_max_size", "attention_dp_events_gather_period_ms", "enable_partial_reuse", "copy_on_partial_reuse",
    "use_uvm", "max_gpu_total_bytes", "dtype", "mamba_ssm_cache_dtype", "tokens_per_block",
}  # fmt: skip
CUDA_GRAPH_CONFIG = {"batch_sizes", "max_batch_size", "enable_padding"}
SAMPLING_PARAMS = {
    "end_id", "pad_id", "max_tokens", "bad", "bad_token_ids", "stop", "stop_token_ids", "include_stop_str_in_output",
    "embedding_bias", "logits_processor", "apply_batched_logits_processor", "n", "best_of", "use_beam_search",
    "top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay", "seed", "temperature", "min_tokens",
    "beam_search_diversity_rate", "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty",
    "early_stopping", "no_repeat_ngram_size", "min_p", "beam_width_array", "logprobs", "prompt_logprobs",
    "return_context_logits", "return_generation_logits", "exclude_input_from_output", "return_encoder_output",
    "return_perf_metrics", "additional_model_outputs", "lookahead_config", "guided_decoding", "ignore_eos",
    "detokenize", "add_special_tokens", "truncate_prompt_tokens", "skip_special_tokens",
    "spaces_between_special_tokens",
}  # fmt: skip
GUIDED_DECODING_PARAMS = {"json", "regex", "grammar", "json_object", "structural_tag"}

H100 = Gpu("NVIDIA H100 80GB HBM3", "9.0", "570.86.15", 81559)
A10G = Gpu("NVIDIA A10G", "8.6", "570.86.15", 23028)
TARGET = {"tensor_parallel_degree": 2, "dtype": "bfloat16", "max_model_len": 4096, "quantization": "fp8-static"}


def gpu_host(*gpus: Gpu) -> Host:
    return Host(devices=("cuda", "cpu"), gpu_count=len(gpus), numa_nodes=1, gpus=gpus)


def assert_known(kwargs: dict[str, Any]) -> None:
    """Every key kiln passes is one TensorRT-LLM takes (top level and the nested configs)."""
    assert set(kwargs) <= TORCH_LLM_ARGS, set(kwargs) - TORCH_LLM_ARGS
    assert set(kwargs.get("kv_cache_config") or {}) <= KV_CACHE_CONFIG
    assert set(kwargs.get("cuda_graph_config") or {}) <= CUDA_GRAPH_CONFIG


# -- the build side: options file, key, config checks --------------------------------------------------------------


@pytest.mark.unit
def test_written_for_the_version_the_toolchain_pins() -> None:
    from build.toolchains import Toolchain

    tc = Toolchain("tensorrt-llm", ROOT / "build" / "toolchains" / "tensorrt-llm.txt")
    assert tc.pins == {"tensorrt-llm": "1.2.1"}  # the index line is a pip option, not a pin
    assert "--extra-index-url https://pypi.nvidia.com" in tc.requirements.read_text()
    assert TRTLLM_VERSION == "1.2.1"
    assert "tensorrt-llm==1.2.1" in SPEC.install_hint


@pytest.mark.unit
def test_every_compile_option_lands_in_the_options_file_under_trtllms_name() -> None:
    cfg = TensorrtLlmCompileConfig(
        max_batch_size=64,
        max_num_tokens=4096,
        free_gpu_memory_fraction=0.8,
        enable_block_reuse=False,
        cuda_graph_batch_sizes=[8, 1, 4],
        cuda_graph_padding=False,
        enable_autotuner=False,
        pipeline_parallel_size=2,
    )
    opts = llm_api_options(cfg, TARGET, {})
    assert opts == {
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 2,
        "dtype": "bfloat16",
        "max_seq_len": 4096,
        "max_batch_size": 64,
        "max_num_tokens": 4096,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.8, "enable_block_reuse": False},
        "cuda_graph_config": {"enable_padding": False, "batch_sizes": [1, 4, 8]},
        "enable_autotuner": False,
    }
    assert_known(opts)


@pytest.mark.unit
def test_the_batch_comes_from_serving_and_enforce_eager_captures_no_graphs() -> None:
    defaults = TensorrtLlmCompileConfig()
    opts = llm_api_options(defaults, TARGET, {"max_num_seqs": 32})
    assert opts["max_batch_size"] == 32
    assert opts["cuda_graph_config"] == {"enable_padding": True, "max_batch_size": 32}
    assert opts["kv_cache_config"] == {"free_gpu_memory_fraction": 0.9, "enable_block_reuse": True}
    assert "max_batch_size" not in llm_api_options(defaults, TARGET, {})  # left to the runtime's default
    eager = llm_api_options(defaults, TARGET, {"enforce_eager": True})
    assert eager["cuda_graph_config"] is None  # TorchLlmArgs: None turns CUDA graphs off


@pytest.mark.unit
def test_the_key_records_version_parallelism_dtype_quantization_and_limits() -> None:
    opts = llm_api_options(TensorrtLlmCompileConfig(max_batch_size=64, pipeline_parallel_size=2), TARGET, {})
    assert compile_key(opts, TARGET, "1.2.1") == {
        "device": "cuda",
        "tensorrt_llm": "1.2.1",
        "tp": "2",
        "pp": "2",
        "dtype": "bfloat16",
        "quantization": "fp8-static",
        "max_num_tokens": "8192",
        "max_seq_len": "4096",
        "max_batch_size": "64",
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["compile=tensorrt_llm"], "target.engine"),  # target.engine defaults to vllm
        (["compile.max_batch_size=0"], "compile.max_batch_size"),
        (["compile.max_batch_size=64", "serving.max_num_seqs=32"], "compile.max_batch_size"),
        (["compile.max_num_tokens=0"], "compile.max_num_tokens"),
        (["compile.free_gpu_memory_fraction=1.5"], "compile.free_gpu_memory_fraction"),
        (["compile.cuda_graph_batch_sizes=[1,512]", "compile.max_batch_size=256"], "compile.cuda_graph_batch_sizes"),
        (["compile.cuda_graph_batch_sizes=[1,2]", "serving.enforce_eager=true"], "compile.cuda_graph_batch_sizes"),
        (["compile.pipeline_parallel_size=0"], "compile.pipeline_parallel_size"),
        (["compile.device=tpu"], "compile.device"),
        (["compile.timeout_s=0"], "compile.timeout_s"),
    ],
)
def test_bad_compile_config_is_refused_naming_the_key(hydra: None, overrides: list[str], key: str) -> None:
    from hydra import compose

    from build.config import validate
    from build.errors import ConfigError

    engine = [] if overrides == ["compile=tensorrt_llm"] else ["compile=tensorrt_llm", "target.engine=tensorrt_llm"]
    with pytest.raises(ConfigError) as err:
        validate(compose("build", overrides=[*engine, *overrides]))
    assert key in [k for k, _ in err.value.problems]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("device", "host", "toolchain"),
    [("auto", ("cpu",), "build"), ("auto", ("cuda", "cpu"), "tensorrt-llm"), ("cpu", ("cuda", "cpu"), "build")],
)
def test_a_gpu_build_host_runs_the_tensorrt_llm_toolchain(device: str, host: tuple[str, ...], toolchain: str) -> None:
    from compile.registry import COMPILERS

    spec = COMPILERS["tensorrt_llm"]
    assert spec.toolchain_for(TensorrtLlmCompileConfig(device=device).build_device(host)) == toolchain


# -- the runtime side: LLM kwargs, refusals, defaults ---------------------------------------------------------------


def artifact_dir(tmp_path: Path, opts: dict[str, Any] | None) -> Path:
    d = tmp_path / "art"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    if opts is not None:
        (d / LLM_API_OPTIONS).write_text(yaml.safe_dump(opts))
    return d


@pytest.mark.unit
def test_llm_kwargs_put_kilns_settings_over_the_options_and_the_operators_keys_over_both(tmp_path: Path) -> None:
    opts = llm_api_options(TensorrtLlmCompileConfig(max_batch_size=64), TARGET | {"tensor_parallel_degree": 1}, {})
    d = artifact_dir(tmp_path, opts)
    s = EngineSettings(
        model_dir=d,
        device="cuda",
        dtype="bfloat16",
        max_model_len=2048,
        max_num_seqs=16,
        enable_prefix_caching=False,
        kv_cache_gib=2.0,
        extra={"kv_cache_config": {"host_cache_size": 1024}, "stream_interval": 4},
    )
    kw = llm_kwargs(s)
    assert kw == {
        "model": str(d),
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "dtype": "bfloat16",
        "max_seq_len": 2048,
        "max_batch_size": 16,
        "max_num_tokens": 8192,
        "kv_cache_config": {
            "free_gpu_memory_fraction": 0.9,
            "enable_block_reuse": False,
            "max_gpu_total_bytes": 2 << 30,
            "host_cache_size": 1024,
        },
        "cuda_graph_config": {"enable_padding": True, "max_batch_size": 16},
        "enable_autotuner": True,
        "guided_decoding_backend": "xgrammar",
        "stream_interval": 4,
    }
    assert_known(kw)
    assert llm_kwargs(dataclasses.replace(s, enforce_eager=True))["cuda_graph_config"] is None


@pytest.mark.unit
def test_a_plain_checkpoint_gets_kilns_settings_only(tmp_path: Path) -> None:
    kw = llm_kwargs(EngineSettings(model_dir=artifact_dir(tmp_path, None), device="cuda", max_num_seqs=8))
    assert kw["cuda_graph_config"] == {"max_batch_size": 8}
    assert kw["kv_cache_config"] == {}
    assert_known(kw)


@pytest.mark.unit
def test_the_check_refuses_kilns_own_keys_and_devices_other_than_nvidia_gpus(tmp_path: Path) -> None:
    d = artifact_dir(tmp_path, {"pipeline_parallel_size": 2})
    extra = {"tensor_parallel_size": 2, "backend": "tensorrt", "max_seq_len": 9, "pipeline_parallel_size": 1}
    problems = SPEC.check(EngineSettings(model_dir=d, device="cpu", extra=extra))
    assert len(problems) == 5
    assert "NVIDIA GPUs only" in problems[0]
    assert any("backend='tensorrt'" in p and "PyTorch backend" in p for p in problems)
    assert any("tensor_parallel_size=2" in p and "tensor_parallel_degree" in p for p in problems)
    assert any("max_seq_len=9" in p and "max_model_len" in p for p in problems)
    assert any("pipeline_parallel_size=1" in p and "compile.pipeline_parallel_size" in p for p in problems)
    assert SPEC.check(EngineSettings(model_dir=d, device="cuda", extra={"stream_interval": 2})) == []


@pytest.mark.unit
def test_the_batch_default_is_the_artifacts_then_lmis(tmp_path: Path) -> None:
    built = SPEC.defaults(EngineSettings(model_dir=artifact_dir(tmp_path, {"max_batch_size": 64}), device="cuda"))
    assert built["max_num_seqs"].value == 64
    (tmp_path / "art" / LLM_API_OPTIONS).unlink()
    assert SPEC.defaults(EngineSettings(model_dir=tmp_path / "art", device="cuda"))["max_num_seqs"].value == 256


# -- the key against simulated hosts -------------------------------------------------------------------------------

OPTIONS_KEY = {"device": "cuda", "tensorrt_llm": "1.2.1", "tp": "1", "pp": "1", "dtype": "bfloat16"}
TUNED_KEY = OPTIONS_KEY | compat.gpu_key("12.9", (H100,))


@pytest.mark.unit
def test_an_sm90_autotuner_cache_is_refused_on_an_a10g_naming_the_capability() -> None:
    field, why = compat.check_key(TUNED_KEY, gpu_host(A10G), "bfloat16", "1.2.1", "12.9") or ("", "")
    assert field == "gpu_capability"
    assert "'9.0'" in why
    assert "'8.6'" in why
    assert "--ignore-compile-cache" in why


@pytest.mark.unit
def test_another_h100_sku_is_refused_by_name_and_the_same_gpu_fits() -> None:
    nvl = Gpu("NVIDIA H100 NVL", "9.0", "570.86.15", 95830)
    assert compat.check_key(TUNED_KEY, gpu_host(nvl), "bfloat16", "1.2.1", "12.9")[0] == "gpu_name"  # type: ignore[index]
    assert compat.check_key(TUNED_KEY, gpu_host(H100), "bfloat16", "1.2.1", "12.9") is None
    newer_driver = Gpu(H100.name, "9.0", "580.10.01", 81559)
    assert compat.check_key(TUNED_KEY, gpu_host(newer_driver), "bfloat16", "1.2.1", "12.9") is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "installed", "fits"),
    [
        (OPTIONS_KEY, "1.2.0", True),  # options alone: the same release series
        (OPTIONS_KEY, "1.3.0", False),
        (TUNED_KEY, "1.2.0", False),  # a tuned cache: the exact version
        (TUNED_KEY, "1.2.1", True),
    ],
)
def test_another_tensorrt_llm_version_is_refused_with_the_install_line(
    key: dict[str, str], installed: str, fits: bool
) -> None:
    bad = compat.check_key(key, gpu_host(H100), "bfloat16", installed, "12.9")
    assert (bad is None) == fits
    if bad:
        assert bad[0] == "tensorrt_llm"
        assert "tensorrt-llm==1.2.1" in bad[1]
        assert installed in bad[1]


@pytest.mark.unit
def test_more_tp_x_pp_than_gpus_is_refused_naming_tp() -> None:
    key = OPTIONS_KEY | {"tp": "2", "pp": "2"}
    field, why = compat.check_key(key, gpu_host(H100, H100), "bfloat16", "1.2.1", None) or ("", "")
    assert field == "tp"
    assert "4 GPUs" in why
    assert "this host has 2" in why
    assert compat.check_key(key, gpu_host(*(H100,) * 4), "bfloat16", "1.2.1", None) is None


@pytest.mark.unit
def test_an_operator_dtype_override_is_a_mismatch() -> None:
    assert compat.check_key(OPTIONS_KEY, gpu_host(H100), "float16", "1.2.1", None)[0] == "dtype"  # type: ignore[index]


def compiled_artifact(tmp_path: Path, key: dict[str, str]) -> tuple[Path, Manifest]:
    d = artifact_dir(tmp_path, {"tensor_parallel_size": 1})
    (d / COMPILE_CACHE_DIR).mkdir()
    (d / COMPILE_CACHE_DIR / AUTOTUNER_CACHE).write_text(json.dumps({"metadata": {"device_name": H100.name}}))
    target = Target("tensorrt_llm", "", ("cuda",), "bfloat16", 1, 2048, compile=key)
    return d, Manifest.create("art", scan_dir(d), target, {}, {})


@pytest.fixture
def on_a10g(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as an A10G host with tensorrt_llm 1.2.1 and a CUDA torch."""
    import runtime.host

    monkeypatch.setattr(runtime.host, "detect", lambda: gpu_host(A10G))
    monkeypatch.setattr(type(SPEC), "installed_version", lambda self: "1.2.1")
    monkeypatch.setattr(compat, "_torch_cuda", lambda recorded: "12.9")


@pytest.mark.unit
def test_prepare_refuses_before_loading_and_ignore_serves_without_the_cache(tmp_path: Path, on_a10g: None) -> None:
    d, manifest = compiled_artifact(tmp_path, TUNED_KEY)
    s = EngineSettings(model_dir=d, device="cuda", dtype="bfloat16")
    with pytest.raises(TargetMismatchError) as err:
        SPEC.compile.prepare(d, manifest, s, ignore=False)  # type: ignore[union-attr]
    assert err.value.field == "compile.gpu_capability"
    assert SPEC.compile.prepare(d, manifest, s, ignore=True).compile_cache is None  # type: ignore[union-attr]


@pytest.mark.unit
def test_a_fitting_host_gets_a_writable_copy_of_the_autotuner_cache(
    tmp_path: Path, on_a10g: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = OPTIONS_KEY | compat.gpu_key("12.9", (A10G,))
    d, manifest = compiled_artifact(tmp_path, key)
    s = SPEC.compile.prepare(d, manifest, EngineSettings(model_dir=d, device="cuda", dtype="bfloat16"), ignore=False)  # type: ignore[union-attr]
    assert s.compile_cache is not None
    assert s.compile_cache != d / COMPILE_CACHE_DIR
    assert (s.compile_cache / AUTOTUNER_CACHE).read_text() == (d / COMPILE_CACHE_DIR / AUTOTUNER_CACHE).read_text()
    monkeypatch.delenv(compat.CACHE_ENV, raising=False)
    compat.point_engine_at(s.compile_cache)
    assert Path(os.environ[compat.CACHE_ENV]) == s.compile_cache / AUTOTUNER_CACHE


# -- sampling ------------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_sampling_params_get_only_fields_trtllm_has() -> None:
    spec = SamplingSpec(
        max_tokens=16,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        min_p=0.05,
        seed=3,
        stop=("\n",),
        stop_token_ids=(2,),
        n=2,
        presence_penalty=0.5,
        repetition_penalty=1.1,
        logprobs=0,
        ignore_eos=True,
        min_tokens=2,
    )
    kw = sampling_kwargs(spec)
    assert set(kw) <= SAMPLING_PARAMS
    assert kw["top_k"] is None  # kiln's 0 (disabled) is TensorRT-LLM's None (all tokens)
    assert kw["logprobs"] == 1  # 0 is falsy there and would return no logprobs
    assert (kw["n"], kw["stop"], kw["stop_token_ids"], kw["min_tokens"]) == (2, ["\n"], [2], 2)
    assert kw["frequency_penalty"] is None
    assert kw["repetition_penalty"] == 1.1
    greedy = sampling_kwargs(SamplingSpec(max_tokens=4, temperature=0.0))
    assert (greedy["top_k"], greedy["top_p"], greedy["temperature"]) == (1, None, None)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("spec", "param"),
    [
        (SamplingSpec(max_tokens=4, prompt_logprobs=1), "prompt_logprobs"),
        (SamplingSpec(max_tokens=4, temperature=0.0, n=2), "n"),
        (SamplingSpec(max_tokens=4, structured={"choice": ["a", "b"]}), "structured"),
    ],
)
def test_what_trtllm_cannot_do_is_refused_naming_the_parameter(spec: SamplingSpec, param: str) -> None:
    def both() -> None:
        sampling_kwargs(spec)
        guided_kwargs(spec.structured)

    with pytest.raises(EngineRequestError) as err:
        both()
    assert err.value.param == param


@pytest.mark.unit
def test_structured_outputs_become_guided_decoding_params() -> None:
    assert guided_kwargs({"json": {"type": "object"}}) == {"json": {"type": "object"}}
    assert guided_kwargs({"json_object": True}) == {"json_object": True}
    assert guided_kwargs({"regex": "a+", "disable_any_whitespace": True}) == {"regex": "a+"}
    for kind in ("json", "json_object", "regex", "grammar", "structural_tag"):
        assert set(guided_kwargs({kind: "x"}) or {}) <= GUIDED_DECODING_PARAMS


# -- the engine against a stand-in for tensorrt_llm ----------------------------------------------------------------
# Its shape is the source's (module docstring): LLM(model, **kwargs) with generate_async(inputs, sampling_params,
# streaming) returning a RequestOutput that is its own async iterator; CompletionOutput's cumulative text/token_ids/
# logprobs ({id: Logprob(logprob, rank)}) and finish_reason; SamplingParams refusing unknown keywords.


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclasses.dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class StandInOutput:
    """Responses, each for one sequence: (index, text added, token ids added, finish reason)."""

    def __init__(self, n: int, steps: list[tuple[int, str, list[int], str | None]]) -> None:
        self.outputs = [Completion(i) for i in range(n)]
        self.steps, self.finished, self.aborted = list(steps), False, False

    def __aiter__(self) -> StandInOutput:
        return self

    async def __anext__(self) -> StandInOutput:
        if self.finished or self.aborted or not self.steps:
            raise StopAsyncIteration
        i, text, ids, reason = self.steps.pop(0)
        c = self.outputs[i]
        c.text += text
        c.token_ids += ids
        c.logprobs += [{t: Logprob(-0.5, 1), t + 1: Logprob(-1.5, 2)} for t in ids]
        c.finish_reason = reason
        self.finished = all(o.finish_reason for o in self.outputs)
        return self

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    made = types.SimpleNamespace(llm=None, outputs=[])
    fields = [(f, Any, dataclasses.field(default=None)) for f in sorted(SAMPLING_PARAMS)]
    sampling = dataclasses.make_dataclass("SamplingParams", fields, kw_only=True, slots=True)
    guided = dataclasses.make_dataclass(
        "GuidedDecodingParams", [(f, Any, dataclasses.field(default=None)) for f in GUIDED_DECODING_PARAMS]
    )

    class LLM:
        def __init__(self, model: str, **kwargs: Any) -> None:
            unknown = set(kwargs) - TORCH_LLM_ARGS
            if unknown:
                raise ValueError(f"unknown LLM args {unknown}")
            self.model, self.kwargs, self.args = model, kwargs, types.SimpleNamespace(max_seq_len=kwargs["max_seq_len"])
            made.llm = self

        def generate_async(self, inputs: list[int], sampling_params: Any, streaming: bool = False) -> StandInOutput:
            assert streaming
            assert isinstance(inputs, list)
            out = made.script.pop(0)
            made.outputs.append((sampling_params, out))
            return out  # type: ignore[no-any-return]

        def shutdown(self) -> None:
            self.down = True

    trt = types.ModuleType("tensorrt_llm")
    sp = types.ModuleType("tensorrt_llm.sampling_params")
    sp.GuidedDecodingParams = guided  # type: ignore[attr-defined]
    trt.LLM, trt.SamplingParams, trt.sampling_params = LLM, sampling, sp  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trt)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.sampling_params", sp)
    return made


async def collect(gen: AsyncIterator[Any], limit: int | None = None) -> list[Any]:
    out = []
    async for item in gen:
        out.append(item)
        if limit is not None and len(out) == limit:
            break
    await gen.aclose()  # type: ignore[attr-defined]
    return out


@pytest.mark.unit
def test_the_engine_streams_each_sequences_new_text_once_and_maps_finish_reasons(
    tmp_path: Path, stand_in: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.engines.tensorrt_llm.engine import TensorrtLlmEngine

    d = artifact_dir(tmp_path, llm_api_options(TensorrtLlmCompileConfig(), TARGET | {"tensor_parallel_degree": 1}, {}))
    cache = tmp_path / "copy"
    monkeypatch.delenv(compat.CACHE_ENV, raising=False)
    s = EngineSettings(model_dir=d, device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=4)
    engine = TensorrtLlmEngine(dataclasses.replace(s, compile_cache=cache))
    # two sequences, interleaved: each response updates one of them
    steps = [(0, "He", [5], None), (1, "Yo", [7], None), (0, "llo", [6], "stop"), (1, "!", [8], "length")]
    stand_in.script = [StandInOutput(2, steps)]

    async def run() -> list[Any]:
        await engine.start()
        spec = SamplingSpec(max_tokens=2, temperature=0.8, n=2, logprobs=1)
        return await collect(engine.generate("r1", [1, 2, 3], spec))

    outs = asyncio.run(run())
    assert stand_in.llm.model == str(d)
    assert stand_in.llm.kwargs["max_batch_size"] == 4
    assert Path(os.environ[compat.CACHE_ENV]) == cache / AUTOTUNER_CACHE
    got = [(dl.index, dl.text, [t.id for t in dl.tokens], dl.finish_reason) for o in outs for dl in o.deltas]
    assert got == [(0, "He", [5], None), (1, "Yo", [7], None), (0, "llo", [6], "stop"), (1, "!", [8], "length")]
    first = outs[0].deltas[0].tokens[0]
    assert (first.logprob, first.rank, first.top) == (-0.5, 1, ((5, "", -0.5),))
    assert outs[-1].finished
    assert outs[0].prompt_tokens == 3
    params, out = stand_in.outputs[0]
    assert (params.n, params.top_k, params.logprobs) == (2, None, 1)
    assert not out.aborted  # finished: nothing to cancel


@pytest.mark.unit
def test_closing_the_stream_aborts_the_request(tmp_path: Path, stand_in: types.SimpleNamespace) -> None:
    from runtime.engines.tensorrt_llm.engine import TensorrtLlmEngine

    engine = TensorrtLlmEngine(EngineSettings(model_dir=artifact_dir(tmp_path, None), device="cuda", max_model_len=64))
    stand_in.script = [StandInOutput(1, [(0, "a", [4], None), (0, "b", [5], None), (0, "c", [6], "stop")])]

    async def run() -> list[Any]:
        await engine.start()
        return await collect(engine.generate("r1", [1], SamplingSpec(max_tokens=3)), limit=1)

    assert len(asyncio.run(run())) == 1
    assert stand_in.outputs[0][1].aborted
    assert engine.stats().running == 0


# -- end to end here: build on CPU, serve refuses, config shows the kwargs -----------------------------------------


@pytest.fixture(scope="module")
def cpu_built() -> str:
    return build("model=tiny", "target.engine=tensorrt_llm", "compile=tensorrt_llm", "compile.max_batch_size=64")


@pytest.mark.integration  # spawns the build CLI (about 10 s)
def test_a_cpu_build_publishes_the_options_file_and_the_key(cpu_built: str, tmp_path: Path) -> None:
    assert run_cli("artifacts", "pull", cpu_built, str(tmp_path / "a")).returncode == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    target = manifest["target"]
    assert target["compile"] == {
        "device": "cuda",
        "tensorrt_llm": "1.2.1",
        "tp": "1",
        "pp": "1",
        "dtype": "bfloat16",
        "quantization": "none",
        "max_num_tokens": "8192",
        "max_seq_len": str(target["max_model_len"]),
        "max_batch_size": "64",
    }
    opts = yaml.safe_load((tmp_path / "a" / LLM_API_OPTIONS).read_text())
    assert opts["max_batch_size"] == 64
    assert opts["max_seq_len"] == target["max_model_len"]
    assert_known(opts)
    assert not (tmp_path / "a" / COMPILE_CACHE_DIR).exists()  # no GPU here: options only
    compile_stage = next(s for s in manifest["provenance"]["stages"] if s["stage"] == "compile")
    assert compile_stage["toolchain"]["name"] == "build"  # no TensorRT-LLM needed on a CPU build host


@pytest.mark.integration
@pytest.mark.skipif(SPEC.installed_version() is not None, reason="TensorRT-LLM is installed here")
def test_serve_refuses_it_here_with_the_install_line(cpu_built: str) -> None:
    proc = run_cli("runtime", "serve", cpu_built, "--port", "1", timeout=120)
    assert proc.returncode == EX_CONFIG, proc.stderr[-2000:]
    assert "tensorrt_llm is not installed here" in proc.stderr
    assert "tensorrt-llm==1.2.1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_runtime_config_shows_the_llm_kwargs_on_a_gpu_host(
    cpu_built: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m runtime config --json`` on an H100 host with tensorrt_llm 1.2.1 (its distribution's metadata)."""
    from runtime.__main__ import print_config
    from runtime.app import configure

    dist = tmp_path / "site" / "tensorrt_llm-1.2.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: 1.2.1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    startup = configure({"model": cpu_built}, ["max_rolling_batch_size=32"], {}, host=gpu_host(H100))
    print_config(startup, as_json_output=True)
    shown = json.loads(capsys.readouterr().out)
    assert shown["engine"] == "tensorrt_llm"
    assert shown["device"] == "cuda"
    args = shown["engine_args"]
    assert args["max_batch_size"] == 32  # LMI's max_rolling_batch_size over the artifact's 64
    assert args["cuda_graph_config"] == {"enable_padding": True, "max_batch_size": 32}
    assert args["kv_cache_config"] == {"free_gpu_memory_fraction": 0.9, "enable_block_reuse": True}
    assert_known(args)


# -- with an NVIDIA GPU and TensorRT-LLM ---------------------------------------------------------------------------


def _trtllm_importable() -> bool:
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.skipif(not (nvidia_gpus() and _trtllm_importable()), reason="needs an NVIDIA GPU and tensorrt_llm")
def test_a_gpu_build_tunes_and_serves(tmp_path: Path) -> None:
    """``pytest -m gpu tests/test_tensorrt_llm.py`` on a GPU host with tensorrt_llm: build (the autotuner warm-up
    runs here), then serve and ask."""
    from openai import OpenAI

    from tests.conftest import start_server, stop_cleanly

    uri = build("model=tiny", "target.engine=tensorrt_llm", "compile=tensorrt_llm", "compile.device=cuda")
    assert run_cli("artifacts", "pull", uri, str(tmp_path / "a")).returncode == 0
    key = json.loads((tmp_path / "a" / "manifest.json").read_text())["target"]["compile"]
    assert key["gpu_capability"] == nvidia_gpus()[0].capability
    assert (tmp_path / "a" / COMPILE_CACHE_DIR / AUTOTUNER_CACHE).is_file()
    server = start_server(uri, tmp_path, timeout=900)
    try:
        out = OpenAI(base_url=server.base + "/v1", api_key="none").completions.create(
            model="tiny-llama", prompt="The grass is", max_tokens=8, temperature=0
        )
        assert out.choices[0].finish_reason in ("length", "stop")
    finally:
        stop_cleanly(server)


class FailingOutput(StandInOutput):
    def __init__(self, exc: Exception) -> None:
        super().__init__(1, [])
        self.exc = exc

    async def __anext__(self) -> StandInOutput:
        raise self.exc


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exc", "healthy", "kind"),
    [
        (ValueError("prompt too long"), True, "EngineRequestError"),
        (RuntimeError("kernel failed"), True, "EngineError"),
        (RuntimeError("executor gone"), False, "EngineDeadError"),
    ],
)
def test_request_failures_map_onto_kilns_errors(
    tmp_path: Path, stand_in: types.SimpleNamespace, exc: Exception, healthy: bool, kind: str
) -> None:
    from runtime.engines.base import EngineError
    from runtime.engines.tensorrt_llm.engine import TensorrtLlmEngine

    engine = TensorrtLlmEngine(EngineSettings(model_dir=artifact_dir(tmp_path, None), device="cuda", max_model_len=64))
    stand_in.script = [FailingOutput(exc)]

    async def run() -> None:
        await engine.start()
        stand_in.llm._check_health = lambda: healthy  # what trtllm-serve's /health asks the LLM
        await collect(engine.generate("r1", [1], SamplingSpec(max_tokens=3)))

    with pytest.raises(EngineError) as err:
        asyncio.run(run())
    assert type(err.value).__name__ == kind
    assert stand_in.outputs[0][1].aborted  # not finished: cancelled in the engine

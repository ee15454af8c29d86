"""The Neuron target: ``compile=neuron`` (NxD Inference compiles the graphs in the build) and the ``neuron`` engine
(vLLM Neuron serves them).

Neither NxD Inference nor vLLM Neuron installs here (AWS's index is unreachable), so kiln's mapping is held against
their published signatures, written below as literal data read from their source:

* aws-neuron/neuronx-distributed-inference @ 4bcdc54 (2026-07-28; ``_version.py`` 0.9.0, the Neuron SDK 2.29 line):
  the keyword names ``NeuronConfig.__init__`` pops (``models/config.py``; it only *warns* about others, so a
  misspelt key would be silently ignored), ``OnDeviceSamplingConfig``'s, the model classes of ``MODEL_TYPES``
  (``utils/constants.py``) and the files ``compile()`` writes (``models/application_base.py``);
* vllm-project/vllm-neuron @ a5ef7c8 (0.2.0): the neuron_config its loader builds for vLLM's settings
  (``worker/neuronx_distributed_model_loader.py: _get_default_neuron_config``).

The host checks run against simulated hosts (``runtime.host.Host``). The ``neuron``-marked test at the end builds,
serves and queries the tiny model on a Neuron host: ``pytest -m neuron tests/test_neuron.py`` there.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import pytest

from build.config import validate
from build.errors import ConfigError
from compile import neuron as cn
from runtime.engines.base import EngineRequestError, EngineSettings, SamplingSpec
from runtime.engines.neuron import SPEC
from runtime.engines.neuron import compiled as rc
from runtime.engines.neuron.engine import NeuronEngine, engine_args, refused_sampling
from runtime.host import Host, TargetMismatchError
from tests.conftest import run_cli

pytestmark = pytest.mark.unit

# NeuronConfig.__init__'s keyword names at neuronx-distributed-inference 4bcdc54 (every kwargs.pop in models/config.py).
NEURON_CONFIG_FIELDS = frozenset(
    {
        "activation_quantization_type", "allow_input_truncation", "apply_seq_ids_mask", "async_mode",
        "attention_dp_degree", "attention_dtype", "attn_block_cte_nki_kernel_enabled",
        "attn_block_tkg_nki_kernel_cache_update", "attn_block_tkg_nki_kernel_cascaded_attention",
        "attn_block_tkg_nki_kernel_disable_gpsimd_sb2sb", "attn_block_tkg_nki_kernel_enabled",
        "attn_block_tkg_nki_kernel_use_online_softmax", "attn_cls", "attn_kernel_enabled",
        "attn_tkg_builtin_kernel_enabled", "attn_tkg_nki_kernel_enabled", "batch_size", "bucket_n_active_tokens",
        "buckets", "cast_type", "cc_pipeline_tiling_factor", "chunked_prefill_config", "context_encoding_buckets",
        "cp_degree", "ctx_batch_size", "disable_argmax_kernel", "disable_kv_cache_tiling", "disable_numeric_cc_token",
        "dma_order_config", "draft_model_modules_to_not_convert", "eagle_rolling_buffer_kernel_enabled",
        "enable_bucketing", "enable_cte_modular_flow", "enable_eagle_draft_input_norm", "enable_eagle_speculation",
        "enable_fused_speculation", "enable_output_completion_notifications", "enable_spill_reload_dge",
        "enable_ve_data_parallel", "ep_degree", "ep_dispatch_cc_option", "expert_mlp_nki_kernel_enabled",
        "flash_decoding_enabled", "fused_qkv", "fused_rmsnorm_skip_gamma", "is_block_kv_layout",
        "is_continuous_batching", "is_eagle3", "is_eagle_draft", "is_full_model_shuffled", "is_medusa",
        "is_mxfp4_compute", "is_prefix_caching", "k_cache_transposed", "kv_cache_batch_size", "kv_cache_padding_size",
        "kv_cache_quant", "kv_quant_config", "layer_boundary_markers", "lm_head_pad", "lm_head_pad_alignment_size",
        "local_ranks_size", "logical_nc_config", "logical_neuron_cores", "lora_config", "max_batch_size",
        "max_context_length", "max_length", "max_new_tokens", "medusa_speculation_length", "medusa_tree",
        "mlp_cp_degree", "mlp_kernel_enabled", "mlp_kernel_fuse_residual_add", "mlp_tkg_nki_kernel_enabled",
        "modules_to_not_convert", "moe_fused_nki_kernel_enabled", "n_active_tokens", "n_positions", "num_medusa_heads",
        "on_cpu", "on_device_sampling_config", "out_proj_kernel_enabled", "output_logits", "overrides_torch_dtype",
        "pa_block_size", "pa_num_blocks", "padded_hidden_size", "padded_intermediate_size", "padding_side", "pp_degree",
        "pre_rope_rmsnorm", "prefix_buckets", "qk_layernorm", "qkv_cte_nki_kernel_fuse_rope", "qkv_kernel_enabled",
        "qkv_kernel_fuse_residual_add", "qkv_kernel_nbsd_layout", "qkv_nki_kernel_enabled", "quantization_block_axis",
        "quantization_block_size", "quantization_dtype", "quantization_scale_dtype", "quantization_type",
        "quantize_clamp_bound", "quantized", "quantized_checkpoints_path", "quantized_mlp_kernel_enabled",
        "rmsnorm_quantize_kernel_enabled", "router_topk_nki_kernel_enabled", "rpl_reduce_dtype",
        "save_sharded_checkpoint", "scratchpad_page_size", "seq_len", "seq_len_threshold_for_cc_tiling",
        "sequence_parallel_enabled", "shared_mlp_nki_kernel_enabled", "skip_sharding", "skip_warmup", "spec_batch_size",
        "speculation_length", "start_rank_id", "strided_context_parallel_kernel_enabled", "switch_cc", "target",
        "tensor_capture_config", "tensor_replacement_config", "tkg_batch_size", "token_generation_batches",
        "token_generation_buckets", "token_tree_config", "torch_dtype", "tp_degree", "vocab_parallel",
        "weight_gather_seq_len_threshold", "weights_to_skip_layout_optimization", "windowed_context_encoding_size",
        "world_size",
    }
)  # fmt: skip
# OnDeviceSamplingConfig.__init__'s keyword names (models/config.py at 4bcdc54).
ON_DEVICE_SAMPLING_FIELDS = frozenset(
    {
        "do_sample", "top_k", "top_p", "temperature", "dynamic", "deterministic", "global_topk",
        "on_device_sampling_config", "top_k_kernel_enabled", "sampling_dp_degree",
    }
)  # fmt: skip
# MODEL_TYPES' keys with a "causal-lm" class (utils/constants.py at 4bcdc54).
NXDI_MODEL_TYPES = frozenset(
    {
        "gpt_oss", "llama", "llama4", "mllama", "mistral", "mixtral", "pixtral", "dbrx", "qwen2", "qwen2_vl", "qwen3",
        "qwen3_moe", "gemma3", "qwen3_vl",
    }
)  # fmt: skip
# What vLLM Neuron 0.2.0's _get_default_neuron_config sets for max_num_seqs=8, max_model_len=512, no chunked
# prefill, no prefix caching, TP 2, bfloat16 (its pa_* and lora_config entries concern the block KV layout / LoRA).
VLLM_NEURON_DEFAULTS = {
    "tp_degree": 2,
    "ctx_batch_size": 1,
    "batch_size": 8,
    "max_context_length": 512,
    "seq_len": 512,
    "enable_bucketing": True,
    "is_continuous_batching": True,
    "quantized": False,
    "torch_dtype": "bfloat16",
    "padding_side": "right",
    "is_block_kv_layout": False,
    "is_prefix_caching": False,
}
VLLM_NEURON_ON_DEVICE_SAMPLING = {"dynamic": True, "deterministic": False}


def shapes(**over: object) -> cn.Shapes:
    cfg = cn.NeuronCompileConfig(**over)  # type: ignore[arg-type]
    target = {"max_model_len": 512, "tensor_parallel_degree": 2, "dtype": "bfloat16"}
    return cn.resolve(cfg, target, {"model_type": "llama"})


# -- the build: config -> NxD Inference ---------------------------------------------------------------------------


def test_neuron_config_kwargs_are_nxdi_names_with_vllm_neurons_values() -> None:
    kwargs = cn.neuron_config_kwargs(shapes())
    assert set(kwargs) <= NEURON_CONFIG_FIELDS  # every key kiln passes is one NeuronConfig reads
    assert {k: kwargs[k] for k in VLLM_NEURON_DEFAULTS} == VLLM_NEURON_DEFAULTS
    sampling = kwargs["on_device_sampling_config"]
    assert set(sampling) <= ON_DEVICE_SAMPLING_FIELDS
    assert {k: sampling[k] for k in VLLM_NEURON_ON_DEVICE_SAMPLING} == VLLM_NEURON_ON_DEVICE_SAMPLING
    assert sampling["global_topk"] == 256
    assert kwargs["target"] == "trn2"  # neuronx-cc --target (model_wrapper.py)
    assert kwargs["logical_nc_config"] == 2  # Trainium2's default LNC
    assert kwargs["save_sharded_checkpoint"] is True
    assert "context_encoding_buckets" not in kwargs  # no buckets given: NxD Inference's automatic ones


def test_buckets_map_onto_the_context_and_token_generation_buckets() -> None:
    kwargs = cn.neuron_config_kwargs(shapes(buckets=[128, 256, 512], max_context_length=256))
    assert kwargs["context_encoding_buckets"] == [128, 256]  # NxD Inference: the last <= max_context_length
    assert kwargs["token_generation_buckets"] == [128, 256, 512]  # the last <= max_length (seq_len)
    assert kwargs["max_context_length"] == 256


def test_host_sampling_and_other_families_map_too() -> None:
    kwargs = cn.neuron_config_kwargs(shapes(on_device_sampling=False, instance_family="trn1n"))
    assert "on_device_sampling_config" not in kwargs
    assert (kwargs["target"], kwargs["logical_nc_config"]) == ("trn1", 1)  # trn1n instances have trn1's chips


def test_the_model_classes_kiln_compiles_are_nxdis() -> None:
    assert frozenset(cn.NXDI_CAUSAL_LM) == NXDI_MODEL_TYPES
    with pytest.raises(cn.StageError) as err:
        cn.resolve(cn.NeuronCompileConfig(), {"max_model_len": 64, "tensor_parallel_degree": 1, "dtype": "auto"}, {})
    assert "model_type" in err.value.message


def test_the_key_records_what_nxdi_does_not() -> None:
    versions = {"neuronx_cc": "2.24.5133.0", "nxdi": "0.9.17334", "torch_neuronx": "2.9.0.2.13.1"}
    key = cn.compile_key(shapes(buckets=[256, 512]), versions)
    assert key == {
        "device": "neuron",
        "neuron_sdk": "2.29.0",
        "neuronx_cc": "2.24.5133.0",
        "nxdi": "0.9.17334",
        "torch_neuronx": "2.9.0.2.13.1",
        "instance_family": "trn2",
        "logical_nc_config": "2",
        "tp_degree": "2",
        "batch_size": "8",
        "seq_len": "512",
        "max_context_length": "512",
        "buckets": "256,512",
        "dtype": "bfloat16",
        "on_device_sampling": "true",
        "sharded_checkpoint": "true",
    }
    assert all(isinstance(v, str) for v in key.values())  # target.compile is a str -> str map


def test_the_files_nxdi_compile_writes_are_the_ones_checked(tmp_path: Path) -> None:
    names = [p.relative_to(tmp_path).as_posix() for p in cn.expected_files(tmp_path, shapes())]
    assert names == [
        "model.pt",  # COMPILED_MODEL_FILE_NAME
        "neuron_config.json",  # CONFIG_FILE, written by config.save
        "weights/tp0_sharded_checkpoint.safetensors",  # shard_weights with save_sharded_checkpoint
        "weights/tp1_sharded_checkpoint.safetensors",
    ]
    assert (rc.COMPILED_CONFIG, rc.COMPILED_GRAPHS) == ("neuron_config.json", "model.pt")
    assert rc.CHIP_FAMILY == cn.CHIP_FAMILY  # the runtime's copy (it may not import compile/)
    assert rc.PACKAGES == cn.KEY_PACKAGES


def test_the_toolchain_pins_the_sdk_release_from_aws_index() -> None:
    from build import toolchains

    tc = toolchains.get("neuron")
    # "Trn1 packages" of Neuron 2.29.0's release content page (awsdocs-neuron v2.29.0, releasecontent.html)
    release = {
        "neuronx-cc": "2.24.5133.0",
        "neuronx-distributed": "0.18.27753",
        "neuronx-distributed-inference": "0.9.17334",
        "libneuronxla": "2.2.16408.0",
    }
    assert {k: tc.pins[k] for k in release} == release
    assert tc.extra_index_urls == ["https://pip.repos.neuron.amazonaws.com"]
    assert cn.NEURON_SDK == "2.29.0"
    assert "KILN_TOOLCHAIN_NEURON" in tc.fix()


def problems_of(hydra: None, *overrides: str) -> str:
    from hydra import compose

    with pytest.raises(ConfigError) as err:
        validate(compose(config_name="build", overrides=["compile=neuron", *overrides]))
    return str(err.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ([], "target.engine"),  # the default engine is vllm
        (["compile.instance_family=inf3"], "compile.instance_family"),
        (["compile.batch_size=0"], "compile.batch_size"),
        (["compile.buckets=[256,128]"], "compile.buckets"),
        (["compile.buckets=[128,256]", "target.max_model_len=512"], "compile.buckets"),
        (["compile.max_context_length=1024", "target.max_model_len=512"], "compile.max_context_length"),
        (["compile.instance_family=inf2", "target.tensor_parallel_degree=32"], "target.tensor_parallel_degree"),
        (["target.tensor_parallel_degree=128"], "target.tensor_parallel_degree"),  # trn2: 64 logical cores
        (["compile.instance_family=inf2", "compile.logical_nc_config=2"], "compile.logical_nc_config"),
        (["compile.global_topk=512"], "compile.global_topk"),
        (["serving.max_num_seqs=16"], "serving.max_num_seqs"),  # above the compiled batch of 8
        (["compile.timeout_s=0"], "compile.timeout_s"),
    ],
)
def test_config_problems_name_the_key(hydra: None, overrides: list[str], key: str) -> None:
    engine = [] if not overrides else ["target.engine=neuron"]
    assert f"  {key}: " in problems_of(hydra, *engine, *overrides)


def test_a_fitting_config_validates(hydra: None) -> None:
    from hydra import compose

    overrides = ["compile=neuron", "target.engine=neuron", "target.tensor_parallel_degree=64", "compile.buckets=[512]"]
    typed = validate(compose(config_name="build", overrides=[*overrides, "target.max_model_len=512"]))
    assert isinstance(typed.compile, cn.NeuronCompileConfig)
    assert typed.compile.buckets == [512]


def test_the_build_fails_fast_and_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_TOOLCHAIN_NEURON", raising=False)
    env = {
        "KILN_CACHE": str(tmp_path / "cache"),
        "KILN_STORE": str(tmp_path / "store"),
        "KILN_TOOLCHAINS_DIR": str(tmp_path / "toolchains"),
        "HTTPS_PROXY": "",
        "https_proxy": "",
        "PIP_PROXY": "",
    }
    proc = run_cli("build", "model=tiny", "target.engine=neuron", "compile=neuron", env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("kiln build failed: [toolchain]"), proc.stderr
    assert "https://pip.repos.neuron.amazonaws.com" in proc.stderr  # what is unreachable
    assert "neuronx-cc" in proc.stderr  # what it needed from there
    assert "KILN_TOOLCHAIN_NEURON" in proc.stderr  # the fix
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""  # no URI
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("manifests/*"))
    assert not (tmp_path / "cache" / "stages").exists() or not any((tmp_path / "cache" / "stages").iterdir())
    assert not (tmp_path / "toolchains").exists() or not any((tmp_path / "toolchains").glob("neuron-*"))


def test_a_toolchain_without_nxdi_fails_the_stage_naming_the_packages(tmp_path: Path) -> None:
    env = {
        "KILN_CACHE": str(tmp_path / "cache"),
        "KILN_STORE": str(tmp_path / "store"),
        "KILN_TOOLCHAIN_NEURON": sys.executable,  # a python without NxD Inference
    }
    proc = run_cli("build", "model=tiny", "target.engine=neuron", "compile=neuron", env=env, timeout=300)
    assert proc.returncode == 1
    assert "[compile]" in proc.stderr
    assert "neuronx-cc, neuronx-distributed-inference, torch-neuronx" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("manifests/*"))


# -- the runtime: the compiled graphs and the host ----------------------------------------------------------------

KEY = {
    "device": "neuron",
    "neuron_sdk": "2.29.0",
    "neuronx_cc": "2.24.5133.0",
    "nxdi": "0.9.17334",
    "torch_neuronx": "2.9.0.2.13.1",
    "instance_family": "trn2",
    "logical_nc_config": "2",
    "tp_degree": "8",
    "batch_size": "8",
    "seq_len": "512",
    "dtype": "bfloat16",
}
INSTALLED = {"neuronx_cc": "2.24.5133.0", "nxdi": "0.9.17334", "torch_neuronx": "2.9.0.2.13.1"}


def neuron_host(instance_type: str | None, cores: int) -> Host:
    return Host(
        devices=("neuron", "cpu"),
        gpu_count=0,
        numa_nodes=1,
        neuron_devices=max(1, cores // 8),
        neuron_cores=cores,
        instance_type=instance_type,
    )


@pytest.mark.parametrize(
    ("key", "host", "installed", "field", "says"),
    [
        ({}, neuron_host("trn2.48xlarge", 128), INSTALLED, None, ""),
        ({}, neuron_host("ml.trn2.48xlarge", 128), INSTALLED, None, ""),  # SageMaker's spelling
        ({}, neuron_host("inf2.48xlarge", 24), INSTALLED, "instance_family", "compile.instance_family=inf2"),
        ({}, neuron_host("trn1.32xlarge", 32), INSTALLED, "instance_family", "serve on a trn2 instance"),
        ({"instance_family": "trn1", "logical_nc_config": "1"}, neuron_host("trn1n.32xlarge", 32), INSTALLED, None, ""),
        ({}, neuron_host("trn2.48xlarge", 128), INSTALLED | {"neuronx_cc": "2.26.6360.0"}, "neuronx_cc", "SDK 2.29.0"),
        ({}, neuron_host("trn2.48xlarge", 128), INSTALLED | {"nxdi": None}, "nxdi", "no neuronx-distributed-inference"),
        ({}, neuron_host("trn2.3xlarge", 8), INSTALLED, "tp_degree", "at least 16 NeuronCores"),  # 8 x LNC 2
        ({"instance_family": "inf2", "logical_nc_config": "1", "tp_degree": "4"}, neuron_host("inf2.xlarge", 2),
         INSTALLED, "tp_degree", "tensor_parallel_degree<=2"),
        ({}, neuron_host(None, 128), INSTALLED, None, ""),  # no instance type known: the family is not compared
        ({"device": "cuda"}, neuron_host("trn2.48xlarge", 128), INSTALLED, "device", "not Neuron graphs"),
    ],
)  # fmt: skip
def test_the_key_against_simulated_hosts(
    key: dict[str, str], host: Host, installed: dict[str, str | None], field: str | None, says: str
) -> None:
    bad = rc.mismatch(KEY | key, host, installed, "auto")
    if field is None:
        assert bad is None
    else:
        assert bad is not None
        assert bad[0] == field
        assert says in bad[1]


def test_a_dtype_other_than_the_compiled_one_is_refused() -> None:
    bad = rc.mismatch(KEY, neuron_host("trn2.48xlarge", 128), INSTALLED, "float16")
    assert bad is not None
    assert bad[0] == "dtype"


def compiled_dir(tmp_path: Path, batch: int = 8, seq_len: int = 512, tp: int = 8, sampling: bool = True) -> Path:
    """A directory as NxD Inference's compile leaves it (neuron_config.json as InferenceConfig.to_json_string)."""
    d = tmp_path / "art"
    d.mkdir(exist_ok=True)
    ods = {"dynamic": True, "deterministic": False, "global_topk": 256, "do_sample": False} if sampling else None
    neuron_config = {
        "batch_size": batch,
        "seq_len": seq_len,
        "max_context_length": seq_len,
        "tp_degree": tp,
        "torch_dtype": "bfloat16",
        "on_device_sampling_config": ods,
    }
    (d / "neuron_config.json").write_text(json.dumps({"neuron_config": neuron_config, "hidden_size": 64}))
    (d / "model.pt").write_bytes(b"PK")  # NxD Inference's TorchScript bundle (only its presence is read)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    return d


def test_prepare_refuses_another_family_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.host
    from artifacts.manifest import Manifest, Target
    from artifacts.ops import scan_dir

    d = compiled_dir(tmp_path)
    target = Target("neuron", "", ("neuron",), "bfloat16", 8, 512, compile=KEY)
    manifest = Manifest.create("art", scan_dir(d), target, {}, {})
    monkeypatch.setattr(runtime.host, "detect", lambda: neuron_host("inf2.48xlarge", 24))
    monkeypatch.setattr(rc, "installed", lambda: INSTALLED)
    settings = EngineSettings(model_dir=d, device="neuron", dtype="bfloat16", tensor_parallel_degree=8)
    assert SPEC.compile is not None
    with pytest.raises(TargetMismatchError) as err:
        SPEC.compile.prepare(d, manifest, settings, ignore=True)  # the graphs cannot be ignored: no fallback
    assert err.value.field == "compile.instance_family"
    assert str(err.value).startswith("target.compile.instance_family: the graphs were compiled for trn2")
    monkeypatch.setattr(runtime.host, "detect", lambda: neuron_host("trn2.48xlarge", 128))
    assert SPEC.compile.prepare(d, manifest, settings, ignore=False) == settings


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"max_num_seqs": 16}, "max_num_seqs=16 exceeds the compiled batch size (8)"),
        ({"max_model_len": 1024}, "max_model_len=1024 exceeds the compiled sequence length (512)"),
        ({"tensor_parallel_degree": 4}, "the graphs are sharded over 8 NeuronCores"),
        ({"enable_prefix_caching": True}, "enable_prefix_caching=true"),
        ({"enable_chunked_prefill": True}, "enable_chunked_prefill=true"),
        ({"extra": {"additional_config": {"override_neuron_config": {}}}}, "additional_config is not supported"),
        ({"extra": {"tensor_parallel_size": 2}}, "tensor_parallel_size is kiln's own setting"),
        ({"extra": {"speculative_config": {"method": "ngram"}}}, "speculative_config is not supported"),
    ],
)
def test_check_refuses_what_the_compiled_graphs_fixed(tmp_path: Path, change: dict[str, object], says: str) -> None:
    base = {"model_dir": compiled_dir(tmp_path), "device": "neuron", "tensor_parallel_degree": 8}
    s = EngineSettings(**(base | change))  # type: ignore[arg-type]
    found = SPEC.check(s)
    assert len(found) == 1
    assert says in found[0]
    assert SPEC.check(EngineSettings(**base)) == []  # type: ignore[arg-type]


def test_an_artifact_without_graphs_is_refused_by_the_check(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    found = SPEC.check(EngineSettings(model_dir=tmp_path, device="neuron"))
    assert len(found) == 1
    assert "compile=neuron" in found[0]


def test_vllm_arguments_and_defaults_come_from_the_compiled_graphs(tmp_path: Path) -> None:
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    s = EngineSettings(model_dir=compiled_dir(tmp_path), device="neuron", tensor_parallel_degree=8)
    chosen = SPEC.defaults(s)
    assert (chosen["max_num_seqs"].value, chosen["max_model_len"].value) == (8, 512)
    args = engine_args(s)
    assert {k: args[k] for k in ("tensor_parallel_size", "max_num_seqs", "max_model_len", "dtype")} == {
        "tensor_parallel_size": 8,
        "max_num_seqs": 8,
        "max_model_len": 512,
        "dtype": "bfloat16",
    }
    assert (args["enable_prefix_caching"], args["enable_chunked_prefill"]) == (False, False)
    # AsyncEngineArgs of the vLLM installed here (0.32.0); vLLM Neuron 0.2.0 runs 0.11.0, whose fields were not read
    assert set(args) <= {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    shown = SPEC.native_args(s)
    assert shown["environment"]["NEURON_COMPILED_ARTIFACTS"] == str(s.model_dir)  # the loader's variable


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        (SamplingSpec(max_tokens=4, temperature=0.7, top_k=50, top_p=0.9), None),
        (SamplingSpec(max_tokens=4, logprobs=1), "logprobs"),
        (SamplingSpec(max_tokens=4, prompt_logprobs=0), "prompt_logprobs"),
        (SamplingSpec(max_tokens=4, presence_penalty=0.5), "presence_penalty"),
        (SamplingSpec(max_tokens=4, seed=1), "seed"),
        (SamplingSpec(max_tokens=4, min_p=0.1), "min_p"),
        (SamplingSpec(max_tokens=4, structured={"regex": "a+"}), "response_format"),
        (SamplingSpec(max_tokens=4, top_k=300), "top_k"),  # above the compiled global_topk (256)
    ],
)
def test_on_device_sampling_refuses_what_it_cannot_sample(tmp_path: Path, spec: SamplingSpec, param: str) -> None:
    on_device = rc.Compiled.read(compiled_dir(tmp_path))
    bad = refused_sampling(spec, on_device)
    assert (bad[0] if bad else None) == param
    host = rc.Compiled.read(compiled_dir(tmp_path, sampling=False))
    assert refused_sampling(spec, host) is None  # host sampling: vLLM's own sampler


def test_the_engine_refuses_a_request_naming_the_parameter(tmp_path: Path) -> None:
    engine = NeuronEngine(EngineSettings(model_dir=compiled_dir(tmp_path), device="neuron"))
    with pytest.raises(EngineRequestError) as err:
        engine.validate(SamplingSpec(max_tokens=4, logprobs=2))
    assert err.value.param == "logprobs"


def test_lmi_tnx_names_the_neuron_engine() -> None:
    from runtime.config.aliases import rolling_batch

    assert rolling_batch("tnx") == "neuron"
    assert rolling_batch("vllm") == "vllm"  # LMI's Neuron image meant vLLM Neuron by it; kiln's vllm engine owns it


def test_runtime_config_shows_the_mapping(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``runtime config`` for a compiled directory on a simulated trn2 host with vLLM Neuron installed (a stand-in
    distribution record: the package itself cannot be installed here)."""
    import shutil

    from runtime.__main__ import print_config
    from runtime.app import configure
    from runtime.config import ConfigError

    d = tmp_path / "tiny-neuron"
    shutil.copytree(tiny_dir, d)
    compiled_dir(tmp_path, tp=2)
    for name in ("neuron_config.json", "model.pt"):
        shutil.copy(tmp_path / "art" / name, d / name)
    site = tmp_path / "site"
    (site / "vllm_neuron-0.2.0.dist-info").mkdir(parents=True)
    (site / "vllm_neuron-0.2.0.dist-info" / "METADATA").write_text("Name: vllm-neuron\nVersion: 0.2.0\n")
    monkeypatch.syspath_prepend(str(site))
    host = neuron_host("trn2.48xlarge", 128)
    startup = configure({"model": str(d)}, ["rolling_batch=tnx", "tensor_parallel_degree=2"], {}, host=host)
    assert startup.plan.spec.name == "neuron"
    print_config(startup, as_json_output=True)
    doc = json.loads(capsys.readouterr().out)
    assert doc["engine"] == "neuron"
    assert doc["device"] == "neuron"
    assert doc["engine_args"]["vllm"]["max_num_seqs"] == 8  # the compiled batch size, the engine's default
    assert doc["engine_args"]["vllm"]["tensor_parallel_size"] == 2
    assert doc["engine_args"]["compiled"]["seq_len"] == 512
    with pytest.raises(ConfigError, match="max_num_seqs=64 exceeds the compiled batch size"):
        configure(
            {"model": str(d)}, ["rolling_batch=tnx", "tensor_parallel_degree=2", "max_num_seqs=64"], {}, host=host
        )


# -- on a Neuron host ---------------------------------------------------------------------------------------------


@pytest.mark.neuron
@pytest.mark.timeout(7200)  # NxD Inference's compile and the first load take minutes even for the tiny model
@pytest.mark.skipif(not glob.glob("/dev/neuron[0-9]*"), reason="needs AWS Neuron devices (/dev/neuron*)")
def test_build_serve_and_ask_on_a_neuron_host(tmp_path: Path) -> None:
    """The tiny model compiled for this host's family (KILN_INSTANCE_TYPE or EC2's DMI name), served, asked.

    On a Neuron host (a Neuron DLAMI of SDK 2.29), with kiln's environment holding vLLM 0.11.0 and vLLM Neuron 0.2.0
    for serving and the DLAMI's NxD Inference environment as the build's toolchain::

        KILN_TOOLCHAIN_NEURON=/path/to/nxd-inference/venv/bin/python pytest -m neuron tests/test_neuron.py
    """
    from openai import OpenAI

    from runtime.host import detect
    from tests.conftest import start_server, stop_cleanly

    family = detect().instance_family
    assert family in cn.CHIP_FAMILY, f"set KILN_INSTANCE_TYPE (this host's instance type is {family!r})"
    overrides = [
        "model=tiny",
        "model.name=tiny-neuron",
        "target.engine=neuron",
        "compile=neuron",
        f"compile.instance_family={family}",
        "compile.batch_size=2",
        "target.max_model_len=256",
    ]
    proc = run_cli("build", *overrides, timeout=3600)
    assert proc.returncode == 0, proc.stderr
    uri = proc.stdout.strip().splitlines()[-1]
    shown = run_cli("artifacts", "show", uri)
    key = json.loads(shown.stdout)["target"]["compile"]
    assert (key["instance_family"], key["batch_size"], key["seq_len"]) == (cn.CHIP_FAMILY[family], "2", "256")
    server = start_server(uri, tmp_path, timeout=1800)
    try:
        client = OpenAI(base_url=server.base + "/v1", api_key="none")
        out = client.chat.completions.create(
            model="tiny-neuron", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
        )
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage is not None
        assert out.usage.completion_tokens > 0
        stream = client.completions.create(model="tiny-neuron", prompt="The grass is", max_tokens=8, stream=True)
        assert sum(1 for _ in stream) >= 1
    finally:
        stop_cleanly(server)

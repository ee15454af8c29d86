"""Pre-quantized formats without a checkpoint: which format a quantization_config is, its target.quantization name,
the engines that load it, and the refusals. The configs are the ones the quantizers write (abridged from real
outputs: llm-compressor 0.14, GPTQModel 7.6, AutoAWQ 0.2.9, ModelOpt 0.47; ../shared/reference/quantization.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from artifacts.prequantized import FormatError, check_tensors, excluded, identify
from artifacts.targets import QUANTIZATIONS

pytestmark = pytest.mark.unit

CT_W4A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
            "input_activations": None,
        }
    },
}
CT_W8A8 = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
        }
    },
}
CT_FP8_STATIC = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
        }
    },
}
GPTQ = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 128,
    "desc_act": False,
    "sym": True,
    "checkpoint_format": "gptq",
}
AWQ = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}
AUTOAWQ = {"quant_method": "awq", "version": "gemm", "w_bit": 4, "q_group_size": 128, "zero_point": True}
MODELOPT = {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": {"quant_algo": "W4A16_AWQ"}}


@pytest.mark.parametrize(
    ("qc", "hf", "recipe", "fmt", "name", "engines"),
    [
        (CT_W4A16, None, "GPTQModifier:\n", "compressed-tensors", "gptq-w4a16", ("vllm",)),
        (CT_W4A16, None, "AWQModifier:\n  duo_scaling: both\n", "compressed-tensors", "awq-w4a16", ("vllm",)),
        (CT_W8A8, None, "", "compressed-tensors", "smoothquant-w8a8", ("vllm",)),
        (CT_FP8_STATIC, None, "", "compressed-tensors", "fp8-static", ("vllm", "tensorrt_llm")),
        (GPTQ, None, "", "gptq", "gptq-w4a16", ("vllm",)),
        ({**GPTQ, "bits": 8}, None, "", "gptq", "gptq-w8a16", ("vllm",)),
        (AWQ, None, "", "awq", "awq-w4a16", ("vllm",)),
        (AUTOAWQ, None, "", "awq", "awq-w4a16", ("vllm",)),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, None, "", "fp8", "fp8-dynamic", ("vllm",)),
        ({"quant_method": "modelopt"}, MODELOPT, "", "modelopt", "awq-w4a16", ("tensorrt_llm",)),
        (None, {**MODELOPT, "quantization": {"quant_algo": "FP8"}}, "", "modelopt", "fp8-static", None),
    ],
)
def test_each_format_gets_its_target_quantization_name(
    qc: Any, hf: Any, recipe: str, fmt: str, name: str, engines: tuple[str, ...] | None
) -> None:
    config = {"architectures": ["LlamaForCausalLM"], **({"quantization_config": qc} if qc else {})}
    pq = identify(config, hf, recipe)
    assert pq is not None
    assert (pq.format, pq.quantization) == (fmt, name)
    assert name in QUANTIZATIONS
    if engines is not None:
        assert pq.engines == engines


def test_an_unquantized_checkpoint_is_none() -> None:
    assert identify({"architectures": ["LlamaForCausalLM"]}) is None


@pytest.mark.parametrize(
    ("qc", "says"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not one kiln knows"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ with bits=3"),
        ({**AWQ, "version": "gemv"}, "AWQ version 'gemv'"),
        ({"quant_method": "fp8", "weight_scale_semantics": "inverse"}, "GPTQModel's native FP8"),
        ({"quant_method": "modelopt"}, "no hf_quant_config.json"),
        ({**CT_W4A16, "format": "marlin-24"}, "compressed-tensors format 'marlin-24'"),
    ],
)
def test_unknown_formats_and_schemes_are_named(qc: dict[str, Any], says: str) -> None:
    with pytest.raises(FormatError) as err:
        identify({"quantization_config": qc})
    assert says in str(err.value)
    assert err.value.fix


def test_exclusions_match_names_patterns_and_globs() -> None:
    assert excluded("lm_head", ("lm_head",))
    assert excluded("model.layers.0.mlp.down_proj", ("re:.*down_proj",))
    assert excluded("model.layers.3.self_attn.q_proj", ("*self_attn*",))
    assert not excluded("model.layers.0.mlp.up_proj", ("lm_head", "re:.*down_proj"))


def test_every_problem_is_listed_at_once() -> None:
    """Two broken layers and a stray tensor: all three named in one answer."""
    pq = identify({"quantization_config": GPTQ})
    assert pq is not None
    o, i = 256, 512
    good = {
        "qweight": ((i // 8, o), "I32"),
        "qzeros": ((i // 128, o // 8), "I32"),
        "scales": ((i // 128, o), "F16"),
        "g_idx": ((i,), "I32"),
    }
    tensors = {f"model.layers.{n}.mlp.down_proj.{k}": v for n in range(3) for k, v in good.items()}
    del tensors["model.layers.1.mlp.down_proj.qzeros"]
    tensors["model.layers.2.mlp.down_proj.scales"] = ((i // 64, o), "F16")
    tensors["model.layers.0.mlp.stray"] = ((1,), "F32")
    linears = {f"model.layers.{n}.mlp.down_proj": (o, i) for n in range(3)}
    dense = {f"model.layers.{n}.mlp.down_proj.weight": (o, i) for n in range(3)}
    problems = check_tensors(pq, tensors, linears, dense)
    text = "\n".join(problems)
    assert "model.layers.1.mlp.down_proj.qzeros: missing" in text
    assert "model.layers.2.mlp.down_proj.scales: shape [8, 256], bits=4, group_size=128 implies [4, 256]" in text
    assert "unexpected tensors (1): model.layers.0.mlp.stray" in text
    assert len(problems) == 3


# -- the runtime's check of a plain pre-quantized directory against a host --------------------------------

AVX2 = frozenset({"sse2", "avx2"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def plain(tmp_path: Path, qc: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "quantization_config": qc})
    )
    return tmp_path


@pytest.mark.parametrize(
    ("qc", "flags", "outcome"),
    [
        (GPTQ, AVX2, "gptq-w4a16 cannot run on this host's cpu"),  # vLLM's AVX2 kernels have no int4 GEMM
        (GPTQ, AVX512, "serves gptq-w4a16"),
        (CT_W8A8, AVX2, "serves smoothquant-w8a8"),
        (CT_FP8_STATIC, AVX2, "its quantization (fp8-static) runs on ['cuda']"),
        ({"quant_method": "bitsandbytes"}, AVX2, "'bitsandbytes' is not one kiln knows"),
    ],
)
def test_a_plain_pre_quantized_directory_is_checked_against_the_host(
    tmp_path: Path, qc: dict[str, Any], flags: frozenset[str], outcome: str
) -> None:
    from runtime.config.schema import ServeConfig
    from runtime.host import Host, TargetMismatchError
    from runtime.settings import derive

    host = Host(devices=("cpu",), gpu_count=0, numa_nodes=1, cpu_flags=flags)
    d = plain(tmp_path, qc)
    if outcome.startswith("serves "):
        plan = derive(d, None, ServeConfig(), host)
        assert plan.settings.device == "cpu"
        assert plan.quantization == outcome.removeprefix("serves ")
    else:
        with pytest.raises(TargetMismatchError) as err:
            derive(d, None, ServeConfig(), host)
        assert outcome in str(err.value)

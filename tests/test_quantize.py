"""`python -m build quantize=…` end to end on the trained tiny model, in the real toolchain environments:
every method's output loads, carries its quantization, and has a plausible fidelity report; the gate, bad
configs and bad data fail clearly; what vLLM on CPU can run is served, what it cannot is refused."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from runtime.exitcodes import EX_CONFIG
from runtime.host import detect
from tests.conftest import Server, build, run_cli, start_server, wait_ready

pytestmark = pytest.mark.integration

# One artifact per method and route (llm-compressor for vLLM, ModelOpt for TensorRT-LLM).
BUILDS: dict[str, tuple[str, ...]] = {
    "gptq": ("quantize=gptq",),
    "awq": ("quantize=awq", "quantize.num_samples=16"),  # AWQ's grid search is the slowest method on CPU
    "smoothquant": ("quantize=smoothquant",),
    "fp8": ("quantize=fp8",),
    "fp8-static": ("quantize=fp8", "quantize.activations=static"),
    "trt-awq": ("quantize=awq", "quantize.num_samples=16", "target.engine=tensorrt_llm"),
    "trt-smoothquant": ("quantize=smoothquant", "target.engine=tensorrt_llm"),
    "trt-fp8": ("quantize=fp8", "quantize.activations=static", "target.engine=tensorrt_llm"),
}
_built: dict[str, str] = {}
# Left out of CI's tier (`nox -s tests -- tests` runs them with the rest): AWQ's grid search, the slowest build on
# CPU (minutes with ModelOpt, about two with llm-compressor), and ModelOpt's SmoothQuant, whose route (ModelOpt's
# export, the TensorRT-LLM checkpoint's checks) CI covers with trt-fp8.
SLOW_BUILDS = {"awq", "trt-awq", "trt-smoothquant"}


def tier(*names: str) -> list[Any]:
    """``names`` as parameters, those in SLOW_BUILDS marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BUILDS else n for n in names]


def quantized(name: str) -> str:
    """The artifact URI for ``BUILDS[name]`` on the trained tiny model, built once per session."""
    if name not in _built:
        _built[name] = build("model=tiny_trained", *BUILDS[name])
    return _built[name]


def manifest(uri: str) -> dict[str, Any]:
    proc = run_cli("artifacts", "show", uri)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout)["manifest"])


def report(uri: str) -> dict[str, Any]:
    stage = manifest(uri)["provenance"]["stages"][-1]
    assert stage["stage"] == "quantize"
    return dict(stage["report"])


def pulled(uri: str, tmp: Path) -> Path:
    out = tmp / "art"
    proc = run_cli("artifacts", "pull", uri, str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def trained(tiny_trained_uri: str) -> str:
    return tiny_trained_uri


# -- every method, llm-compressor → compressed-tensors for vLLM ------------------------------------------

CT_EXPECT = {
    # name: (target.quantization, config group weights, input activations)
    "gptq": ("gptq-w4a16", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, None),
    "awq": ("awq-w4a16", {"num_bits": 4, "type": "int", "symmetric": False, "group_size": 128}, None),
    "smoothquant": (
        "smoothquant-w8a8",
        {"num_bits": 8, "type": "int", "strategy": "channel"},
        {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
    ),
    "fp8": (
        "fp8-dynamic",
        {"num_bits": 8, "type": "float", "strategy": "channel"},
        {"type": "float", "strategy": "token", "dynamic": True},
    ),
    "fp8-static": (
        "fp8-static",
        {"num_bits": 8, "type": "float", "strategy": "tensor"},
        {"type": "float", "strategy": "tensor", "dynamic": False},
    ),
}


def cpu_kernel_runs(quantization: str) -> bool:
    """Whether vLLM's own CPU kernels take this scheme, asked of vLLM itself (not of kiln's table): the weight-only
    kernel's can_implement for W4A16/W8A16, the static FP8 activation quantizer for fp8-static."""
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    if quantization.endswith(("w4a16", "w8a16")):
        weight = scalar_types.uint4b8 if quantization.endswith("w4a16") else scalar_types.uint8b128
        c = MPLinearLayerConfig((256, 256), (256, 256), weight, torch.bfloat16, 128, False)
        return bool(CPUWNA16LinearKernel.can_implement(c)[0])
    if quantization == "fp8-static":
        try:
            torch.ops._C.static_scaled_fp8_quant(
                torch.empty(2, 4, dtype=torch.float8_e4m3fn), torch.ones(2, 4), torch.ones(1), None
            )
        except (RuntimeError, TypeError, AttributeError):
            return False
        return True
    return True  # W8A8 int8 and dynamic FP8: served end to end below (test_vllm_cpu_serves_the_quantized_artifact)


def test_registry_devices_agree_with_vllms_cpu_kernels() -> None:
    from quantize.config import Fp8Config, GptqConfig
    from quantize.registry import plan

    for cfg in (GptqConfig(bits=4), GptqConfig(bits=8), Fp8Config(activations="static"), Fp8Config()):
        p = plan(cfg, "vllm")
        assert p is not None
        assert ("cpu" in p.devices) == cpu_kernel_runs(p.quantization), p.quantization


@pytest.mark.parametrize("name", tier(*CT_EXPECT))
def test_compressed_tensors_output_loads_and_carries_its_quantization(trained: str, name: str, tmp_path: Path) -> None:
    uri = quantized(name)
    quantization, weights, inputs = CT_EXPECT[name]
    m = manifest(uri)
    assert m["target"]["quantization"] == quantization
    assert m["target"]["engine"] == "vllm"
    assert m["target"]["devices"] == ["cpu", "cuda"] if cpu_kernel_runs(quantization) else ["cuda"]
    art = pulled(uri, tmp_path)  # every file verified against the manifest
    qc = json.loads((art / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert weights.items() <= group["weights"].items()
    assert (inputs is None) == (group["input_activations"] is None)
    if inputs:
        assert inputs.items() <= group["input_activations"].items()
    # The source's tokenizer files travel verbatim.
    src = pulled(trained, tmp_path / "src")
    assert (art / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


CT_FAST = [n for n in CT_EXPECT if n not in SLOW_BUILDS]


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(CT_FAST, id="ci"),
        pytest.param(sorted(SLOW_BUILDS & set(CT_EXPECT)), id="slow", marks=pytest.mark.slow),
    ],
)
def test_compressed_tensors_outputs_load_in_transformers(trained: str, names: list[str], tmp_path: Path) -> None:
    """Each checkpoint loads with transformers' compressed-tensors reader (in the quantizer's own environment,
    one process for all) and computes next-token logits."""
    dirs = [str(pulled(quantized(name), tmp_path / name)) for name in names]
    check = (
        "import sys, torch; from transformers import AutoModelForCausalLM, CompressedTensorsConfig\n"
        "ct = CompressedTensorsConfig(dequantize=True)\n"
        "for d in sys.argv[1:]:\n"
        "    m = AutoModelForCausalLM.from_pretrained(d, quantization_config=ct)\n"
        "    print(tuple(m(input_ids=torch.tensor([[1, 2, 3]])).logits.shape))"
    )
    proc = subprocess.run(
        [toolchain_python("quantize-llmcompressor"), "-c", check, *dirs], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[: len(dirs)] == ["(1, 3, 1024)"] * len(dirs)


def toolchain_python(name: str) -> str:
    from build.toolchains import get, resolve

    return resolve(get(name)).python


@pytest.mark.parametrize("name", tier(*CT_EXPECT, "trt-awq", "trt-smoothquant", "trt-fp8"))
def test_fidelity_report_is_present_and_plausible(trained: str, name: str) -> None:
    fid = report(quantized(name))["fidelity"]
    assert fid["windows"] == 16
    assert fid["positions"] == 16 * 127
    assert 0 < fid["kl_mean"] < 0.05  # quantized ≠ source, yet close
    assert fid["kl_max"] >= fid["kl_mean"]
    assert 0.9 < fid["top1_agreement"] <= 1.0
    assert 1 < fid["ppl_source"] < 10  # the trained tiny model is sure of its corpus
    assert fid["ppl_quantized"] == pytest.approx(fid["ppl_source"], rel=0.2)


@pytest.mark.parametrize("four", tier("gptq", "awq"))
def test_eight_bit_schemes_are_closer_to_the_source_than_four_bit(trained: str, four: str) -> None:
    fid = {name: report(quantized(name))["fidelity"] for name in (four, "smoothquant", "fp8")}
    four_bit = fid[four]["kl_mean"]
    # int8 weights and activations, end to end
    assert fid["smoothquant"]["kl_mean"] < four_bit, fid
    # FP8's weights alone; with its per-token activation rounding included it lands near GPTQ on this model
    assert fid["fp8"]["kl_mean_weights_only"] < four_bit, fid
    assert fid["smoothquant"]["kl_mean_weights_only"] < four_bit, fid
    for name in ("smoothquant", "fp8"):  # activation rounding only adds error
        assert fid[name]["kl_mean_weights_only"] < fid[name]["kl_mean"], fid
    assert fid[four]["kl_mean_weights_only"] == fid[four]["kl_mean"]  # a weight-only scheme: one figure


def test_same_config_same_artifact(trained: str, kiln_env: Path) -> None:
    """The stage is a pure function of its inputs (seeded calibration included): re-running it from scratch
    writes identical files and the identical manifest. Only the quantize stage's cache is set aside (force=true
    would also re-train the tiny model, minutes of CI time that test nothing here)."""
    first = quantized("fp8-static")
    stages = kiln_env / "stages"
    shutil.move(stages / "quantize", stages / "quantize.saved")
    try:
        proc = run_cli("build", "model=tiny_trained", *BUILDS["fp8-static"], env={"KILN_LOG_LEVEL": "INFO"})
        assert proc.returncode == 0, proc.stderr
        assert "quantize: running in toolchain" in proc.stderr  # the stage really ran again
        assert "synth: cache hit" in proc.stderr  # no re-training
        assert "convert: cache hit" in proc.stderr
        assert proc.stdout.strip().splitlines()[-1].rsplit("@", 1)[1] == first.rsplit("@", 1)[1]
    finally:
        shutil.rmtree(stages / "quantize", ignore_errors=True)
        shutil.move(stages / "quantize.saved", stages / "quantize")


# -- ModelOpt → TensorRT-LLM -----------------------------------------------------------------------------

TRT_EXPECT = {"trt-awq": "W4A16_AWQ", "trt-smoothquant": "W8A8_SQ_PER_CHANNEL", "trt-fp8": "FP8"}


@pytest.mark.parametrize("name", tier("trt-awq", "trt-smoothquant", "trt-fp8"))
def test_modelopt_output_for_tensorrt_llm(trained: str, name: str, tmp_path: Path) -> None:
    uri = quantized(name)
    m = manifest(uri)
    assert (m["target"]["engine"], m["target"]["devices"]) == ("tensorrt_llm", ["cuda"])
    art = pulled(uri, tmp_path)
    hf = json.loads((art / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == TRT_EXPECT[name]
    assert "lm_head" in hf["quantization"]["exclude_modules"]
    assert report(uri)["format"] == "modelopt"


def test_tensorrt_llm_artifact_is_refused_here_by_name(trained: str) -> None:
    proc = run_cli("runtime", "serve", quantized("trt-fp8"), "--port", "1", timeout=120)
    assert proc.returncode == EX_CONFIG  # no restart can make it fit
    assert "target.engine" in proc.stderr
    assert "tensorrt_llm" in proc.stderr


# -- the gate, bad configs and bad data -------------------------------------------------------------------


def test_gate_fails_with_the_figures_and_publishes_nothing(trained: str, kiln_env: Path) -> None:
    good = quantized("gptq")
    before = sorted((kiln_env / "store" / "names" / "tiny-llama-trained" / "manifests").iterdir())
    proc = run_cli("build", "model=tiny_trained", *BUILDS["gptq"], "quantize.max_kl=1e-9", "quantize.min_top1=0.9999")
    assert proc.returncode == 1
    err = proc.stderr
    assert "fidelity gate failed, nothing was published" in err
    assert "> quantize.max_kl=1e-09" in err
    assert "< quantize.min_top1=0.9999" in err
    assert proc.stdout == ""  # no URI: nothing was published
    assert "built tiny-llama-trained" not in err
    assert sorted((kiln_env / "store" / "names" / "tiny-llama-trained" / "manifests").iterdir()) == before
    # a gate the report meets publishes the same (cached) quantized output
    fid = report(good)["fidelity"]
    ok = build("model=tiny_trained", *BUILDS["gptq"], f"quantize.max_kl={fid['kl_mean'] * 2}")
    assert manifest(ok)["files"] == manifest(good)["files"]


def test_group_size_not_dividing_the_hidden_size_lists_the_layers(trained: str, kiln_env: Path) -> None:
    proc = run_cli("build", "model=tiny_trained", "quantize=gptq", "quantize.group_size=96")
    assert proc.returncode == 1
    err = proc.stderr
    assert "[quantize] quantize.group_size: preflight: 28 layer(s) do not fit the scheme" in err
    assert "model.layers.0.mlp.down_proj: in_features=512 is not divisible by quantize.group_size=96" in err
    assert "… and 8 more" in err  # 20 named, the rest counted: the message stays readable on a large model
    assert "fix: set quantize.group_size=128" in err
    assert "Traceback" not in err
    staging = list((kiln_env / "stages" / "quantize").glob(".staging-*"))
    assert staging == []  # no half-done output


def test_unknown_method_and_empty_calibration_file(tmp_path: Path) -> None:
    proc = run_cli("build", "quantize=int3")
    assert proc.returncode == 1
    assert "Could not find 'quantize/int3'" in proc.stderr
    empty = tmp_path / "calib.jsonl"
    empty.write_text("")
    proc = run_cli("build", "quantize=gptq", f"quantize.calibration={empty}")
    assert proc.returncode == 1
    assert f"quantize.calibration: {empty} is empty" in proc.stderr


def test_calibration_file_too_short_for_the_windows(trained: str, tmp_path: Path) -> None:
    short = tmp_path / "calib.txt"
    short.write_text("The cat is small. The dog barks.\n" * 20)
    proc = run_cli("build", "model=tiny_trained", "quantize=fp8", f"quantize.calibration={short}")
    assert proc.returncode == 1
    assert "[quantize] quantize.calibration:" in proc.stderr
    assert "quantize.num_samples=32 + quantize.eval_samples=16" in proc.stderr


# -- serving: what vLLM on CPU runs is served, the rest refused by name ----------------------------------

AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= detect().cpu_flags
SERVED_HERE = ["smoothquant", "fp8"] + (["gptq", "awq"] if AVX512 else [])
REFUSED_HERE = ["fp8-static"] + ([] if AVX512 else ["gptq", "awq"])


@pytest.fixture(scope="module")
def served(trained: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Every quantized artifact vLLM runs here, served side by side: their start-ups overlap (minutes saved)."""
    servers = {
        n: start_server(quantized(n), tmp_path_factory.mktemp(n), "--enforce-eager", wait=False) for n in SERVED_HERE
    }
    try:
        for server in servers.values():
            wait_ready(server, 900)
        yield servers
    finally:
        codes = {n: server.stop() for n, server in servers.items()}
        assert codes == dict.fromkeys(servers, 0), {n: servers[n].logs()[-3000:] for n, c in codes.items() if c}


@pytest.mark.parametrize("name", SERVED_HERE)
def test_vllm_cpu_serves_the_quantized_artifact(served: dict[str, Server], name: str) -> None:
    from build.tiny.corpus import documents

    server = served[name]
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="tiny-llama-trained",
        messages=[{"role": "user", "content": "What color is the sky?"}],
        max_tokens=12,
        temperature=0,
    )
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    # The engine's own log-probabilities of unseen corpus text: a model computing with broken weights would
    # be near-uniform over the 1024-token vocabulary (perplexity ~1000); the report's figure is ~6.
    text = " ".join(documents(12, seed=0, split="heldout"))
    body = {"inputs": text, "parameters": {"max_new_tokens": 1, "details": True, "decoder_input_details": True}}
    resp = httpx.post(server.base + "/invocations", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    prefill = [t["log_prob"] for t in resp.json()["details"]["prefill"] if t and t["log_prob"] is not None]
    assert len(prefill) > 100
    ppl = math.exp(-sum(prefill) / len(prefill))
    assert ppl < 2 * report(quantized(name))["fidelity"]["ppl_source"], ppl


@pytest.mark.parametrize("name", tier(*REFUSED_HERE))
def test_runtime_refuses_what_vllm_cpu_cannot_run(trained: str, name: str) -> None:
    proc = run_cli("runtime", "serve", quantized(name), "--port", "1", timeout=120)
    assert proc.returncode == EX_CONFIG
    err = proc.stderr
    assert "this artifact cannot run here" in err
    assert CT_EXPECT[name][0] in err  # names the quantization method
    assert "['cuda']" in err  # and the devices that can run it
    assert "Traceback" not in err

"""Pre-quantized checkpoints as build sources, end to end: the quantizers' own outputs (llm-compressor's
compressed-tensors and ModelOpt's exports, made by kiln's quantize stage from the trained tiny model) are pulled
as plain Hugging Face directories and built again with ``quantize=none``. Each becomes an artifact naming its scheme
with its files copied byte for byte; what vLLM on CPU runs here is served, as an artifact and as a plain directory;
what it cannot run is refused at serve time naming the scheme and the devices; damaged copies are refused naming
the tensor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from runtime.exitcodes import EX_CONFIG
from tests.conftest import Server, build, run_cli, start_server
from tests.test_quantize import AVX512, manifest, pulled, quantized, tier

pytestmark = pytest.mark.integration

# fixture name (tests/test_quantize.py BUILDS) -> the target engine its format is built for
SOURCES = {
    "gptq": "vllm",
    "awq": "vllm",
    "smoothquant": "vllm",
    "fp8": "vllm",
    "fp8-static": "vllm",
    "trt-smoothquant": "tensorrt_llm",
    "trt-fp8": "tensorrt_llm",
}
_dirs: dict[str, Path] = {}
_built: dict[str, str] = {}


def source(name: str, tmp: Path) -> Path:
    """The quantizer's output for ``name`` as a plain checkpoint directory (the artifact without its manifest)."""
    if name not in _dirs:
        d = pulled(quantized(name), tmp / f"src-{name}")
        (d / "manifest.json").unlink()
        _dirs[name] = d
    return _dirs[name]


def prebuilt(name: str, tmp: Path) -> str:
    if name not in _built:
        src = source(name, tmp)
        _built[name] = build(
            "model=hf",
            f"model.source={src}",
            f"model.name=pre-{name}",
            "quantize=none",
            f"target.engine={SOURCES[name]}",
        )
    return _built[name]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prequantized")


def copy_of(src: Path, tmp: Path, name: str) -> Path:
    out = tmp / name
    shutil.copytree(src, out)
    return out


# CI converts one source of each format (compressed-tensors: gptq; ModelOpt: trt-fp8); the other schemes take the
# same code path with another quantizer's output and run with `nox -s tests -- tests`.
CI_SOURCES = {"gptq", "trt-fp8"}


@pytest.mark.parametrize("name", [n if n in CI_SOURCES else pytest.param(n, marks=pytest.mark.slow) for n in SOURCES])
def test_a_pre_quantized_source_becomes_an_artifact_naming_its_scheme(name: str, tmp: Path) -> None:
    original = manifest(quantized(name))
    m = manifest(prebuilt(name, tmp))
    # The same scheme and devices the quantize stage recorded for the checkpoint it wrote.
    assert m["target"]["quantization"] == original["target"]["quantization"]
    assert m["target"]["devices"] == original["target"]["devices"]
    assert m["target"]["engine"] == SOURCES[name]
    # Copied, not recast: every weight file is byte-identical to the quantizer's.
    weights = {f["path"]: f["sha256"] for f in original["files"] if f["path"].endswith(".safetensors")}
    assert weights
    assert {f["path"]: f["sha256"] for f in m["files"] if f["path"].endswith(".safetensors")} == weights
    convert = next(s for s in m["provenance"]["stages"] if s["stage"] == "convert")
    fmt = "modelopt" if name.startswith("trt-") else "compressed-tensors"
    assert convert["report"]["prequantized"]["format"] == fmt


# -- served here: W8A8 int8 as an artifact, FP8-dynamic as a plain directory ---------------------------------
# CI serves the plain directory: the artifact of a pre-quantized source holds the quantize stage's files byte for
# byte with the same target block (test above), which test_quantize.py serves already; `nox -s tests -- tests`
# serves both.
SERVED = {"smoothquant": "artifact", "fp8": "plain directory"}


@pytest.fixture(scope="module", params=[pytest.param("smoothquant", marks=pytest.mark.slow), "fp8"])
def served(tmp: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Server]]:
    name = request.param
    (tmp / name).mkdir(exist_ok=True)
    model = prebuilt(name, tmp) if SERVED[name] == "artifact" else str(source(name, tmp))
    server = start_server(model, tmp / name, "--enforce-eager", timeout=900)
    try:
        yield name, server
    finally:
        assert server.stop() == 0, server.logs()[-3000:]


def test_vllm_cpu_serves_the_pre_quantized_checkpoint(served: tuple[str, Server]) -> None:
    from build.tiny.corpus import documents

    name, server = served
    models = httpx.get(server.base + "/v1/models", timeout=30).json()["data"]
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model=models[0]["id"], messages=[{"role": "user", "content": "What color is the sky?"}], max_tokens=12
    )
    assert r.choices[0].message.content
    # Computing with the quantized weights, not noise: the engine's perplexity of held-out corpus text stays near
    # the quantize stage's own figure (broken weights give ~1000 over this 1024-token vocabulary).
    text = " ".join(documents(12, seed=0, split="heldout"))
    body = {"inputs": text, "parameters": {"max_new_tokens": 1, "details": True, "decoder_input_details": True}}
    resp = httpx.post(server.base + "/invocations", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    prefill = [t["log_prob"] for t in resp.json()["details"]["prefill"] if t and t["log_prob"] is not None]
    ppl = __import__("math").exp(-sum(prefill) / len(prefill))
    stage = manifest(quantized(name))["provenance"]["stages"][-1]
    assert ppl < 2 * stage["report"]["fidelity"]["ppl_source"], ppl


# -- refused here, at serve time, naming the scheme and the devices ----------------------------------------

REFUSED_HERE = ["fp8-static"] + ([] if AVX512 else ["gptq", "awq"])


@pytest.mark.parametrize("name", tier(*REFUSED_HERE))
@pytest.mark.parametrize("form", ["artifact", "plain directory"])
def test_what_vllm_cpu_cannot_run_is_refused_at_serve_time(name: str, form: str, tmp: Path) -> None:
    model = prebuilt(name, tmp) if form == "artifact" else str(source(name, tmp))
    proc = run_cli("runtime", "serve", model, "--port", "1", timeout=120)
    assert proc.returncode == EX_CONFIG, proc.stderr[-2000:]
    quantization = manifest(quantized(name))["target"]["quantization"]
    assert quantization in proc.stderr
    assert "cuda" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- refusals at build time --------------------------------------------------------------------------------


def build_fails(src: Path, *extra: str) -> str:
    proc = run_cli("build", "model=hf", f"model.source={src}", "model.name=broken", "quantize=none", *extra)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def rewrite(path: Path, edit: Any) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# The tensor each scheme's damaged copy loses: GPTQ (symmetric) has no zero points, AWQ's are asymmetric.
MISSING = {"gptq": "weight_scale", "awq": "weight_zero_point"}


@pytest.mark.parametrize("name", tier(*MISSING))
def test_damaged_checkpoints_are_refused_naming_every_tensor(name: str, tmp: Path) -> None:
    import torch

    d = copy_of(source(name, tmp), tmp, f"damaged-{name}")
    layer0, layer1 = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"

    def damage(t: dict[str, Any]) -> None:
        del t[f"{layer0}.{MISSING[name]}"]  # a missing tensor
        t[f"{layer1}.weight_scale"] = torch.ones(3, 3, dtype=torch.bfloat16)  # a scale of the wrong shape

    rewrite(d / "model.safetensors", damage)
    err = build_fails(d)
    assert f"{layer0}.{MISSING[name]}: missing" in err
    assert f"{layer1}.weight_scale: shape [3, 3]" in err
    assert "model.source" in err


def test_bits_that_disagree_with_the_packed_size_are_refused(tmp: Path) -> None:
    d = copy_of(source("gptq", tmp), tmp, "bits-gptq")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (d / "config.json").write_text(json.dumps(config))
    err = build_fails(d)
    assert "weight_packed: shape" in err  # the 4-bit packing is half as wide as 8 bits implies


def test_quantizing_a_quantized_source_again_is_refused_with_the_reason(tmp: Path) -> None:
    err = build_fails(source("fp8", tmp), "quantize=gptq")
    assert "already quantized" in err
    assert "quantize=none" in err


def test_an_engine_that_does_not_load_the_format_is_refused(tmp: Path) -> None:
    err = build_fails(source("gptq", tmp), "target.engine=tensorrt_llm")
    assert "target.engine" in err
    assert "target.engine=vllm" in err


def test_an_unknown_format_is_refused_naming_it(tmp: Path) -> None:
    d = copy_of(source("fp8", tmp), tmp, "bnb")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (d / "config.json").write_text(json.dumps(config))
    err = build_fails(d)
    assert "'bitsandbytes' is not one kiln knows" in err


# -- the classic GPTQ and AWQ (GEMM) formats, written by GPTQModel in its own environment --------------------
# Slow: the environment is a ~1.6 GB install (GPTQModel, torchao, datasets) and each quantization ~30 s on CPU.

GPTQMODEL = Path(__file__).parent / "fixtures" / "gptqmodel.txt"
_classic: dict[str, Path] = {}


def trained_dir(tmp: Path) -> Path:
    """The trained tiny model (built once per session, cached) as a plain directory."""
    out = tmp / "trained"
    if not out.exists():
        d = pulled(build("model=tiny_trained"), out)
        (d / "manifest.json").unlink()
    return out / "art"


def classic(method: str, tmp: Path) -> Path:
    """The trained tiny model quantized by GPTQModel to ``method`` ("gptq" | "awq"), as a plain directory."""
    if method not in _classic:
        import subprocess

        from transformers import AutoTokenizer

        from build.tiny.corpus import documents
        from build.toolchains import Toolchain, resolve

        src = trained_dir(tmp)
        tok = AutoTokenizer.from_pretrained(str(src))
        ids = tok(" ".join(documents(400, seed=1)))["input_ids"]
        rows = [ids[i * 128 : (i + 1) * 128] for i in range(32)]
        calib = tmp / "gptqmodel-calibration.json"
        calib.write_text(json.dumps(rows))
        python = resolve(Toolchain("fixtures-gptqmodel", GPTQMODEL)).python
        out = tmp / f"classic-{method}"
        script = str(Path(__file__).parent / "fixtures" / "gptqmodel_quantize.py")
        proc = subprocess.run(
            [python, script, method, str(src), str(out), str(calib)],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp,  # GPTQModel writes a logs/ folder into its working directory
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        _classic[method] = out
    return _classic[method]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "quantization"), [("gptq", "gptq-w4a16"), ("awq", "awq-w4a16")])
def test_classic_gptq_and_awq_checkpoints_build_and_are_checked_at_serve_time(
    method: str, quantization: str, tmp: Path
) -> None:
    src = classic(method, tmp)
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == method  # GPTQModel's classic format, not compressed-tensors
    uri = build("model=hf", f"model.source={src}", f"model.name=classic-{method}", "quantize=none")
    m = manifest(uri)
    assert m["target"]["quantization"] == quantization
    convert = next(s for s in m["provenance"]["stages"] if s["stage"] == "convert")
    assert convert["report"]["prequantized"]["format"] == method
    assert convert["report"]["prequantized"]["bits"] == 4
    if not AVX512:
        for model in (uri, str(src)):
            proc = run_cli("runtime", "serve", model, "--port", "1", timeout=120)
            assert proc.returncode == EX_CONFIG
            assert quantization in proc.stderr, proc.stderr[-2000:]
            assert "cuda" in proc.stderr


@pytest.mark.slow
def test_damaged_classic_gptq_is_refused_naming_every_tensor(tmp: Path) -> None:
    import torch

    d = copy_of(classic("gptq", tmp), tmp, "damaged-gptq")
    a, b = "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"
    shard = next(d.glob("*.safetensors"))

    def damage(t: dict[str, Any]) -> None:
        del t[f"{a}.qzeros"]
        t[f"{b}.scales"] = torch.ones(1, 7, dtype=torch.float16)

    rewrite(shard, damage)
    err = build_fails(d)
    assert f"{a}.qzeros: missing" in err
    assert f"{b}.scales: shape [1, 7]" in err
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["bits"] = 8  # the packed tensors hold 4-bit values
    (d / "config.json").write_text(json.dumps(config))
    err = build_fails(d)
    assert "qweight: shape" in err
    assert "bits=8" in err

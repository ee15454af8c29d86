"""Quantize pieces that need no toolchain environment: config validation, the (method, engine) table,
preflight, calibration windows, the fidelity arithmetic and gate, and the runtime's quantization checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose

from artifacts.manifest import Target
from build.config import validate
from build.errors import BuildError, ConfigError, as_build_error
from quantize import data, fidelity, preflight
from quantize.config import GptqConfig, stage_config
from quantize.errors import QuantizeError
from quantize.registry import QUANTIZERS, UnsupportedError, plan
from runtime.host import Host, TargetMismatchError, check_target

pytestmark = pytest.mark.unit


def problems_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(compose(config_name="build", overrides=list(overrides)))
    return str(err.value)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthesized Llama checkpoint (hidden 96: not divisible by the default group size 128)."""
    from build.tiny.model import SynthParams, synthesize

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    synthesize(
        SynthParams(
            seed=3,
            vocab_size=600,
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            corpus_sentences=300,
            train_steps=0,
            train_batch_size=1,
            train_seq_len=8,
            learning_rate=0.0,
            train_threads=1,
        ),
        out,
    )
    return out


def test_quantize_imports_only_artifacts_and_itself() -> None:
    """Stage code runs inside toolchain environments with only the repository on the path."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import sys, quantize.registry, quantize.config, quantize.stage, quantize.data, quantize.fidelity,"
        " quantize.preflight, quantize.progress, quantize.llmcompressor_backend, quantize.modelopt_backend;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('build', 'runtime', 'compile', 'hydra')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- config and the (method, engine) table --------------------------------------------------------------


def test_every_method_has_published_defaults(hydra: None) -> None:
    for method in ("gptq", "awq", "smoothquant", "fp8"):
        q = validate(compose(config_name="build", overrides=[f"quantize={method}"])).quantize
        assert q.method == method
        assert (q.calibration, q.num_samples, q.seq_len, q.ignore) == ("kiln:corpus", 32, 128, ["lm_head"])
    gptq = validate(compose(config_name="build", overrides=["quantize=gptq"])).quantize
    assert (gptq.bits, gptq.group_size, gptq.symmetric, gptq.dampening_frac) == (4, 128, True, 0.01)


def test_bad_values_are_all_named(hydra: None) -> None:
    text = problems_of(
        "quantize=gptq",
        "quantize.bits=3",
        "quantize.group_size=0",
        "quantize.num_samples=0",
        "quantize.min_top1=1.5",
        "quantize.actorder=sideways",
    )
    for key in (
        "quantize.bits",
        "quantize.group_size",
        "quantize.num_samples",
        "quantize.min_top1",
        "quantize.actorder",
    ):
        assert key in text


def test_unknown_method_is_named(hydra: None) -> None:
    assert "unknown method 'int3'" in problems_of("quantize.method=int3")


def test_pairs_the_engine_cannot_load_are_refused_with_what_works(hydra: None) -> None:
    text = problems_of("quantize=gptq", "target.engine=tensorrt_llm")
    assert "(gptq, tensorrt_llm) cannot be built" in text
    assert "target.engine=vllm" in text
    assert "quantize=awq|fp8|smoothquant with target.engine=tensorrt_llm" in text
    assert "target.engine" in problems_of("quantize=awq", "target.engine=neuron")
    assert "quantize.symmetric" in problems_of("quantize=awq", "target.engine=tensorrt_llm", "quantize.symmetric=false")


@pytest.mark.parametrize(
    ("method", "engine", "extra", "quantization"),
    [
        ("gptq", "vllm", {}, "gptq-w4a16"),
        ("gptq", "vllm", {"bits": 8}, "gptq-w8a16"),
        ("awq", "vllm", {}, "awq-w4a16"),
        ("awq", "tensorrt_llm", {}, "awq-w4a16"),
        ("smoothquant", "vllm", {}, "smoothquant-w8a8"),
        ("fp8", "vllm", {}, "fp8-dynamic"),
        ("fp8", "vllm", {"activations": "static"}, "fp8-static"),
        ("fp8", "tensorrt_llm", {"activations": "static"}, "fp8-static"),
    ],
)
def test_plan_names_scheme_and_backend(method: str, engine: str, extra: dict[str, object], quantization: str) -> None:
    """Names and routes. Which devices each plan runs on is held against vLLM's own CPU kernels in
    tests/test_quantize.py (test_registry_devices_agree_with_vllms_cpu_kernels); here: a narrowed plan says why."""
    cfg = QUANTIZERS[method].config_cls(**extra)  # type: ignore[arg-type]
    p = plan(cfg, engine)
    assert p is not None
    assert p.quantization == quantization
    assert p.backend.name == ("modelopt" if engine == "tensorrt_llm" else "llmcompressor")
    if engine == "tensorrt_llm":
        assert p.devices == ("cuda",)  # TensorRT-LLM has no other backend
    assert bool(p.devices_why) == (p.devices != ("cpu", "cuda"))


def test_none_plans_no_work() -> None:
    assert plan(QUANTIZERS["none"].config_cls(), "vllm") is None


def test_stage_params_leave_out_gate_and_source() -> None:
    plain = {"method": "gptq", "calibration": "/home/me/data.jsonl", "max_kl": 1e-3, "min_top1": 0.9, "bits": 4}
    assert stage_config(plain) == {"method": "gptq", "bits": 4}


def test_calibration_source_errors(hydra: None, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert f"{empty} is empty" in problems_of("quantize=gptq", f"quantize.calibration={empty}")
    assert "is not an existing file or directory" in problems_of("quantize=gptq", "quantize.calibration=./nope.txt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.bin").write_bytes(b"x")
    assert "holds no" in problems_of("quantize=gptq", f"quantize.calibration={tmp_path / 'd'}")
    assert "only built-in" in problems_of("quantize=gptq", "quantize.calibration=kiln:wiki")


def test_user_facing_stage_errors_become_build_errors() -> None:
    err = as_build_error(QuantizeError("bad", key="quantize.group_size", fix="do x"))
    assert isinstance(err, BuildError)
    assert (err.stage, err.key, err.fix) == ("quantize", "quantize.group_size", "do x")
    assert as_build_error(RuntimeError("crash")) is None


# -- preflight ------------------------------------------------------------------------------------------


def test_preflight_lists_every_offending_layer_with_the_fix(tiny_dir: Path) -> None:
    cfg = GptqConfig(group_size=128)
    p = plan(cfg, "vllm")
    assert p is not None
    with pytest.raises(QuantizeError) as err:
        preflight.check(tiny_dir, cfg, p)
    text = str(err.value)
    # every targeted layer reading the 96-wide hidden state (q, k, v, gate, up in both layers) is listed
    for n in (0, 1):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert f"model.layers.{n}.{proj}: in_features=96 is not divisible by quantize.group_size=128" in text
    assert "lm_head" not in text  # ignored by default
    assert err.value.key == "quantize.group_size"
    assert "quantize.group_size=32" in (err.value.fix or "")  # divides 96, 192 and o_proj's 96


def test_preflight_passes_and_narrows_devices(tiny_dir: Path) -> None:
    cfg = GptqConfig(group_size=32)
    p = plan(cfg, "vllm")
    assert p is not None
    report = preflight.check(tiny_dir, cfg, p)
    assert len(report.layers) == 2 * 7
    # k/v projections are 2 heads x 24 = 48 wide: vLLM's CPU int4 kernel needs multiples of 32
    assert report.devices == ("cuda",)
    assert "model.layers.0.self_attn.k_proj" in report.notes[0]
    with pytest.raises(QuantizeError, match="selects no layer"):
        preflight.check(tiny_dir, GptqConfig(group_size=32, targets=["Conv2d"]), p)


# -- calibration windows --------------------------------------------------------------------------------


def test_windows_are_disjoint_deterministic_and_start_with_bos(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    src = tmp_path / "calib.jsonl"
    src.write_text("".join(json.dumps({"text": f"The cat number {i} likes fish."}) + "\n" for i in range(200)))
    w = data.windows(src, tok, "text", seq_len=16, n_calib=4, n_eval=2)
    assert (len(w.calibration), len(w.heldout)) == (4, 2)
    assert all(len(x) == 16 and x[0] == tok.bos_token_id for x in w.calibration + w.heldout)
    assert w.heldout[0][1:] != w.calibration[-1][1:]
    assert data.windows(src, tok, "text", seq_len=16, n_calib=4, n_eval=2) == w
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text(" ".join(["Hello world."] * 200))
    assert len(data.windows(tmp_path / "dir", tok, "text", 16, 2, 1).calibration) == 2


def test_windows_errors_name_the_key(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    with pytest.raises(QuantizeError, match="quantize.num_samples=32") as err:
        data.windows(short, tok, "text", 128, 32, 16)
    assert err.value.key == "quantize.calibration"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(QuantizeError, match="no string field 'text'") as err:
        data.windows(bad, tok, "text", 16, 1, 1)
    assert err.value.key == "quantize.text_field"


# -- fidelity -------------------------------------------------------------------------------------------


def test_fidelity_is_zero_for_the_same_model_and_positive_for_a_perturbed_one(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 600, (6, 24), generator=gen).tolist()
    ref = fidelity.reference(model, windows)
    same = fidelity.compare(model, windows, ref)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-7)
    assert same.top1_agreement == 1.0
    assert same.ppl_quantized == pytest.approx(same.ppl_source)
    assert same.positions == 6 * 23
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    moved = fidelity.compare(model, windows, ref)
    assert moved.kl_mean > 1e-4
    assert moved.kl_max >= moved.kl_mean
    assert moved.top1_agreement < 1.0


def test_gate_failures_carry_the_figures() -> None:
    report = {"kl_mean": 3.2e-4, "top1_agreement": 0.975}
    assert fidelity.gate_failures(report, None, None) == []
    assert fidelity.gate_failures(report, 1e-3, 0.95) == []
    failures = fidelity.gate_failures(report, 1e-4, 0.99)
    assert failures == [
        "KL 3.200e-04 nats > quantize.max_kl=0.0001",
        "top-1 agreement 0.9750 < quantize.min_top1=0.99",
    ]


# -- runtime: quantized artifacts and this host ---------------------------------------------------------


def quantized_target(quantization: str, devices: tuple[str, ...]) -> Target:
    return Target(
        engine="vllm",
        engine_version="",
        devices=devices,
        dtype="bfloat16",
        tensor_parallel_degree=1,
        max_model_len=128,
        quantization=quantization,
    )


AVX2 = Host(devices=("cpu",), gpu_count=0, numa_nodes=1, cpu_flags=frozenset({"sse2", "avx2"}))
AVX512 = Host(
    devices=("cpu",),
    gpu_count=0,
    numa_nodes=1,
    cpu_flags=frozenset({"sse2", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}),
)


def test_runtime_names_the_quantization_and_the_devices_that_run_it() -> None:
    with pytest.raises(TargetMismatchError) as err:
        check_target(quantized_target("fp8-static", ("cuda",)), AVX512)
    assert str(err.value) == "target.devices: its quantization (fp8-static) runs on ['cuda'], this host has ['cpu']"
    with pytest.raises(TargetMismatchError) as err:
        check_target(quantized_target("awq-w4a16", ("cpu", "cuda")), AVX2)
    assert err.value.field == "quantization"
    assert "awq-w4a16 cannot run on this host's cpu" in str(err.value)
    assert "AVX-512" in str(err.value)
    assert "devices that can run it: ['cuda']" in str(err.value)
    assert check_target(quantized_target("awq-w4a16", ("cpu", "cuda")), AVX512) == "cpu"
    assert check_target(quantized_target("smoothquant-w8a8", ("cpu", "cuda")), AVX2) == "cpu"


def test_unsupported_error_carries_its_key() -> None:
    with pytest.raises(UnsupportedError) as err:
        plan(QUANTIZERS["gptq"].config_cls(), "tensorrt_llm")
    assert err.value.key == "target.engine"

"""`python -m build`: the tiny artifact end to end, determinism, the stage cache, toolchains and clear errors."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from build.errors import BuildError
from build.stages.convert import ConvertParams, convert
from tests.conftest import build, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthesized tiny checkpoint as a plain HF directory (fp32), to feed model=hf builds."""
    from build.tiny.model import SynthParams, synthesize

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    synthesize(
        SynthParams(
            seed=1,
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            corpus_sentences=500,
            train_steps=0,
            train_batch_size=1,
            train_seq_len=8,
            learning_rate=0.0,
            train_threads=1,
        ),
        out,
    )
    return out


def edit_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def digest_of(uri: str) -> str:
    return uri.rsplit("@", 1)[1]


def test_tiny_build_uri_is_last_line_and_deterministic(tmp_path: Path, tiny_uri: str, kiln_env: Path) -> None:
    assert tiny_uri.startswith(f"file://{kiln_env}/store/tiny-llama@sha256:")
    other = build(env={"KILN_CACHE": str(tmp_path / "other-cache")})  # nothing shared: synthesized anew
    assert digest_of(other) == digest_of(tiny_uri)
    show = run_cli("artifacts", "show", tiny_uri)
    manifest = json.loads(show.stdout)["manifest"]
    assert manifest["target"]["engine"] == "vllm"
    assert manifest["target"]["dtype"] == "bfloat16"
    assert [s["stage"] for s in manifest["provenance"]["stages"]] == ["synth", "convert"]
    assert manifest["provenance"]["stages"][1]["packages"]["torch"].startswith("2.13.0")
    assert "created" not in json.dumps(manifest)  # volatile facts stay out of the digest


def test_noop_rebuild_hits_the_stage_cache(tiny_uri: str) -> None:
    start = time.monotonic()
    proc = run_cli("build")
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines()[-1] == tiny_uri
    assert "synth cached, convert cached" in proc.stderr
    assert time.monotonic() - start < 20


def test_force_reruns_stages_with_same_digest(tiny_uri: str) -> None:
    proc = run_cli("build", "force=true")
    assert proc.returncode == 0, proc.stderr
    assert "synth ran, convert ran" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == tiny_uri


def test_damaged_stage_cache_entry_is_rebuilt(tiny_uri: str, kiln_env: Path) -> None:
    shard = next((kiln_env / "stages" / "convert").glob("*/out/model.safetensors"))
    shard.write_bytes(b"garbage")
    proc = run_cli("build")
    assert proc.returncode == 0, proc.stderr
    assert "convert ran" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == tiny_uri


def test_stage_runs_in_a_toolchain_subprocess(tiny_uri: str, tmp_path: Path) -> None:
    proc = run_cli(
        "build",
        env={"KILN_TOOLCHAIN_BUILD": sys.executable, "KILN_CACHE": str(tmp_path / "c"), "KILN_LOG_LEVEL": "INFO"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "KILN_TOOLCHAIN_BUILD" in proc.stderr  # the log says where the stage ran
    assert digest_of(proc.stdout.strip().splitlines()[-1]) == digest_of(tiny_uri)


def test_failed_toolchain_creation_is_named_and_leaves_no_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from build import toolchains

    reqs = tmp_path / "broken.txt"
    reqs.write_text("kiln-no-such-package-anywhere==0.0.1\n")
    tc = toolchains.Toolchain("broken", reqs)
    monkeypatch.setenv("KILN_TOOLCHAINS_DIR", str(tmp_path / "envs"))
    with pytest.raises(BuildError) as err:
        toolchains.ensure_managed(tc)
    msg = str(err.value)
    assert "creating the 'broken' environment failed" in msg
    assert "kiln-no-such-package-anywhere" in msg  # pip's own reason, held back on a pipe, comes with the error
    assert "KILN_TOOLCHAIN_BROKEN" in msg
    assert not toolchains.managed_dir(tc).exists()  # no half-made environment is left to be trusted later
    assert "Collecting" not in capsys.readouterr().err  # pip's chatter stays out of a non-terminal log


def test_hf_directory_source_with_sharding(tiny_checkpoint: Path, tmp_path: Path) -> None:
    uri = build("model=hf", f"model.source={tiny_checkpoint}", "model.name=small", "convert.max_shard_size=100KB")
    out = tmp_path / "pulled"
    assert run_cli("artifacts", "pull", uri, str(out)).returncode == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file()
    assert (out / "chat_template.jinja").is_file()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.nope=1"], "model.nope"),
        (["model=hf", "model.source=/no/such/dir", "model.name=x"], "model.source"),
        (["model.dtype=int3"], "model.dtype"),
        (["quantize=bogus"], "quantize"),
    ],
)
def test_bad_config_named_without_traceback(overrides: list[str], expected: str) -> None:
    proc = run_cli("build", *overrides)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""


def test_unreachable_hub_fails_fast_and_clearly() -> None:
    start = time.monotonic()
    proc = run_cli(
        "build",
        "model=hf",
        "model.source=some-org/some-model",
        "model.name=x",
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"},
    )
    assert proc.returncode != 0
    assert "unreachable" in proc.stderr
    assert "model.source" in proc.stderr
    assert time.monotonic() - start < 30


def params(**kw: object) -> ConvertParams:
    base = {"dtype": "bfloat16", "max_shard_size": 10**9, "check_finite": True, "allow_pickle": False}
    return ConvertParams(**{**base, **kw})  # type: ignore[arg-type]


def rewrite_weights(ckpt: Path, fn: object) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    fn(tensors)  # type: ignore[operator]
    save_file(tensors, str(ckpt / "model.safetensors"))


def test_convert_refuses_missing_unexpected_and_misshapen(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import torch

    ckpt = edit_copy(tiny_checkpoint, tmp_path / "c")

    def damage(t: dict[str, torch.Tensor]) -> None:
        del t["model.layers.0.mlp.up_proj.weight"]
        t["model.extra.weight"] = torch.zeros(2)
        t["model.norm.weight"] = torch.ones(7)

    rewrite_weights(ckpt, damage)
    with pytest.raises(BuildError) as err:
        convert(params(), ckpt, tmp_path / "out")
    text = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in text
    assert "model.extra.weight" in text
    assert "model.norm.weight: checkpoint [7], config implies [64]" in text
    assert err.value.key == "model.source"


def test_convert_refuses_nan(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = edit_copy(tiny_checkpoint, tmp_path / "c")
    rewrite_weights(ckpt, lambda t: t["lm_head.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(BuildError, match="lm_head.weight contains NaN or Inf"):
        convert(params(), ckpt, tmp_path / "out")


def test_convert_refuses_pickle_unless_allowed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    ckpt = edit_copy(tiny_checkpoint, tmp_path / "c")
    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(BuildError) as err:
        convert(params(), ckpt, tmp_path / "out1")
    assert err.value.key == "model.allow_pickle"
    result = convert(params(allow_pickle=True), ckpt, tmp_path / "out2")
    assert result["num_parameters"] > 0
    assert (tmp_path / "out2" / "model.safetensors").is_file()


def test_convert_refuses_unsupported_architecture(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = edit_copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["T5ForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BuildError, match="'T5ForConditionalGeneration' is not supported"):
        convert(params(), ckpt, tmp_path / "out")

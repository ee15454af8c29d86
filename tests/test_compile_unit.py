"""Precompiled caches without an engine: the compile key check, the writable copy and its repair, miss
detection from the cache directory, and the build-side config checks for ``compile=vllm``."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from artifacts.devices import Gpu, parse_gpus
from artifacts.manifest import Manifest, Target
from artifacts.ops import scan_dir
from compile.registry import COMPILERS
from runtime.engines.base import EngineSettings
from runtime.engines.vllm import compile_cache
from runtime.host import TargetMismatchError
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def here() -> dict[str, str]:
    return compile_cache.host_key("cpu", "bfloat16")


def settings(model_dir: Path, dtype: str, eager: bool = False) -> EngineSettings:
    return EngineSettings(model_dir=model_dir, device="cpu", dtype=dtype, enforce_eager=eager)


def artifact(tmp_path: Path, key: dict[str, str]) -> tuple[Path, Manifest]:
    """A directory shaped like a compiled artifact: a config and a small compile cache."""
    d = tmp_path / "art"
    files = {
        "config.json": tmp_path.name,  # unique per test, so each test gets its own writable copy
        "compile_cache/inductor/fxgraph/ab/abcdef/entry": "graph",
        "compile_cache/inductor/cd/cdkernel.main.so": "kernel" * 100,
        "compile_cache/vllm/modelinfos/llama.json": "{}",
    }
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    target = Target("vllm", "", ("cpu", "cuda"), "bfloat16", 1, 128, compile=key)
    return d, Manifest.create("art", scan_dir(d), target, {}, {})


def test_host_key_names_what_compiled_code_depends_on(here: dict[str, str]) -> None:
    assert {"device", "vllm", "torch", "cpu_isa", "cpu_arch", "torch_dir", "python_include", "dtype"} <= set(here)
    assert here["device"] == "cpu"
    assert here["dtype"] == "bfloat16"
    assert here["vllm"]
    assert here["torch"].startswith("2.")
    assert not here["cpu_arch"].startswith("unknown")  # g++ answers on this machine


@pytest.mark.parametrize(
    ("field", "value"),
    [("cpu_arch", "sapphirerapids"), ("cpu_isa", "avx512"), ("torch", "2.99.0"), ("torch_dir", "/opt/venv/torch")],
)
def test_mismatched_key_is_refused_naming_the_field(
    tmp_path: Path, here: dict[str, str], field: str, value: str
) -> None:
    d, manifest = artifact(tmp_path, {**here, field: value})
    with pytest.raises(TargetMismatchError) as err:
        compile_cache.prepare(d, manifest, settings(d, "bfloat16"), ignore=False)
    assert err.value.field == f"compile.{field}"
    assert str(err.value).startswith(f"target.compile.{field}: the cache was compiled for {value!r}")
    assert "--ignore-compile-cache" in str(err.value)


def test_first_mismatch_reported_is_the_most_basic(here: dict[str, str]) -> None:
    recorded = {**here, "cpu_arch": "x", "vllm": "0.1.0", "dtype": "float16"}
    assert compile_cache.mismatch(recorded, here)[0] == "vllm"  # type: ignore[index]
    assert compile_cache.mismatch({**here, "gpu_arch_from_the_future": "x"}, here)[0] == "gpu_arch_from_the_future"  # type: ignore[index]
    assert compile_cache.mismatch(here, here) is None


def test_operator_dtype_override_is_a_mismatch(tmp_path: Path, here: dict[str, str]) -> None:
    d, manifest = artifact(tmp_path, here)
    with pytest.raises(TargetMismatchError, match=r"target.compile.dtype: .*'bfloat16', this host has 'float16'"):
        compile_cache.prepare(d, manifest, settings(d, "float16"), ignore=False)


def test_ignore_flag_serves_without_the_cache_and_says_why(
    tmp_path: Path, here: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    d, manifest = artifact(tmp_path, {**here, "cpu_arch": "sapphirerapids"})
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert compile_cache.prepare(d, manifest, settings(d, "bfloat16"), ignore=True) is None
    assert "serving without the artifact's precompiled cache (target.compile.cpu_arch:" in caplog.text
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert compile_cache.prepare(d, manifest, settings(d, "bfloat16", eager=True), ignore=False) is None
    assert "enforce_eager" in caplog.text


def test_writable_copy_is_made_verified_and_repaired(
    tmp_path: Path, here: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    d, manifest = artifact(tmp_path, here)
    copy = compile_cache.prepare(d, manifest, settings(d, "bfloat16"), ignore=False)
    assert copy is not None
    assert copy.is_relative_to(compile_cache.copy_root())
    assert compile_cache.cache_files(copy) == {
        "inductor/fxgraph/ab/abcdef/entry",
        "inductor/cd/cdkernel.main.so",
        "vllm/modelinfos/llama.json",
    }
    kernel = copy / "inductor/cd/cdkernel.main.so"
    kernel.write_text("K" * 600)  # same size, other bytes: a corrupted entry
    (copy / "vllm/modelinfos/llama.json").unlink()
    (copy / "inductor/fxgraph/ab/extra").write_text("added by an earlier miss")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        again = compile_cache.writable_copy(d, manifest)
    assert again == copy
    assert kernel.read_text() == "kernel" * 100
    assert (copy / "vllm/modelinfos/llama.json").read_text() == "{}"
    assert (copy / "inductor/fxgraph/ab/extra").exists()  # what inductor compiled earlier stays usable
    assert "restored" in caplog.text
    assert "cdkernel.main.so" in caplog.text


def test_watch_reports_a_miss_from_new_cache_files_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    (root / "inductor" / "fxgraph").mkdir(parents=True)
    (root / "inductor" / "old.so").write_text("x")
    watch = compile_cache.CacheWatch(root)
    (root / "inductor" / "locks").mkdir()
    (root / "inductor" / "locks" / "k.lock").write_text("")  # written on every start: not a compile
    (root / "inductor" / "__pycache__").mkdir()
    (root / "inductor" / "__pycache__" / "w.pyc").write_text("")
    with caplog.at_level(logging.INFO, logger="kiln"):
        watch.started()
    watch.stop()
    assert "compile cache hit" in caplog.text
    assert REGISTRY.get_sample_value("kiln_compile_cache_hit") == 1
    (root / "inductor" / "fxgraph" / "ab").mkdir()
    (root / "inductor" / "fxgraph" / "ab" / "entry").write_text("new graph")
    (root / "inductor" / "ab.main.so").write_text("new kernel")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert watch.check("while serving") == {"inductor/fxgraph/ab/entry", "inductor/ab.main.so"}
    assert "compile cache miss while serving: vLLM compiled 2 new or rewritten cache files" in caplog.text
    assert "inductor compiled a graph" in caplog.text
    assert REGISTRY.get_sample_value("kiln_compile_cache_hit") == 0
    assert REGISTRY.get_sample_value("kiln_compile_cache_compiled_files") == 2
    assert watch.check("while serving") == set()  # each compile is reported once


def test_watch_reports_an_aot_function_saved_again_in_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """vLLM re-saves its AOT function under the same name when it could not load it: no new file, still a miss."""
    aot = tmp_path / "cache" / compile_cache.AOT_DIR / "42ee" / "rank_0_0" / "model"
    aot.parent.mkdir(parents=True)
    aot.write_bytes(b"packaged")
    os.utime(aot, ns=(1_000_000_000, 1_000_000_000))  # as copied from the artifact, long ago
    watch = compile_cache.CacheWatch(tmp_path / "cache")
    assert watch.check("at engine start") == set()
    aot.write_bytes(b"compiled again")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert watch.check("at engine start") == {f"{compile_cache.AOT_DIR}/42ee/rank_0_0/model"}
    assert "could not load the packaged AOT function" in caplog.text
    assert REGISTRY.get_sample_value("kiln_compile_cache_hit") == 0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["compile=vllm", "serving.enforce_eager=true"], "serving.enforce_eager"),
        (["compile=vllm", "target.engine=neuron"], "target.engine"),
        (["compile=vllm", "compile.timeout_s=0"], "compile.timeout_s"),
        (["compile=vllm", "compile.device=tpu"], "compile.device"),
        (["target.engine=foo"], "target.engine"),
        (["build.force=true"], "build.force"),
    ],
)
@pytest.mark.integration  # spawns the build CLI
def test_build_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    proc = run_cli("build", *overrides, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("kiln build failed: [config]")
    assert f"{key}:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_packaged_cache_leaves_out_locks_and_bytecode(tmp_path: Path) -> None:
    for rel in ("inductor/locks/k.lock", "inductor/ab/__pycache__/w.cpython-311.pyc", "inductor/ab/k.main.so"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    compile_cache.drop_volatile(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "inductor",
        "inductor/ab",
        "inductor/ab/k.main.so",
    ]


# -- compile=vllm on a GPU build host: the toolchain and the cuda key fields -------------------------------------

H100 = Gpu("NVIDIA H100 80GB HBM3", "9.0", "570.86.15", 81559)
A10G = Gpu("NVIDIA A10G", "8.6", "570.86.15", 23028)


def test_nvidia_smi_rows_become_gpus() -> None:
    text = "NVIDIA H100 80GB HBM3, 9.0, 570.86.15, 81559\nNVIDIA H100 80GB HBM3, 9.0, 570.86.15, 81559\n\n"
    assert parse_gpus(text) == (H100, H100)
    assert parse_gpus("No devices were found") == ()


def test_cuda_key_takes_capability_from_the_driver_not_torch() -> None:
    key = compile_cache.cuda_key("13.0", (H100,))
    assert key == {"cuda": "13.0", "gpu_capability": "9.0", "cuda_driver": "570.86.15"}


def test_a_cpu_torch_on_a_gpu_host_is_refused_with_the_install_line() -> None:
    with pytest.raises(TargetMismatchError, match=r"kiln\[vllm-cuda\]") as info:
        compile_cache.cuda_key(None, (H100,))
    assert info.value.field == "compile.cuda"


def test_an_sm90_cache_is_refused_on_an_a10g_naming_the_capability() -> None:
    built = {"device": "cuda", "vllm": "0.32.0", "torch": "2.13.0", **compile_cache.cuda_key("13.0", (H100,))}
    here = built | compile_cache.cuda_key("13.0", (A10G,))
    field, why = compile_cache.mismatch(built, here) or ("", "")
    assert field == "gpu_capability"
    assert "'9.0'" in why
    assert "'8.6'" in why


@pytest.mark.parametrize(
    ("built", "host", "fits"),
    [("570.86.15", "570.86.15", True), ("550.54.15", "570.86.15", True), ("570.86.15", "550.54.15", False)],
)
def test_a_newer_driver_loads_what_an_older_one_compiled(built: str, host: str, fits: bool) -> None:
    key = {"device": "cuda", "cuda_driver": built}
    bad = compile_cache.mismatch(key, key | {"cuda_driver": host})
    assert (bad is None) == fits
    if bad:
        assert bad[0] == "cuda_driver"


@pytest.mark.parametrize(
    ("device", "host", "toolchain"),
    [
        ("auto", ("cuda", "cpu"), "vllm-cuda"),
        ("auto", ("cpu",), "vllm-cpu"),
        ("cpu", ("cuda", "cpu"), "vllm-cpu"),
        ("cuda", ("cpu",), "vllm-cuda"),
    ],
)
def test_the_compile_device_picks_the_toolchain(device: str, host: tuple[str, ...], toolchain: str) -> None:
    spec = COMPILERS["vllm"]
    cfg = spec.config_cls(device=device)  # type: ignore[call-arg]
    assert spec.toolchain_for(cfg.build_device(host)) == toolchain
    assert (ROOT / "build" / "toolchains" / f"{toolchain}.txt").is_file()


def test_the_cuda_toolchain_pins_the_vllm_of_the_cuda_extra() -> None:
    from build.toolchains import Toolchain

    pins = Toolchain("vllm-cuda", ROOT / "build" / "toolchains" / "vllm-cuda.txt").pins
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm-cuda"]
    assert [f"vllm=={pins['vllm']}"] == extra
    assert "+cpu" not in pins["torch"]

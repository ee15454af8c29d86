"""Runtime pieces that need no engine: import isolation, target checks, artifact resolution and verification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts.errors import ArtifactError, VerificationError
from artifacts.manifest import Target
from runtime.host import Host, TargetMismatchError, check_target
from runtime.resolve import resolve
from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def test_runtime_never_imports_the_build_side() -> None:
    code = (
        "import sys, runtime, runtime.__main__, runtime.server, runtime.service, runtime.app, runtime.resolve;"
        "import runtime.engines.vllm, runtime.engines.transformers, runtime.config, runtime.api.lmi, runtime.metrics;"
        "import runtime.engines.vllm.compile_cache, runtime.engines.vllm.warmup, runtime.warmup, runtime.settings;"
        "import runtime.engines.vllm.engine, runtime.engines.transformers.engine, runtime.api.openai;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('build', 'quantize', 'compile', 'hydra', 'omegaconf')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def target(**kw: object) -> Target:
    base = {
        "engine": "vllm",
        "engine_version": "",
        "devices": ("cpu", "cuda"),
        "dtype": "bfloat16",
        "tensor_parallel_degree": 1,
        "max_model_len": 128,
    }
    return Target(**{**base, **kw})  # type: ignore[arg-type]


CPU_HOST = Host(devices=("cpu",), gpu_count=0, numa_nodes=1)
GPU_HOST = Host(devices=("cuda", "cpu"), gpu_count=2, numa_nodes=1)


def test_target_picks_best_device() -> None:
    assert check_target(target(), CPU_HOST) == "cpu"
    assert check_target(target(), GPU_HOST) == "cuda"


@pytest.mark.parametrize(
    ("kw", "host", "field"),
    [
        ({"devices": ("cuda",)}, CPU_HOST, "devices"),
        ({"engine": "tensorrt_llm"}, GPU_HOST, "engine"),
        ({"engine_version": ">=99"}, CPU_HOST, "engine_version"),
        ({"tensor_parallel_degree": 4}, GPU_HOST, "tensor_parallel_degree"),
        ({"unknown": {"gpu_arch": "sm_90"}}, GPU_HOST, "gpu_arch"),
    ],  # target.compile is checked with the engine settings: tests/test_compile_unit.py
)
def test_target_mismatch_names_the_field(kw: dict[str, object], host: Host, field: str) -> None:
    with pytest.raises(TargetMismatchError) as err:
        check_target(target(**kw), host)
    assert err.value.field == field
    assert str(err.value).startswith(f"target.{field}:")


@pytest.mark.integration  # builds and pulls with the CLIs
def test_resolve_tampered_directory_names_the_file(tiny_uri: str, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    d = tmp_path / "art"
    assert run_cli("artifacts", "pull", tiny_uri, str(d)).returncode == 0
    assert resolve(str(d)).manifest is not None
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VerificationError, match="config.json"):
        resolve(str(d))


@pytest.mark.integration  # builds with the CLI
def test_resolve_reuses_and_repairs_the_pull_cache(tiny_uri: str, kiln_env: Path) -> None:
    first = resolve(tiny_uri)
    assert first.path.is_relative_to(kiln_env / "pulled")
    (first.path / "tokenizer.json").write_text("{}")  # damage the cache entry
    again = resolve(tiny_uri)
    assert again.path == first.path
    assert (again.path / "tokenizer.json").stat().st_size > 100  # re-fetched, not served damaged


def test_two_servers_pulling_one_artifact_at_once_both_start(
    tiny_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas starting together on one host pull into one cache entry: the second rename finds the first's
    directory there (ENOTEMPTY). It serves the winner's verified copy instead of failing to start."""
    import threading

    from artifacts import ops

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))  # an empty pull cache; the store is tiny_uri's
    barrier = threading.Barrier(2, timeout=30)
    load = ops.load_manifest

    def together(*args: object, **kwargs: object) -> object:
        out = load(*args, **kwargs)  # type: ignore[arg-type]
        barrier.wait()  # both past the manifest, both find no cache entry, both fetch, both rename
        return out

    monkeypatch.setattr(ops, "load_manifest", together)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(_try(resolve, tiny_uri))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2
    assert all(not isinstance(r, Exception) for r in results), results
    paths = {r.path for r in results}  # type: ignore[attr-defined]
    assert len(paths) == 1
    assert not [p for p in paths.pop().parent.iterdir() if p.name.startswith(".pull-")]  # no temporary left


def _try(fn: object, *args: object) -> object:
    try:
        return fn(*args)  # type: ignore[operator]
    except Exception as exc:
        return exc


def test_plain_hf_directory_is_accepted_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    model = resolve(str(tmp_path))
    assert model.manifest is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match="neither manifest.json nor"):
        resolve(str(empty))


def test_prompt_logprobs_come_once_with_delta_outputs() -> None:
    """vLLM sends prompt logprobs in the first DELTA output and [] (not None) in the later ones."""
    from types import SimpleNamespace

    from runtime.engines.vllm.engine import _convert

    seq = SimpleNamespace(index=0, text="a", token_ids=[5], logprobs=None, finish_reason=None, stop_reason=None)
    first = SimpleNamespace(
        outputs=[seq],
        prompt_token_ids=[1, 2],
        prompt_logprobs=[None, {2: SimpleNamespace(logprob=-1.0, rank=1, decoded_token="b")}],
        finished=False,
        num_cached_tokens=0,
    )
    later = SimpleNamespace(**{**vars(first), "prompt_logprobs": []})
    assert _convert(first, 0, 1).prompt_logprobs[1].logprob == -1.0  # type: ignore[index,union-attr]
    assert _convert(later, 0, 1).prompt_logprobs is None


def test_the_transformers_engine_refuses_a_transformers_below_its_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kiln's runtime installs beside transformers 4.57 (TensorRT-LLM's and Neuron's pin); the transformers engine
    and the deepspeed engine built on it need 5.16 and say so before the server starts."""
    import importlib.metadata

    from runtime.engines import get
    from runtime.engines.base import EngineSettings

    settings = EngineSettings(model_dir=tmp_path)
    assert get("transformers").check(settings) == []  # this environment's transformers (5.x)
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "4.57.1")
    for engine in ("transformers", "deepspeed"):
        problems = get(engine).check(settings)
        assert any("needs transformers>=5.16" in p and "has 4.57.1" in p for p in problems), (engine, problems)

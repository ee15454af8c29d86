"""The version-pinned vLLM AOT-reload guard (runtime/engines/vllm/patches.py). It is pinned to the vLLM it was
read in; it is registered where vLLM looks for plugins; it does nothing unless kiln asked for it; and AOT is on
only where the cache can use it.

The end-to-end proof, a packaged AOT function loaded instead of recompiled, is in tests/test_compile.py."""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch.compiler

from runtime.engines.vllm import SPEC, compile_cache, patches

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """vLLM's functions and kiln's guards write ``os.environ`` directly: each test leaves the environment as it found
    it. A leaked ``VLLM_WORKER_MULTIPROC_METHOD=fork`` reads, in every server a later test starts, as an operator's
    choice, which keeps spawn (tests/test_compile.py failed after this module)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_the_pinned_vllm_is_the_installed_one() -> None:
    """Fails when vLLM changes: re-read the guarded functions, re-measure, then move the pin (or drop a guard)."""
    assert SPEC.installed_version() == patches.PINNED_VLLM, (
        "vLLM is no longer the version the AOT guards were written for: read "
        + ", ".join(f"vllm/{f}:{fn}" for f, fn in patches.PINNED_SOURCES)
        + " again"
    )
    for (file, function), digest in (patches.PINNED_SOURCES | patches.FORK_PINNED_SOURCES).items():
        assert patches.source_digest(file, function) == digest, f"vLLM's {file}:{function} changed"
    assert patches.aot_guard_applies()
    assert patches.fork_applies()


def test_every_variable_the_cpu_platform_sets_is_accounted_for_in_a_forked_child() -> None:
    """``start_by_fork`` is right only if each variable vLLM's CPU platform writes does its work in a child that is
    forked instead of spawned: the written-down list must be the function's own."""
    import ast

    source = patches.function_source("platforms/cpu.py", "CpuPlatform", "check_and_update_config") or ""
    written = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and ast.unparse(target.value) == "os.environ":
                    key = target.slice
                    written.add(key.value if isinstance(key, ast.Constant) else ast.unparse(key))
    # one key is a local name: conv_state_layout_env = "VLLM_SSM_CONV_STATE_LAYOUT"
    assert 'conv_state_layout_env = "VLLM_SSM_CONV_STATE_LAYOUT"' in source
    written = {"VLLM_SSM_CONV_STATE_LAYOUT" if k == "conv_state_layout_env" else k for k in written}
    assert written == set(patches.CPU_PLATFORM_ENV), sorted(written)


@pytest.fixture
def cpu_platform(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """vLLM's CPU platform with ``check_and_update_config`` standing in for the real one (which needs a whole
    VllmConfig): it writes the variables the real one writes. Everything it and the fork change touch is
    restored after the test. Returns the calls."""
    import torch._inductor.config as inductor
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    calls: list[str] = []

    def check_and_update_config(cls: type, vllm_config: Any) -> None:
        calls.append(vllm_config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        os.environ["TORCHINDUCTOR_CPP_DYNAMIC_THREADS"] = "1"

    monkeypatch.setattr(CpuPlatform, "check_and_update_config", classmethod(check_and_update_config))
    monkeypatch.setattr(OMPProcessManager, "configure_omp_envs", OMPProcessManager.configure_omp_envs)  # restored
    for name in ("VLLM_WORKER_MULTIPROC_METHOD", "TORCHINDUCTOR_COMPILE_THREADS", "TORCHINDUCTOR_CPP_DYNAMIC_THREADS"):
        monkeypatch.delenv(name, raising=False)
    with inductor.patch({"compile_threads": 2, "cpp.dynamic_threads": False}):  # as torch read them at import
        yield calls


def test_start_by_fork_forks_with_the_inductor_settings_a_spawned_child_would_read(cpu_platform: list[str]) -> None:
    import torch._inductor.config as inductor
    from vllm.platforms.cpu import CpuPlatform

    assert patches.start_by_fork()
    assert patches.start_by_fork()  # once per process: still one wrapper
    CpuPlatform.check_and_update_config("config")  # type: ignore[arg-type]
    assert cpu_platform == ["config"]  # vLLM's own function ran, once
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
    # torch read these two when inductor was imported, before vLLM set them: a forked child inherits the module
    assert inductor.compile_threads == 1
    assert inductor.cpp.dynamic_threads is True


def test_a_forked_worker_gets_the_openmp_threads_vllm_chose_for_it(cpu_platform: list[str]) -> None:
    """vLLM's OpenMP manager binds a worker through the environment, which a spawned worker's OpenMP runtime reads
    when it starts; a forked worker has the server's runtime, started already with a thread on every core. Forked
    inside vLLM's own ``configure_omp_envs`` (here with a one-core binding), the worker has that core and one
    thread; a process forked outside it (vLLM's engine core) keeps the server's."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2 or torch.get_num_threads() < 2:
        pytest.skip("needs two CPUs and two torch threads to tell a binding from none")
    assert patches.start_by_fork()
    binding = types.SimpleNamespace(skip_setup=False, cpu_lists=[[allowed[-1]]], use_iomp=False, use_gomp=False)
    with OMPProcessManager.configure_omp_envs(binding, rank=0, local_rank=0):
        assert os.environ["OMP_PLACES"] == f"{{{allowed[-1]}}}"  # vLLM's own function ran: what a spawned child reads
        worker = _forked_threads()
    assert worker == ([allowed[-1]], 1)
    assert _forked_threads() == (allowed, torch.get_num_threads())  # outside the binding: as the parent


def test_a_binding_to_cores_this_process_lacks_leaves_the_worker_unbound_with_vllms_thread_count(
    cpu_platform: list[str],
) -> None:
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    allowed = sorted(os.sched_getaffinity(0))
    assert patches.start_by_fork()
    binding = types.SimpleNamespace(skip_setup=False, cpu_lists=[[4095]], use_iomp=False, use_gomp=False)
    with OMPProcessManager.configure_omp_envs(binding, rank=0, local_rank=0):
        assert _forked_threads() == (allowed, 1)  # the child lived on and was not left with the server's threads


def _forked_threads() -> tuple[list[int], int]:
    """A child forked from this process reports its CPU affinity and torch's thread count."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_report_threads, args=(writer,))
    child.start()
    got = reader.recv()
    child.join(timeout=30)
    assert child.exitcode == 0
    return got


def _report_threads(conn: Any) -> None:
    conn.send((sorted(os.sched_getaffinity(0)), torch.get_num_threads()))


def test_an_operators_start_method_is_left_as_vllm_sets_it(
    cpu_platform: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.platforms.cpu import CpuPlatform

    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    assert not patches.start_by_fork()
    CpuPlatform.check_and_update_config("config")  # type: ignore[arg-type]
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"


def test_the_pinned_functions_still_have_what_the_guards_are_for() -> None:
    loader = patches.function_source("compilation/decorators.py", "_try_load_aot_compiled_fn") or ""
    assert "loaded_fn._artifacts.compiled_fn.finalize_loading(" in loader  # called without asking
    assert "hasattr" not in loader
    assert "torch.compiler.load_compiled_function(" in loader  # the call the reload guard wraps
    factors = patches.function_source("compilation/caching.py", "aot_compile_hash_factors") or ""
    assert "vllm_config.compute_hash()" in factors  # ModelConfig's hash, with the model's path in it
    ignored = patches.function_source("config/model.py", "ModelConfig", "compute_hash") or ""
    assert "ignored_factors" in ignored
    assert '"model"' not in ignored  # the path is a factor: what the location guard replaces


def test_vllm_finds_the_guard_among_its_general_plugins() -> None:
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    (entry,) = [e for e in metadata.entry_points(group=DEFAULT_PLUGINS_GROUP) if e.name == "kiln_aot_guard"]
    assert entry.value == "runtime.engines.vllm.patches:register"
    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["kiln_aot_guard"] is patches.register


@pytest.fixture
def fake_loader(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """torch's loader replaced by one returning what the CPU path loads: a function lacking finalize_loading.
    The wrapper under test is what kiln adds around it."""
    loaded: list[Any] = []

    def load_compiled_function(f: Any, *, f_globals: Any = None) -> Any:
        def compiled(*args: Any) -> Any:  # a plain function, as on CPU
            return args

        out = types.SimpleNamespace(_artifacts=types.SimpleNamespace(compiled_fn=compiled))
        loaded.append(out)
        return out

    monkeypatch.setattr(torch.compiler, "load_compiled_function", load_compiled_function)
    from vllm.compilation import caching

    monkeypatch.setattr(caching, "aot_compile_hash_factors", caching.aot_compile_hash_factors)  # restored after
    return loaded


def test_register_leaves_vllm_as_shipped_unless_kiln_asked(
    fake_loader: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = torch.compiler.load_compiled_function
    monkeypatch.delenv(patches.ENV, raising=False)
    patches.register()
    assert torch.compiler.load_compiled_function is before
    monkeypatch.setenv(patches.ENV, "1")
    patches.register()
    assert torch.compiler.load_compiled_function is not before


def test_guard_gives_a_loaded_function_a_noop_finalize_loading(
    fake_loader: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    patches.apply()
    patches.apply()  # vLLM may load plugins more than once in a process: still one wrapper
    wrapper = torch.compiler.load_compiled_function
    assert getattr(wrapper, patches._MARK)
    loaded = wrapper(None, f_globals={})
    assert loaded is fake_loader[-1]
    assert loaded._artifacts.compiled_fn.finalize_loading(object()) is None
    assert loaded._artifacts.compiled_fn(1, 2) == (1, 2)  # the compiled function itself is untouched
    # A function that has its own finalize_loading (vLLM's VllmSerializableFunction, e.g. on GPU) keeps it.
    own = types.SimpleNamespace(finalize_loading=lambda cfg: "own")
    monkeypatch.setattr(
        torch.compiler,
        "load_compiled_function",
        lambda f, **kw: types.SimpleNamespace(_artifacts=types.SimpleNamespace(compiled_fn=own)),
    )
    patches.apply()
    assert torch.compiler.load_compiled_function(None)._artifacts.compiled_fn.finalize_loading(None) == "own"


@pytest.mark.parametrize(
    ("filling", "has_aot", "applies", "switch", "expected"),
    [
        (True, False, True, None, "1"),  # the build's warm-up: save AOT functions
        (False, True, True, None, "1"),  # serving an artifact that has them
        (False, False, True, None, "0"),  # serving an artifact built without: inductor's cache is what hits
        (True, False, False, None, "0"),  # another vLLM: as before the guard
        (False, True, False, None, "0"),
        (True, False, True, "0", "0"),  # the operator's KILN_VLLM_AOT=0
        (False, True, True, "0", "0"),
    ],
)
def test_aot_compile_is_on_only_where_it_can_reload(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    filling: bool,
    has_aot: bool,
    applies: bool,
    switch: str | None,
    expected: str,
) -> None:
    monkeypatch.setattr(patches, "aot_guard_applies", lambda: applies)
    for key in ("TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "VLLM_USE_AOT_COMPILE", compile_cache.AOT_SWITCH):
        monkeypatch.delenv(key, raising=False)
    if switch is not None:
        monkeypatch.setenv(compile_cache.AOT_SWITCH, switch)
    monkeypatch.setenv(patches.ENV, "stale")  # from an earlier start in this process
    if has_aot:
        (tmp_path / compile_cache.AOT_DIR / "abc" / "rank_0_0").mkdir(parents=True)
    compile_cache.point_engine_at(tmp_path, filling=filling)
    assert os.environ["VLLM_USE_AOT_COMPILE"] == expected
    assert os.environ.get(patches.ENV) == ("1" if expected == "1" else None)
    assert os.environ["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


class _ModelConfig:
    def __init__(self, model: str) -> None:
        self.model = model


class _VllmConfig:
    """What aot_compile_hash_factors reads: a config whose hash, like vLLM's ModelConfig's, includes the path."""

    def __init__(self, model: str) -> None:
        self.model_config = _ModelConfig(model)

    def compute_hash(self) -> str:
        return "model=" + self.model_config.model


def test_location_guard_keys_the_aot_function_by_the_model_config_not_its_path(
    fake_loader: list[Any], tmp_path: Path
) -> None:
    from vllm.compilation import caching

    def model_dir(name: str, config: str) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config)
        return str(d)

    built, served, other = model_dir("staging", '{"a": 1}'), model_dir("deploy", '{"a": 1}'), model_dir("x", "{}")
    as_shipped = caching.aot_compile_hash_factors(_VllmConfig(built))
    assert as_shipped != caching.aot_compile_hash_factors(_VllmConfig(served))  # vLLM's key: the path moved it
    patches.apply()
    config = _VllmConfig(built)
    guarded = caching.aot_compile_hash_factors(config)
    assert config.model_config.model == built  # the path is back once the key is computed
    assert guarded == caching.aot_compile_hash_factors(_VllmConfig(served))
    assert guarded != caching.aot_compile_hash_factors(_VllmConfig(other))  # another architecture: another key
    assert guarded != as_shipped
    # A hub id (no directory) is left to vLLM
    assert caching.aot_compile_hash_factors(_VllmConfig("org/model")) != caching.aot_compile_hash_factors(
        _VllmConfig("org/other")
    )

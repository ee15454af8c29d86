"""The stage cache's hit/miss rules, on a trivial stage: what must reuse an output and what must redo it."""

from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

import pytest

from build import toolchains
from build.cache import StageCache, StageRecord
from build.stages import StageInput, StageSpec, run_stage

pytestmark = pytest.mark.unit
PROBE = Path(__file__).with_name("stage_probe.py")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A stage package and a helper package on sys.path (so their code can change), an input, a cache."""
    for pkg in ("probe_stage", "probe_helper"):
        (tmp_path / "code" / pkg).mkdir(parents=True)
        (tmp_path / "code" / pkg / "__init__.py").write_text("")
    shutil.copyfile(PROBE, tmp_path / "code" / "probe_stage" / "stage.py")
    (tmp_path / "code" / "probe_helper" / "helper.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    for name in [m for m in sys.modules if m.split(".")[0] in ("probe_stage", "probe_helper")]:
        monkeypatch.delitem(sys.modules, name)  # another test's copy
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(b"w" * 100)
    return {"root": tmp_path, "cache": tmp_path / "cache", "src": tmp_path / "src"}


def spec(*, host_bound: bool = False, code: tuple[str, ...] = ()) -> StageSpec:
    return StageSpec("probe", "build", "probe_stage.stage:run", host_bound=host_bound, code=code)


def run(
    env: dict[str, Path],
    stage: StageSpec | None = None,
    params: dict[str, int] | None = None,
    digest: str = "sha256:" + "a" * 64,
    force: bool = False,
) -> StageRecord:
    inputs = {"src": StageInput(env["src"], digest)}
    return run_stage(stage or spec(), params or {"p": 1}, inputs, StageCache(env["cache"]), force=force)


def test_same_inputs_hit_and_return_the_same_output(env: dict[str, Path]) -> None:
    first = run(env)
    again = run(env)
    assert not first.cached
    assert again.cached
    assert again.output_digest == first.output_digest
    assert again.path == first.path


@pytest.mark.parametrize(
    "change",
    [
        {"params": {"p": 2}},  # the stage's resolved config
        {"digest": "sha256:" + "b" * 64},  # an input's content
    ],
)
def test_a_changed_param_or_input_misses(env: dict[str, Path], change: dict[str, object]) -> None:
    first = run(env)
    other = run(env, **change)  # type: ignore[arg-type]  # params or digest
    assert not other.cached
    assert other.key != first.key
    assert run(env).cached  # the first entry is still there


def test_changed_stage_code_misses(env: dict[str, Path]) -> None:
    first = run(env)
    stage_file = env["root"] / "code" / "probe_stage" / "stage.py"
    stage_file.write_text(stage_file.read_text() + "\n# a change\n")
    assert not run(env).cached
    # code outside the entry's package counts only when the spec names it
    named = spec(code=("probe_helper.helper",))
    assert not run(env, named).cached
    assert run(env, named).cached
    (env["root"] / "code" / "probe_helper" / "helper.py").write_text("VALUE = 2\n")
    assert not run(env, named).cached
    assert run(env).cached
    assert first.key != run(env).key


def test_changed_toolchain_lock_misses(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    lock = env["root"] / "probe.txt"
    lock.write_text(f"pytest=={metadata.version('pytest')}\n")
    monkeypatch.setitem(toolchains.TOOLCHAINS, "probe", toolchains.Toolchain("probe", lock))
    stage = StageSpec(name="probe", toolchain="probe", entry="probe_stage.stage:run")
    assert not run(env, stage).cached
    assert run(env, stage).cached
    lock.write_text(lock.read_text() + "# another pin set\n")
    assert not run(env, stage).cached


def test_host_bound_stage_misses_on_another_cpu_or_interpreter(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = spec(host_bound=True)
    assert not run(env, bound).cached
    assert run(env, bound).cached
    assert not run(env).cached
    assert run(env).cached
    monkeypatch.setattr(toolchains, "_cpu_id", lambda: "Another CPU [0123456789abcdef]")
    assert not run(env, bound).cached
    assert run(env).cached
    here = toolchains.host_fingerprint(toolchains.get("build"))
    monkeypatch.setenv("KILN_TOOLCHAIN_BUILD", "/opt/other/bin/python")
    assert toolchains.host_fingerprint(toolchains.get("build"))["python"] != here["python"]


def test_force_redoes_the_stage_and_replaces_the_entry(env: dict[str, Path]) -> None:
    first = run(env)
    forced = run(env, force=True)
    assert not forced.cached
    assert forced.key == first.key
    assert forced.output_digest == first.output_digest
    assert run(env).cached


def test_damaged_entry_is_detected_and_redone(env: dict[str, Path]) -> None:
    first = run(env)
    (first.path / "src" / "weights.bin").write_bytes(b"x" * 100)  # same size, other bytes
    again = run(env)
    assert not again.cached
    assert again.output_digest == first.output_digest
    assert (again.path / "src" / "weights.bin").read_bytes() == b"w" * 100

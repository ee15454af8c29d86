"""The package layout holds: each package imports only what the README's layout table allows (every import
statement, lazy ones inside functions included), and every registry agrees with the target vocabulary and with
``conf/``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from artifacts import targets
from tests.conftest import ROOT

pytestmark = pytest.mark.unit
KILN = {"artifacts", "build", "quantize", "compile", "runtime", "conf"}
# The README's layout table: which kiln packages each package may import (itself always).
MAY_IMPORT = {
    "artifacts": set(),
    "build": {"artifacts", "quantize", "compile", "conf"},
    "quantize": {"artifacts"},
    "compile": {"artifacts"},
    "runtime": {"artifacts"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_package_imports_only_what_the_layout_allows(package: str) -> None:
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = (imported_packages(path) & KILN) - MAY_IMPORT[package] - {package}
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert bad == {}, f"{package}/ may import only {sorted(MAY_IMPORT[package])}: {bad}"


def test_the_layout_check_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from build.errors import BuildError\n    import runtime.app\n")
    assert imported_packages(f) == {"build", "runtime"}


def test_every_runtime_engine_is_in_the_target_vocabulary() -> None:
    from runtime import engines

    assert set(engines.ENGINES) <= set(targets.ENGINES)
    assert engines.DEFAULT in engines.ENGINES
    for name in engines.ENGINES:
        spec = engines.get(name)
        assert spec.name == name
        for device, _scheme in spec.kernel_needs:
            assert device in targets.ENGINES[name].devices
        others = set().union(*(engines.get(o).lmi_names for o in engines.ENGINES if o != name))
        assert set(spec.lmi_names).isdisjoint(others)
        # what a build may record for the engine, the runtime engine runs
        assert set(spec.speculative_methods) <= set(targets.SPECULATIVE_METHODS)
        assert set(targets.ENGINES[name].speculative) <= set(spec.speculative_methods)


def test_quantizer_routes_produce_vocabulary_names() -> None:
    from quantize.config import Fp8Config, GptqConfig
    from quantize.registry import QUANTIZERS, UnsupportedError, plan

    produced = set()
    variants = [c() for c in (QUANTIZERS[m].config_cls for m in QUANTIZERS)]
    variants += [GptqConfig(bits=8), Fp8Config(activations="static")]
    for cfg in variants:
        for engine in QUANTIZERS[cfg.method].backends:
            assert engine in targets.ENGINES
            try:
                p = plan(cfg, engine)
            except UnsupportedError:
                continue
            assert p is not None
            assert set(p.devices) <= set(targets.ENGINES[engine].devices)
            produced.add(p.quantization)
    assert produced <= set(targets.QUANTIZATIONS)
    assert {"gptq-w4a16", "awq-w4a16", "smoothquant-w8a8", "fp8-dynamic", "fp8-static"} <= produced
    for (engine, scheme), where in targets.SCHEME_DEVICES.items():
        assert any(q.endswith(scheme) for q in targets.QUANTIZATIONS)
        assert set(where.devices) < set(targets.ENGINES[engine].devices)  # a narrowing, with its reason
        assert where.why


def test_compilers_target_vocabulary_engines() -> None:
    from compile.registry import COMPILERS

    assert {c.engine for c in COMPILERS.values()} - {None} <= set(targets.ENGINES)


def test_build_refuses_engines_outside_the_vocabulary(hydra: None) -> None:
    from hydra import compose

    from build.config import validate
    from build.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose("build", overrides=["target.engine=foo"]))
    assert ("target.engine", f"unknown engine 'foo'; known: {sorted(targets.ENGINES)}") in err.value.problems


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))

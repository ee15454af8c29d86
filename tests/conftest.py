"""Shared fixtures: an isolated kiln cache per test session, the tiny artifact built once, helpers to run the
CLIs in subprocesses and to start a real server on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.s3_server import fault_proxy, moto_s3  # noqa: F401  (S3 fixtures: a real S3 server on loopback)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def kiln_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point every kiln cache and store at a temporary directory for the whole session."""
    from build.toolchains import managed_root

    cache = tmp_path_factory.mktemp("kiln-cache")
    keys = ("KILN_CACHE", "KILN_STORE", "HF_HUB_OFFLINE", "KILN_LOG_FORMAT", "KILN_TOOLCHAINS_DIR")
    saved = {k: os.environ.get(k) for k in keys}
    # Toolchain environments are gigabytes: tests share the user's, created once, instead of one per session.
    os.environ.setdefault("KILN_TOOLCHAINS_DIR", str(managed_root()))
    os.environ.update(KILN_CACHE=str(cache), HF_HUB_OFFLINE="1", KILN_LOG_FORMAT="text")
    os.environ.pop("KILN_STORE", None)
    yield cache
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def hydra() -> Iterator[None]:
    """Hydra initialized on the real ``conf/`` with kiln's schemas registered, for ``compose``."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from build.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <args>`` from the repository root, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def build(*overrides: str, env: dict[str, str] | None = None) -> str:
    """Run a build; return the artifact URI (the last stdout line)."""
    proc = run_cli("build", *overrides, env=env)
    assert proc.returncode == 0, f"build failed:\n{proc.stderr}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def tiny_uri() -> str:
    return build()


@pytest.fixture(scope="session")
def tiny_hf_uri(tiny_uri: str) -> str:
    """The tiny model built for the transformers engine (target.engine=transformers)."""
    return build("target.engine=transformers", "model.name=tiny-llama-hf")


@pytest.fixture(scope="session")
def tiny_trained_uri() -> str:
    """The briefly trained tiny model (about 100 s of CPU training, once per session): peaked distributions."""
    proc = run_cli("build", "model=tiny_trained", timeout=1800)  # training: allow for a busy machine
    assert proc.returncode == 0, f"build failed:\n{proc.stderr}"
    return proc.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[str]
    base: str
    log: Path
    ping_codes: list[int]

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_server(
    model: str,
    tmp: Path,
    *extra: str,
    wait: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> Server:
    """Start ``python -m runtime serve`` on a free port; with ``wait`` poll /ping until 200 (recording codes)."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "serve", model, "--port", str(port), *extra],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log, [])
    if wait:
        wait_ready(server, timeout)
    return server


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.logs()[-5000:]}")
        try:
            code = httpx.get(server.base + "/ping", timeout=5).status_code
            server.ping_codes.append(code)
            if code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"server not ready after {timeout}s:\n{server.logs()[-5000:]}")

"""Shared by the start-up benchmarks: build the tiny artifacts, start a server with every log line time-stamped,
measure process start → first streamed token, and stop it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def run(*args: str, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """``python -m <args>`` from the repository root; returns (wall seconds, the completed process)."""
    start = time.monotonic()
    proc = subprocess.run([PY, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - start, proc


def build_tiny(cache: Path, *overrides: str) -> str:
    """Build the tiny artifact into a private kiln cache; return its URI."""
    _, proc = run("build", *overrides, env={**os.environ, "KILN_CACHE": str(cache)})
    return proc.stdout.strip().splitlines()[-1]


def pull(uri: str, cache: Path, dest: Path) -> Path:
    run("artifacts", "pull", uri, str(dest), env={**os.environ, "KILN_CACHE": str(cache)})
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_machine_env(base: Path, **extra: str) -> dict[str, str]:
    """Environment of a process on a machine that has never compiled anything: empty torch and vLLM caches."""
    d = Path(tempfile.mkdtemp(prefix="machine-", dir=base))
    env = {
        **os.environ,
        "HOME": str(d),
        "KILN_CACHE": str(d / "kiln"),
        "TORCHINDUCTOR_CACHE_DIR": str(d / "torchinductor"),
        "VLLM_CACHE_ROOT": str(d / "vllm"),
        "VLLM_LOGGING_LEVEL": "INFO",  # the phase markers below come from vLLM's INFO lines
        "KILN_LOG_FORMAT": "text",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        **extra,
    }
    env.pop("XDG_CACHE_HOME", None)
    return env


@dataclass
class Start:
    first_token_s: float
    ready_s: float
    lines: list[tuple[float, str]] = field(default_factory=list)

    def at(self, pattern: str) -> float | None:
        """Seconds after process start at which the first log line matching ``pattern`` appeared."""
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)


def start_and_first_token(cmd: list[str], env: dict[str, str], port: int, ping: str, timeout: float = 900) -> Start:
    """Start ``cmd``; time the first streamed token of a completion sent as soon as the server is ready."""
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        ready = _wait_ready(proc, base + ping, t0, timeout, lines)
        first = _first_token(base, t0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    return Start(first_token_s=first, ready_s=ready, lines=lines)


def _wait_ready(proc: subprocess.Popen[str], url: str, t0: float, timeout: float, lines: list) -> float:  # type: ignore[type-arg]
    # One client for every poll: httpx.get builds a client (and an SSL context) per call, which at this rate took
    # half a core from the server being measured on a 2-core machine.
    with httpx.Client(timeout=2) as client:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                errors = [line for _, line in lines if re.search(r"\w+(Error|Exception): ", line)]  # root causes
                tail = "\n".join([*errors[:10], "...", *(line for _, line in lines[-40:])])
                raise SystemExit(f"server exited with {proc.returncode}:\n{tail}")
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"server not ready after {timeout}s")


def _first_token(base: str, t0: float) -> float:
    """The moment the first streamed chunk carrying text arrives."""
    body = {"model": _model_id(base), "prompt": "Hello there", "max_tokens": 8, "stream": True, "temperature": 0}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.monotonic() - t0
    raise SystemExit("the stream ended without a token")


def _model_id(base: str) -> str:
    return str(httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"])


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# The engine arguments every start-up benchmark gives bare vLLM (kiln derives the same from the artifact).
VLLM_ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "32"]


def vllm_cmd(model: str, port: int, *extra: str) -> list[str]:
    """Bare vLLM's OpenAI server on ``model`` with the benchmarks' engine arguments."""
    return [
        PY,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--port",
        str(port),
        *VLLM_ENGINE_ARGS,
        "--kv-cache-memory-bytes",
        str(1 << 30),  # what kiln's runtime gives vLLM on CPU
        *extra,
    ]


def first_token_rows(starts: dict[str, list[Start]], ref: float, ratio_key: str) -> dict[str, object]:
    """Print one markdown row per way (median, runs, ratio to ``ref``); return them for the JSON report."""
    out: dict[str, object] = {}
    for name, runs in starts.items():
        m = median([s.first_token_s for s in runs])
        print(f"| {name} | {m:.1f} | {', '.join(f'{s.first_token_s:.1f}' for s in runs)} | {m / ref:.2f}x |")
        out[name] = {"first_token_s": [s.first_token_s for s in runs], "median_s": m, ratio_key: m / ref}
    return out

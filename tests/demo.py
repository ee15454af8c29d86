"""The README's main job: build the tiny default artifact, serve it, ask one chat question, print the answer.

Run it with ``nox -s demo`` (which sets up everything); extra arguments are build overrides, e.g.
``nox -s demo -- model=tiny_trained`` for the briefly trained model, whose answers make sense.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What color is the sky?"


def main(overrides: list[str]) -> int:
    t0 = time.monotonic()
    print(f"1/3 building: python -m build {' '.join(overrides)}", flush=True)
    built = subprocess.run([sys.executable, "-m", "build", *overrides], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if built.returncode != 0:
        return built.returncode
    uri = built.stdout.strip().splitlines()[-1]
    t1 = time.monotonic()
    print(f"    built in {t1 - t0:.1f}s: {uri}", flush=True)
    port = 8080 if _port_free(8080) else _any_port()
    print(f"2/3 serving: python -m runtime serve {uri} --port {port}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "runtime", "serve", uri, "--port", str(port)], cwd=ROOT)
    try:
        if not _wait_ready(server, f"http://127.0.0.1:{port}/ping", timeout=900):
            return 1
        t2 = time.monotonic()
        print(f"    ready in {t2 - t1:.1f}s", flush=True)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        name = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0
        )
        print(f"3/3 asked {name}: {QUESTION!r}\n    answer: {reply.choices[0].message.content!r}")
        print(f"\nartifact: {uri}\ninspect it: python -m artifacts show {uri}")
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def _wait_ready(server: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            print(f"server exited with code {server.returncode}", file=sys.stderr)
            return False
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(1)
    print(f"server not ready after {timeout:.0f}s", file=sys.stderr)
    return False


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _any_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

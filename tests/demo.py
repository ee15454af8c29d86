"""The README's main job: build the briefly trained tiny model into an artifact, serve it, ask it one chat question,
print the answer, stop the server cleanly.

Run it with ``nox -s demo`` (which sets up everything); extra arguments are build overrides, e.g.
``nox -s demo -- model=tiny`` for the untrained model (seconds to build, gibberish answers). The server's own output
goes to a log file named in the transcript; the engine's goes to the engine log the server names there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What color is the sky?"
DEFAULT = ["model=tiny_trained"]


def main(overrides: list[str]) -> int:
    overrides = overrides or DEFAULT
    print("kiln demo: build an artifact, serve it, ask it a question\n", flush=True)
    t0 = time.monotonic()
    print(f"1/3 build   python -m build {' '.join(overrides)}", flush=True)
    if "model=tiny_trained" in overrides:
        print("            (the first time, the tiny model trains on the CPU for about two minutes)", flush=True)
    built = subprocess.run([sys.executable, "-m", "build", *overrides], cwd=ROOT, capture_output=True, text=True)
    if built.returncode != 0:
        print(built.stderr, file=sys.stderr)
        return built.returncode
    uri = built.stdout.strip().splitlines()[-1]
    summary = next((ln for ln in built.stderr.splitlines() if ln.startswith("built ")), "")
    print(f"            {summary}\n            artifact {uri}", flush=True)
    port = 8080 if _port_free(8080) else _any_port()
    log = Path(tempfile.mkdtemp(prefix="kiln-demo-")) / "server.log"
    print(f"2/3 serve   python -m runtime serve {uri} --port {port}", flush=True)
    t1 = time.monotonic()
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "runtime", "serve", uri, "--port", str(port)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KILN_LOG_FORMAT": "text"},
        )
    code = 1
    try:
        if not _wait_ready(server, f"http://127.0.0.1:{port}/ping", timeout=900):
            print(log.read_text()[-3000:], file=sys.stderr)
            return 1
        print(f"            ready in {time.monotonic() - t1:.0f}s (server log: {log})", flush=True)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        name = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0
        )
        print(f"3/3 ask     {name}: {QUESTION!r}", flush=True)
        print(f"            answer: {reply.choices[0].message.content!r}", flush=True)
        code = 0
    finally:
        server.send_signal(signal.SIGTERM)
        stopped = server.wait(timeout=120)
    if stopped != 0:
        print(f"the server exited with {stopped} on SIGTERM:\n{log.read_text()[-3000:]}", file=sys.stderr)
        return 1
    print(f"\ndone in {time.monotonic() - t0:.0f}s; the server drained and exited 0")
    print(f"inspect the artifact: python -m artifacts show {uri}")
    return code


def _wait_ready(server: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            print(f"the server exited with code {server.returncode}", file=sys.stderr)
            return False
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(1)
    print(f"the server was not ready after {timeout:.0f}s", file=sys.stderr)
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _any_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

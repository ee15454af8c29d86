"""What ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` costs or saves under load: ``python -m runtime serve`` of the compiled
tiny artifact with vLLM's default process layout on CPU (API process, engine core process, worker process) and
with the worker inside the engine core process (``=0``).

    python -m tests.bench.multiproc_load [--rounds 2] [--clients 64] [--requests 256] [--tokens 64]

Streaming ``/v1/completions`` from concurrent clients (ignore_eos, fixed length), the client on the same cores.
Reports output tokens/s, time to first token (median, p90) and the server's start → first token, per layout,
rounds interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.bench._serve import (
    PY,
    ROOT,
    build_tiny,
    free_port,
    fresh_machine_env,
    median,
    pull,
    start_and_first_token,
)

LAYOUTS = {
    "engine core + worker processes (default)": {},
    "worker in engine core (=0)": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-mp-"))
    try:
        cache = work / "build-cache"
        model = pull(build_tiny(cache, "compile=vllm"), cache, work / "tiny")
        rows: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in LAYOUTS}
        for r in range(args.rounds):
            for name, extra in LAYOUTS.items():
                env = fresh_machine_env(work, **extra)
                port = free_port()
                start = start_and_first_token(_serve(model, port), env, port, "/ping").first_token_s
                tps, ttft50, ttft90 = _load(model, env, args)
                rows[name].append((start, tps, ttft50, ttft90))
                print(f"round {r + 1}: {name}: {tps:.0f} tok/s, ttft p50 {ttft50:.2f}s, start {start:.1f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n| layout ({args.clients} clients, {args.requests} x {args.tokens} tokens) | output tok/s | TTFT p50 s "
        "| TTFT p90 s | start -> first token s |\n|---|---|---|---|---|"
    )
    figures = {}
    for name, runs in rows.items():
        cols = [median([run[i] for run in runs]) for i in range(4)]
        print(f"| {name} | {cols[1]:.0f} | {cols[2]:.2f} | {cols[3]:.2f} | {cols[0]:.1f} |")
        figures[name] = dict(zip(("first_token_s", "output_throughput", "ttft_p50_s", "ttft_p90_s"), cols, strict=True))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def _serve(model: Path, port: int) -> list[str]:
    return [PY, "-m", "runtime", "serve", str(model), "--port", str(port)]


def _load(model: Path, env: dict[str, str], args: argparse.Namespace) -> tuple[float, float, float]:
    """Start a server (its cache copy is warm from the start just measured), drive it, stop it."""
    port = free_port()
    proc = subprocess.Popen(
        _serve(model, port), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        return asyncio.run(_drive(base, args))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


async def _drive(base: str, args: argparse.Namespace) -> tuple[float, float, float]:
    model_id = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    body = {
        "model": model_id,
        "prompt": "Once upon a time",
        "max_tokens": args.tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    ttfts: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            queue.get_nowait()
            sent = time.monotonic()
            first = None
            async with http.stream("POST", base + "/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
                    elif first is None and chunk["choices"] and chunk["choices"][0].get("text"):
                        first = time.monotonic() - sent
            ttfts.append(first or 0.0)

    start = time.monotonic()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
    elapsed = time.monotonic() - start
    ttfts.sort()
    return tokens / elapsed, median(ttfts), ttfts[int(len(ttfts) * 0.9)]


if __name__ == "__main__":
    main()

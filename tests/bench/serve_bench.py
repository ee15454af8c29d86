"""``nox -s bench``: the same streaming load against vLLM's own OpenAI server and ``python -m runtime serve``, on
the same weights and engine settings, in one run; then the transformers engine's throughput on the same load.

Both vLLM-backed servers run side by side and the measured rounds alternate between them (which goes first
alternates too), so drift in the machine's load hits both alike. Reported as kiln/vLLM ratios: request and output
token throughput (targets >= 0.97), TTFT p50 (target <= 1.05), p90, p99 and inter-token latency p50/p90/p99; and
the CPU time the server's own process (HTTP, formatting, detokenization; not the engine core) spends per output
token, which is kiln's per-token overhead measured directly and barely moved by other load on the machine.

    python -m tests.bench.serve_bench [--requests 256] [--concurrency 64] [--max-tokens 64] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from tests.bench import load

ROOT = Path(__file__).resolve().parents[2]
MAX_NUM_SEQS = 64
KV_BYTES = 1 << 30
TARGETS = {"request_throughput": 0.97, "output_throughput": 0.97, "ttft_p50_ms": 1.05}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(*overrides: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "build", *overrides], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"build failed:\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


def pull(uri: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "artifacts", "pull", uri, str(dest)], cwd=ROOT, check=True)
    return dest


class Proc:
    def __init__(self, name: str, cmd: list[str], health: str, logs: Path) -> None:
        self.name, self.health = name, health
        self.log = logs / f"{name}.log"
        with open(self.log, "w") as out:
            self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.health, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise SystemExit(f"{self.name} not ready after {timeout}s")

    def cpu_seconds(self) -> float:
        """CPU time of the server process itself (its engine core runs in child processes, not counted)."""
        t = psutil.Process(self.p.pid).cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.p.kill()


def vllm_server(model_dir: Path, name: str, logs: Path) -> tuple[Proc, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-memory-bytes", str(KV_BYTES),
        "--dtype", "bfloat16", "--max-model-len", "2048", "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    return Proc("vllm", cmd, base + "/health", logs), base


def kiln_server(model: str, name: str, logs: Path, *extra: str) -> tuple[Proc, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "runtime", "serve", model, "--port", str(port),
        "--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-gib", str(KV_BYTES / (1 << 30)),
        "--job-queue-size", "100000", *extra,
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    return Proc(name, cmd, base + "/ping", logs), base


def measure(base: str, model: str, args: argparse.Namespace, requests: int, seed: int) -> load.Run:
    return asyncio.run(load.run(base, model, requests, args.concurrency, args.max_tokens, seed=seed))


def compare(args: argparse.Namespace, model_dir: Path, logs: Path) -> dict[str, dict[str, float]]:
    (vp, vbase), (kp, kbase) = vllm_server(model_dir, "tiny-llama", logs), kiln_server(str(model_dir), "kiln", logs)
    try:
        for p in (vp, kp):
            p.wait_ready()
        log("both servers ready; warming up")
        for base in (vbase, kbase):
            measure(base, "tiny-llama", args, args.concurrency, seed=99)
        runs = {"vllm": load.Run(), "kiln": load.Run()}
        cpu = {"vllm": 0.0, "kiln": 0.0}
        rounds: dict[str, list[float]] = {"vllm": [], "kiln": []}
        for r in range(args.rounds):
            order = [("vllm", vp, vbase), ("kiln", kp, kbase)]
            for name, proc, base in order if r % 2 == 0 else order[::-1]:
                before = proc.cpu_seconds()
                run = measure(base, "tiny-llama", args, args.requests, seed=r)
                cpu[name] += proc.cpu_seconds() - before
                rounds[name].append(run.summary()["output_throughput"])
                log(f"round {r + 1}/{args.rounds} {name}: {rounds[name][-1]:.0f} tok/s")
                runs[name].merge(run)
        out = {}
        for name, run in runs.items():
            tokens = sum(x.tokens for x in run.results)
            if run.errors:
                log(f"{name} failures (first {len(run.errors)}): {run.errors}")
            out[name] = run.summary() | {
                "server_cpu_us_per_token": 1e6 * cpu[name] / tokens if tokens else float("nan"),
                "round_min_tok_s": min(rounds[name]),
                "round_max_tok_s": max(rounds[name]),
            }
        return out
    finally:
        for p in (vp, kp):
            p.stop()


def transformers_engine(args: argparse.Namespace, logs: Path) -> dict[str, float]:
    uri = build("target.engine=transformers", "model.name=tiny-llama-hf")
    proc, base = kiln_server(uri, "kiln-transformers", logs)
    try:
        proc.wait_ready()
        measure(base, "tiny-llama-hf", args, args.concurrency // 4, seed=99)
        return measure(base, "tiny-llama-hf", args, args.hf_requests, seed=0).summary()
    finally:
        proc.stop()


def report(results: dict[str, dict[str, float]], hf: dict[str, float] | None, args: argparse.Namespace) -> str:
    v, k = results["vllm"], results["kiln"]
    lines = [
        f"load: {args.rounds} x {args.requests} requests, {args.concurrency} concurrent streams, "
        f"{args.max_tokens} output tokens (ignore_eos), /v1/completions streaming",
        f"{'metric':<24}{'vLLM':>12}{'kiln':>12}{'kiln/vLLM':>12}  target",
    ]
    keys = (
        "request_throughput",
        "output_throughput",
        *(f"{m}_p{q}_ms" for m in ("ttft", "itl") for q in (50, 90, 99)),
        "server_cpu_us_per_token",
    )
    for key in keys:
        ratio = k[key] / v[key] if v[key] else float("nan")
        target = TARGETS.get(key)
        mark = "" if target is None else (f">= {target}" if "throughput" in key else f"<= {target}")
        ok = (
            ""
            if target is None
            else ("  ok" if (ratio >= target if "throughput" in key else ratio <= target) else "  MISS")
        )
        lines.append(f"{key:<24}{v[key]:>12.2f}{k[key]:>12.2f}{ratio:>12.3f}  {mark}{ok}")
    lines.append(
        f"output tok/s per round: vLLM {v['round_min_tok_s']:.0f}-{v['round_max_tok_s']:.0f}, "
        f"kiln {k['round_min_tok_s']:.0f}-{k['round_max_tok_s']:.0f}; "
        f"failures: vLLM {v['failures']:.0f}, kiln {k['failures']:.0f}"
    )
    if hf is not None:
        lines.append(
            f"transformers engine ({args.hf_requests} requests): {hf['output_throughput']:.1f} output tok/s, "
            f"{hf['request_throughput']:.2f} req/s, TTFT p50 {hf['ttft_p50_ms']:.0f} ms, failures {hf['failures']:.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256, help="requests per round and server")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hf-requests", type=int, default=256, help="requests for the transformers engine (0: skip)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        logs = Path(tmp)
        os.environ.setdefault("KILN_CACHE", str(logs / "cache"))
        log(f"building the tiny artifact (cache {os.environ['KILN_CACHE']})")
        model_dir = pull(build(), logs / "model")
        results = compare(args, model_dir, logs)
        hf = transformers_engine(args, logs) if args.hf_requests else None
    text = report(results, hf, args)
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps({"vllm": results["vllm"], "kiln": results["kiln"], "transformers": hf}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

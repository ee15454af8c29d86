"""``nox -s bench -- serve``: kiln's server beside vLLM's own OpenAI server, on the same weights and engine settings, in
one run, loaded by vLLM's own client (``vllm bench serve``); and the same engine offline (``vllm bench throughput``).

- Both servers run side by side. Rounds alternate between them (which goes first alternates too), at each
  concurrency of the sweep, so drift in the machine's load hits both alike.
- The workload is the common shape: random prompts, a fixed output length with ``ignore_eos``, streaming
  ``/v1/completions``, closed loop at each concurrency.
- Reported per concurrency:
  - throughput and TTFT/ITL percentiles for each server, and kiln/vLLM ratios with their spread over rounds;
  - peak RSS of each server's process tree under that load;
  - the CPU time the server's own process spends per output token (HTTP, formatting, detokenization; not the
    engine core).
- At the top concurrency, each server's throughput against the engine offline on the same work ("moonshot 2":
  kiln/offline ≥ 0.8).
- The transformers engine's throughput at the top concurrency follows, unless ``--hf-requests 0``.

    python -m tests.bench.serve_bench [--concurrency 1,8,32,64] [--rounds 2] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.bench import vllm_client

ROOT = Path(__file__).resolve().parents[2]
MAX_NUM_SEQS = 64
KV_BYTES = 1 << 30
MAX_MODEL_LEN = 2048
SERVERS = ("vllm", "kiln")
TARGETS = {"output_throughput": 0.97, "p50_ttft_ms": 1.05}  # kiln/vLLM at every concurrency
OFFLINE_TARGET = 0.8  # kiln's HTTP throughput / the engine offline


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
        with httpx.Client(timeout=5) as client:  # one client: a new one per poll costs the servers CPU
            while time.monotonic() < deadline:
                if self.p.poll() is not None:
                    raise SystemExit(f"{self.name} exited:\n{self.log.read_text()[-4000:]}")
                try:
                    if client.get(self.health).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(1)
        raise SystemExit(f"{self.name} not ready after {timeout}s")

    def cpu_seconds(self) -> float:
        """CPU time of the server process itself (its engine core runs in child processes, not counted)."""
        t = psutil.Process(self.p.pid).cpu_times()
        return float(t.user + t.system)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of each process in the server's tree, by role (:func:`tree_roles`)."""
        return tree_roles(psutil.Process(self.p.pid))

    def tree_rss(self) -> int:
        """Resident memory of the server and all its children (engine core, workers), bytes."""
        root = psutil.Process(self.p.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess):  # a child that just exited
                total += proc.memory_info().rss
        return total

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.p.kill()


@contextmanager
def peak_rss(proc: Proc, every: float = 0.25) -> Iterator[list[int]]:
    """Samples the process tree's RSS while the block runs; the list holds the peak afterwards."""
    peak = [proc.tree_rss()]

    def sample() -> None:
        peak[0] = max(peak[0], proc.tree_rss())

    with _every(every, sample):
        yield peak


@contextmanager
def _every(every: float, sample: Callable[[], None]) -> Iterator[None]:
    """Calls ``sample`` on a background thread at once and then every ``every`` seconds while the block runs."""
    done = threading.Event()

    def loop() -> None:
        sample()
        while not done.wait(every):
            sample()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def engine_flags() -> list[str]:
    """The engine settings both servers and the offline run share (vLLM's flag names)."""
    return ["--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-memory-bytes", str(KV_BYTES), "--dtype", "bfloat16",
            "--max-model-len", str(MAX_MODEL_LEN)]  # fmt: skip


def vllm_server(model_dir: Path, name: str, logs: Path) -> tuple[Proc, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *engine_flags(),
           "--uvicorn-log-level", "warning"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    return Proc("vllm", cmd, base + "/health", logs), base


def kiln_server(model: str, name: str, logs: Path, *extra: str) -> tuple[Proc, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "runtime", "serve", model, "--port", str(port),
           "--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-gib", str(KV_BYTES / (1 << 30)),
           "--max-model-len", str(MAX_MODEL_LEN), "--job-queue-size", "100000", *extra]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    return Proc(name, cmd, base + "/ping", logs), base


def workload(args: argparse.Namespace, concurrency: int, seed: int, requests: int | None = None) -> list[str]:
    n = requests or max(args.min_requests, args.requests_per_stream * concurrency)
    shape = {"num-prompts": n, "random-input-len": args.input_len, "random-output-len": args.max_tokens,
             "max-concurrency": concurrency, "seed": seed}  # fmt: skip
    return [*(x for k, v in shape.items() for x in (f"--{k}", str(v))), "--ignore-eos"]


def load(proc: Proc, base: str, model: str, tokenizer: Path, flags: list[str]) -> dict[str, Any]:
    """One ``vllm bench serve`` run, with the server's CPU time and peak RSS over it, and where the machine's CPU
    went while the server was busy (moonshot 2's question): see :func:`busy_shares`."""
    before = proc.cpu_seconds()
    with peak_rss(proc) as peak, cpu_samples(server_roles(proc)) as samples:
        figures = vllm_client.run(base, model, tokenizer, *flags)
    cpu = proc.cpu_seconds() - before
    tokens = figures["total_output_tokens"]
    return figures | {
        "server_cpu_us_per_token": 1e6 * cpu / tokens if tokens else None,
        "peak_rss_bytes": peak[0],
        "cpu_share": busy_shares(samples),
    }


CLIENT_MODULE = "tests.bench.vllm_client"  # how vLLM's benchmark processes are told from the servers'


def tree_roles(root: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of each process in a vLLM process tree, by role: ``api``, the root (a server's HTTP
    process, kiln's or vLLM's; offline, the process calling ``LLM.generate``), vLLM's engine core, its worker."""
    out = {"api": 0.0, "engine_core": 0.0, "worker": 0.0}
    with suppress(psutil.NoSuchProcess):
        for proc in [root, *root.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess):
                t = proc.cpu_times()
                name = " ".join(proc.cmdline()[:1]) + proc.name()
                role = "api" if proc.pid == root.pid else "engine_core" if "EngineCore" in name else "worker"
                out[role] += float(t.user + t.system)
    return out


def _benchmark_children() -> list[psutil.Process]:
    return [c for c in psutil.Process().children() if CLIENT_MODULE in " ".join(_cmdline(c))]


def server_roles(proc: Proc) -> Callable[[], dict[str, float]]:
    """The server's roles and the load client's CPU (the ``vllm bench serve`` child of this process)."""
    client: list[psutil.Process] = []

    def roles() -> dict[str, float]:
        client.extend([] if client else _benchmark_children())
        used = 0.0
        for c in client:
            with suppress(psutil.NoSuchProcess):
                t = c.cpu_times()
                used += float(t.user + t.system)
        return proc.cpu_by_role() | {"client": used}

    return roles


def offline_roles() -> Callable[[], dict[str, float]]:
    """The roles of the ``vllm bench throughput`` child of this process: the same engine with no server."""
    root: list[psutil.Process] = []

    def roles() -> dict[str, float]:
        root.extend([] if root else _benchmark_children())
        return tree_roles(root[0]) if root else {}

    return roles


@contextmanager
def cpu_samples(roles: Callable[[], dict[str, float]], every: float = 0.1) -> Iterator[list[dict[str, float]]]:
    """Samples, while the block runs, the cumulative CPU seconds of each role and of the whole machine (busy, not
    idle or waiting), with the time of each sample. A role keeps what it had used once its processes exit."""
    samples: list[dict[str, float]] = []
    seen: dict[str, float] = {}

    def sample() -> None:
        m = psutil.cpu_times()
        for role, used in roles().items():
            seen[role] = max(seen.get(role, 0.0), used)
        busy = sum(m) - m.idle - getattr(m, "iowait", 0.0)
        samples.append({"t": time.monotonic(), "api": 0.0, "engine_core": 0.0, "worker": 0.0} | seen
                       | {"machine": busy})  # fmt: skip

    with _every(every, sample):
        yield samples


def _cmdline(p: psutil.Process) -> list[str]:
    with suppress(psutil.Error):
        return p.cmdline()
    return []


def busy_shares(samples: list[dict[str, float]], gap: float = 1.0, last_s: float | None = None) -> dict[str, float]:
    """Each role's share of all cores over the stretch in which the server's engine was busy: the longest run of
    sample intervals in which its engine core and worker used at least a quarter of their usual busy rate (the
    90th percentile), with pauses of at most ``gap`` seconds. The client's own start (importing vLLM, building
    prompts: 15 s of a core here) falls outside, where the server idles, and so does the end of any earlier load.
    ``machine`` is all that ran: the roles, this bench's own process, anything else. ``last_s``: only the last
    seconds of that stretch count (offline, the engine's start, compiling and warming up, is busy too)."""
    engine = [b["engine_core"] + b["worker"] - a["engine_core"] - a["worker"] for a, b in pairwise(samples)]
    rates = sorted(e / (b["t"] - a["t"]) for e, (a, b) in zip(engine, pairwise(samples), strict=True))
    if not rates or rates[int(0.9 * (len(rates) - 1))] <= 0:
        return {}
    floor = 0.25 * rates[int(0.9 * (len(rates) - 1))]
    busy = [
        i for i, (e, (a, b)) in enumerate(zip(engine, pairwise(samples), strict=True)) if e >= floor * (b["t"] - a["t"])
    ]
    runs: list[list[int]] = [[busy[0]]]
    for i in busy[1:]:
        if samples[i]["t"] - samples[runs[-1][-1] + 1]["t"] <= gap:
            runs[-1].append(i)
        else:
            runs.append([i])
    run = max(runs, key=lambda r: sum(engine[i] for i in r))
    first, last = samples[run[0]], samples[run[-1] + 1]
    if last_s is not None:
        first = max((x for x in samples if x["t"] <= last["t"] - last_s), key=lambda x: x["t"], default=first)
    capacity = (last["t"] - first["t"]) * (os.cpu_count() or 1)
    return {r: (last[r] - first[r]) / capacity for r in last if r != "t"} | {"window_s": last["t"] - first["t"]}


KEYS = ("request_throughput", "output_throughput", "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
        "p50_itl_ms", "p90_itl_ms", "p99_itl_ms", "failed", "server_cpu_us_per_token", "peak_rss_bytes",
        "cpu_share")  # fmt: skip


def sweep(args: argparse.Namespace, model_dir: Path, logs: Path) -> dict[str, Any]:
    vp, vbase = vllm_server(model_dir, "tiny-llama", logs)
    kp, kbase = kiln_server(str(model_dir), "kiln", logs, "--served-model-name", "tiny-llama")
    procs = {"vllm": (vp, vbase), "kiln": (kp, kbase)}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {s: {c: [] for c in args.concurrency} for s in SERVERS}
    try:
        for p, _ in procs.values():
            p.wait_ready()
        log("both servers ready; warming up (not measured)")
        for _, base in procs.values():
            vllm_client.run(base, "tiny-llama", model_dir, *workload(args, 8, seed=99, requests=16))
        for r in range(args.rounds):
            for c in args.concurrency:
                order = list(SERVERS) if (r + args.concurrency.index(c)) % 2 == 0 else list(SERVERS)[::-1]
                for name in order:
                    proc, base = procs[name]
                    result = load(proc, base, "tiny-llama", model_dir, workload(args, c, seed=r))
                    runs[name][c].append({k: result.get(k) for k in KEYS})
                    log(f"round {r + 1}/{args.rounds} c={c} {name}: {result['output_throughput']:.0f} tok/s, "
                        f"TTFT p50 {result['p50_ttft_ms']:.0f} ms")  # fmt: skip
    finally:
        for p, _ in procs.values():
            p.stop()
    return {"runs": {s: {str(c): v for c, v in per.items()} for s, per in runs.items()}}


def offline(args: argparse.Namespace, model_dir: Path, rounds: int) -> list[dict[str, float]]:
    """``LLM.generate`` on the top concurrency's work (same prompts' shape, same engine settings)."""
    top = max(args.concurrency)
    n = max(args.min_requests, args.requests_per_stream * top)
    out = []
    for r in range(rounds):
        with cpu_samples(offline_roles()) as samples:
            figures = vllm_client.offline(
                "--model", str(model_dir), *engine_flags(), "--num-prompts", str(n), "--random-input-len",
                str(args.input_len), "--random-output-len", str(args.max_tokens), "--seed", str(r),
            )  # fmt: skip
        out.append(figures | {"cpu_share": busy_shares(samples, last_s=figures["elapsed_time"])})
        log(f"offline round {r + 1}/{rounds}: {figures['output_tokens_per_second']:.0f} output tok/s")
    return out


def transformers_engine(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    uri = build("target.engine=transformers", "model.name=tiny-llama-hf")
    proc, base = kiln_server(uri, "tiny-llama-hf", logs)
    model_dir = pull(uri, logs / "model-hf")
    try:
        proc.wait_ready()
        top = max(args.concurrency)
        result = load(proc, base, "tiny-llama-hf", model_dir, workload(args, top, seed=0, requests=args.hf_requests))
        return {k: result.get(k) for k in KEYS}
    finally:
        proc.stop()


def summarize(results: dict[str, Any], concurrency: list[int]) -> dict[str, Any]:
    """Per concurrency: each server's mean over rounds, and kiln/vLLM ratios with the spread of per-round ratios."""
    runs = results["runs"]
    table: dict[str, Any] = {}
    for c in map(str, concurrency):
        row: dict[str, Any] = {}
        for s in SERVERS:
            row[s] = {k: _mean([r.get(k) for r in runs[s][c]]) for k in KEYS}
        for k in ("output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "peak_rss_bytes"):
            per_round = [
                k_ / v_ for k_, v_ in zip(_col(runs, "kiln", c, k), _col(runs, "vllm", c, k), strict=True) if v_
            ]
            row[f"ratio_{k}"] = {"mean": _mean(per_round), "min": min(per_round), "max": max(per_round)}
        table[c] = row
    out: dict[str, Any] = {"by_concurrency": table}
    if results.get("offline"):
        off = [o["output_tokens_per_second"] for o in results["offline"]]
        top = str(max(concurrency))
        out["offline_output_throughput"] = {"mean": _mean(off), "min": min(off), "max": max(off)}
        out["offline_cpu_share"] = _mean([o.get("cpu_share") or None for o in results["offline"]])
        for s in SERVERS:
            out[f"{s}_over_offline"] = table[top][s]["output_throughput"] / _mean(off)
    return out


def _col(runs: dict[str, Any], server: str, c: str, key: str) -> list[float]:
    return [r[key] for r in runs[server][c]]


def _mean(values: list[Any]) -> Any:
    """The mean of numbers, or of dicts of numbers key by key (the CPU shares); None where there are none."""
    values = [v for v in values if v is not None]
    if values and isinstance(values[0], dict):
        return {k: _mean([v.get(k) for v in values]) for k in values[0]}
    return sum(values) / len(values) if values else None


def cpu_line(row: dict[str, Any], c: str, offline: dict[str, float] | None = None) -> str | None:
    """Where the machine's CPU went at concurrency ``c`` while each server's engine was busy (:func:`busy_shares`):
    each server's processes, the load client and the whole machine; and the engine offline on the same work."""
    parts = []
    for name, share in [*((s, row[s].get("cpu_share")) for s in SERVERS), ("offline", offline)]:
        if share and "machine" in share:
            roles = ", ".join(
                f"{r} {100 * share[r]:.0f}%" for r in ("api", "engine_core", "worker", "client") if r in share
            )
            parts.append(f"{name}: {roles}, all {100 * share['machine']:.0f}% (over {share['window_s']:.0f} s)")
    return f"CPU at {c} streams, share of all cores while the engine was busy: " + "; ".join(parts) if parts else None


def report(doc: dict[str, Any]) -> str:
    s, args = doc["summary"], doc["config"]
    lines = [
        f"load: vllm bench serve, {args['rounds']} rounds, random {args['input_len']} in / {args['max_tokens']} out "
        "(ignore_eos), /v1/completions streaming, closed loop",
        f"{'conc':>5} {'vLLM tok/s':>11} {'kiln tok/s':>11} {'ratio':>14} {'TTFT p50 ratio':>16} {'RSS MiB v/k':>13}",
    ]
    for c, row in s["by_concurrency"].items():
        t, f = row["ratio_output_throughput"], row["ratio_p50_ttft_ms"]
        rss = f"{row['vllm']['peak_rss_bytes'] / 2**20:.0f}/{row['kiln']['peak_rss_bytes'] / 2**20:.0f}"
        lines.append(
            f"{c:>5} {row['vllm']['output_throughput']:>11.0f} {row['kiln']['output_throughput']:>11.0f} "
            f"{t['mean']:>6.3f} ({t['min']:.2f}-{t['max']:.2f}) {f['mean']:>8.3f} ({f['min']:.2f}-{f['max']:.2f}) "
            f"{rss:>13}"
        )
    top = max(s["by_concurrency"], key=int)
    if (line := cpu_line(s["by_concurrency"][top], top, s.get("offline_cpu_share"))) is not None:
        lines.append(line)
    if "offline_output_throughput" in s:
        off = s["offline_output_throughput"]
        lines.append(
            f"offline LLM.generate: {off['mean']:.0f} output tok/s ({off['min']:.0f}-{off['max']:.0f}); "
            f"kiln/offline {s['kiln_over_offline']:.2f} (target >= {OFFLINE_TARGET}), "
            f"vLLM server/offline {s['vllm_over_offline']:.2f}"
        )
    if doc.get("transformers"):
        hf = doc["transformers"]
        lines.append(
            f"transformers engine: {hf['output_throughput']:.0f} output tok/s, TTFT p50 {hf['p50_ttft_ms']:.0f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated closed-loop concurrencies")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests-per-stream", type=int, default=4, help="requests per concurrent stream and round")
    p.add_argument("--min-requests", type=int, default=32, help="at least this many requests per point")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--offline-rounds", type=int, default=2)
    p.add_argument("--hf-requests", type=int, default=128, help="requests for the transformers engine (0: skip)")
    p.add_argument("--quick", action="store_true", help="a few minutes: concurrency 1,64, one round, no transformers")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.rounds, args.offline_rounds, args.hf_requests = "1,64", 1, 1, 0
        args.min_requests = 16
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        logs = Path(tmp)
        os.environ.setdefault("KILN_CACHE", str(logs / "cache"))
        log(f"building the tiny artifact (cache {os.environ['KILN_CACHE']})")
        model_dir = pull(build(), logs / "model")
        results = sweep(args, model_dir, logs)
        results["offline"] = offline(args, model_dir, args.offline_rounds) if args.offline_rounds else []
        hf = transformers_engine(args, logs) if args.hf_requests else None
    names = ("concurrency", "rounds", "requests_per_stream", "min_requests", "input_len", "max_tokens",
             "offline_rounds", "hf_requests", "quick")  # fmt: skip
    config = {k: getattr(args, k) for k in names}
    config |= {"max_num_seqs": MAX_NUM_SEQS, "kv_cache_bytes": KV_BYTES, "client": "vllm bench serve"}
    doc = {"config": config, **results, "transformers": hf, "summary": summarize(results, args.concurrency)}
    doc["targets"] = {"output_throughput": TARGETS["output_throughput"], "p50_ttft_ms": TARGETS["p50_ttft_ms"],
                      "kiln_over_offline": OFFLINE_TARGET}  # fmt: skip
    print(report(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

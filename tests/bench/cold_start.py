"""Cold start of the tiny artifact: ``python -m runtime serve`` with the packaged compile cache, without it, and
bare ``python -m vllm.entrypoints.openai.api_server`` on the same weights, in the same run.

    python -m tests.bench.cold_start [--rounds 2] [--json results.json]

The packaged cache holds vLLM's AOT function (loaded through kiln's guards, runtime/engines/vllm/patches.py); the
variant built with ``compile.aot=false`` holds inductor's cache only, as before the guards. Every start is a new
process on a "new machine" (empty torch inductor, vLLM and kiln caches), as a fresh
container would be, except "bare vLLM, warm cache", which reuses vLLM's own caches from an earlier start on this
machine. The figure is process start → first streamed token of a completion sent as soon as the server is ready.
Variants run interleaved, round after round; medians are reported, with the ratio to bare vLLM. Then the phases
of one start of each kind, from the moments its log lines appeared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from tests.bench._serve import (
    PY,
    Start,
    build_tiny,
    first_token_rows,
    free_port,
    fresh_machine_env,
    median,
    pull,
    start_and_first_token,
    vllm_cmd,
)

KILN_ENV = {"KILN_ENGINE_LOG": "-"}  # vLLM's lines on kiln's output, where the phases below are read from
KILN_COLD = "kiln serve, packaged cache"  # the moonshot's figure (tests/bench/report.py reads it by this name)
PHASES = [  # (label, log pattern): the moment each phase ends
    ("runtime imported, artifact verified", r"kiln\.runtime: verified"),
    ("host + compile key checked, cache copied, HTTP up", r"kiln\.runtime: listening"),
    ("vLLM imported, engine config built (API process)", r"Resolved architecture"),
    ("engine core process started (spawned: imports vLLM again)", r"\(EngineCore pid="),
    ("worker process started (spawned: imports vLLM again)", r"\((VllmWorker|Worker)[^)]* pid="),
    ("weights loaded", r"Loading weights took"),
    ("torch.compile: compiled or loaded from cache", r"Warming up done"),
    ("KV cache allocated, engine ready", r"init engine \(profile, create kv cache, warmup model\) took"),
    ("server ready", r"kiln\.runtime: ready|Application startup complete"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one round")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if args.quick:
        args.rounds = 1
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-cold-"))
    try:
        results = bench(work, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def bench(work: Path, rounds: int) -> dict[str, object]:
    cache = work / "build-cache"
    plain = pull(build_tiny(cache), cache, work / "tiny-plain")
    compiled = pull(build_tiny(cache, "compile=vllm"), cache, work / "tiny-compiled")
    # before kiln's AOT guards (runtime/engines/vllm/patches.py): inductor's cache only
    inductor_only = pull(build_tiny(cache, "compile=vllm", "compile.aot=false"), cache, work / "tiny-inductor")
    warm_vllm = fresh_machine_env(work)  # bare vLLM's own caches, primed once below
    variants = {
        KILN_COLD: lambda port: (_kiln(compiled, port), fresh_machine_env(work, **KILN_ENV)),
        # vLLM's own start method on CPU: each engine process imports vLLM again (kiln forks them,
        # runtime/engines/vllm/patches.py start_by_fork); an operator's VLLM_WORKER_MULTIPROC_METHOD is left alone
        "kiln serve, packaged cache, engine processes spawned (VLLM_WORKER_MULTIPROC_METHOD=spawn)": lambda port: (
            _kiln(compiled, port),
            fresh_machine_env(work, **KILN_ENV, VLLM_WORKER_MULTIPROC_METHOD="spawn"),
        ),
        "kiln serve, packaged cache without the AOT function (compile.aot=false)": lambda port: (
            _kiln(inductor_only, port),
            fresh_machine_env(work, **KILN_ENV),
        ),
        "kiln serve, no cache": lambda port: (_kiln(plain, port), fresh_machine_env(work, **KILN_ENV)),
        "bare vLLM, no cache": lambda port: (_vllm(plain, port), fresh_machine_env(work)),
        "bare vLLM, its own warm cache": lambda port: (_vllm(plain, port), warm_vllm),
    }
    port = free_port()
    print("priming bare vLLM's own cache (not measured)", flush=True)
    start_and_first_token(_vllm(plain, port), warm_vllm, port, "/health")
    starts: dict[str, list[Start]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, make in variants.items():
            port = free_port()
            cmd, env = make(port)
            s = start_and_first_token(cmd, env, port, "/health" if "vLLM" in name.split(",")[0] else "/ping")
            starts[name].append(s)
            print(f"round {r + 1}: {name}: first token {s.first_token_s:.1f}s (ready {s.ready_s:.1f}s)", flush=True)
    return report(starts)


def _kiln(model: Path, port: int) -> list[str]:
    return [PY, "-m", "runtime", "serve", str(model), "--port", str(port)]


def _vllm(model: Path, port: int) -> list[str]:
    return vllm_cmd(str(model), port)


def report(starts: dict[str, list[Start]]) -> dict[str, object]:
    bare = median([s.first_token_s for s in starts["bare vLLM, no cache"]])
    print("\n| start (tiny artifact) | first token, median s | runs | vs bare vLLM, no cache |\n|---|---|---|---|")
    out = first_token_rows(starts, bare, "ratio_to_bare")
    for name, runs in starts.items():
        print(f"\nphases of one start: {name}\n| ends at s | phase |\n|---|---|")
        s = runs[-1]
        phases = [(label, t) for label, pattern in PHASES if (t := s.at(pattern)) is not None]
        for label, t in [*phases, ("first token", s.first_token_s)]:
            print(f"| {t:.1f} | {label} |")
        out[name]["phases"] = [[label, t] for label, t in phases] + [["first token", s.first_token_s]]  # type: ignore[index]
    return out


if __name__ == "__main__":
    main()

"""``nox -s bench -- speculative``: n-gram speculative decoding against none, the same artifact on vLLM CPU, in one
run. Two kiln servers (one started with ``option.speculative_config`` n-gram, one without) serve the trained tiny
model; the measured rounds alternate between them (which goes first alternates too).

Two workloads: "copy", prompts that hold a passage twice and then its start again, so the continuation copies
the prompt (what prompt lookup is for: RAG answers quoting their context, code edits); and "fresh", distinct
prompts whose continuations do not repeat them. Reported per workload: output tokens/s, time per output token
(TPOT: (last token - first token) / (tokens - 1), per request; a speculative step streams several tokens in one
chunk, so chunk gaps would flatter it) and the acceptance ratio from kiln's /metrics, as with/without ratios.

    python -m tests.bench.speculative [--requests 16] [--concurrency 1] [--max-tokens 96] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.bench import load
from tests.bench.serve_bench import build, kiln_server, log

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def workloads(n: int) -> dict[str, list[str]]:
    from build.tiny.corpus import documents

    passages = [d[:400] for d in documents(n, seed=7, split="heldout")]
    return {
        "copy": [f"{p}\n\n{p}\n\n{p[: len(p) // 3]}" for p in passages],
        "fresh": load.prompts(n, words=48, seed=7),
    }


async def measure(base: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> load.Run:
    todo, out = list(prompts), load.Run()
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def worker() -> None:
            while todo:
                out.results.append(await load.one(client, model, todo.pop(), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out.wall = time.perf_counter() - t0
    return out


def tpot_ms(run: load.Run) -> list[float]:
    return sorted(1000 * (r.latency - r.ttft) / (r.tokens - 1) for r in run.results if r.tokens > 1)


def accepted(base: str) -> tuple[float, float]:
    """(draft tokens, accepted tokens) so far, from kiln's /metrics."""
    values = {}
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("kiln_spec_decode_draft_tokens_total", "kiln_spec_decode_accepted_tokens_total"):
            values[name] = float(value)
    return values.get("kiln_spec_decode_draft_tokens_total", 0.0), values.get(
        "kiln_spec_decode_accepted_tokens_total", 0.0
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16, help="requests per workload, round and server")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=1, help="1: speculation's case, latency of one stream")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-spec-") as tmp:
        logs = Path(tmp)
        os.environ.setdefault("KILN_CACHE", str(logs / "cache"))
        log("building the trained tiny artifact (about two minutes of CPU training the first time)")
        uri = build("model=tiny_trained")
        servers = {
            "ngram": kiln_server(uri, "kiln-ngram", logs, "--speculative-config", json.dumps(NGRAM)),
            "none": kiln_server(uri, "kiln", logs),
        }
        try:
            for proc, _ in servers.values():
                proc.wait_ready()
            results = run_rounds(args, {k: b for k, (_, b) in servers.items()})
        finally:
            for proc, _ in servers.values():
                proc.stop()
    text = report(results, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def run_rounds(args: argparse.Namespace, bases: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    model = "tiny-llama-trained"
    loads = workloads(args.requests)
    for base in bases.values():  # warm-up: first-request costs out of the figures
        asyncio.run(measure(base, model, loads["fresh"][:2], 1, 8))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for wl, prompts in loads.items():
        runs = {name: load.Run() for name in bases}
        before = accepted(bases["ngram"])
        for r in range(args.rounds):
            for name in list(bases) if r % 2 == 0 else list(bases)[::-1]:
                run = asyncio.run(measure(bases[name], model, prompts, args.concurrency, args.max_tokens))
                runs[name].merge(run)
                log(f"{wl} round {r + 1}/{args.rounds} {name}: {run.summary()['output_throughput']:.1f} tok/s")
        after = accepted(bases["ngram"])
        drafted, acc = after[0] - before[0], after[1] - before[1]
        out[wl] = {}
        for name, run in runs.items():
            t = tpot_ms(run)
            out[wl][name] = {
                "output_tok_s": run.summary()["output_throughput"],
                "tpot_p50_ms": load.percentile(t, 50),
                "tpot_p90_ms": load.percentile(t, 90),
                "acceptance": acc / drafted if name == "ngram" and drafted else float("nan"),
            }
    return out


def report(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [
        f"n-gram speculation {json.dumps(NGRAM)} vs none: trained tiny model, vLLM CPU, {args.rounds} x "
        f"{args.requests} requests per workload, concurrency {args.concurrency}, {args.max_tokens} output tokens",
        f"{'workload':<10}{'metric':<16}{'none':>10}{'ngram':>10}{'ngram/none':>12}",
    ]
    for wl, r in results.items():
        for key in ("output_tok_s", "tpot_p50_ms", "tpot_p90_ms"):
            n, s = r["none"][key], r["ngram"][key]
            lines.append(f"{wl:<10}{key:<16}{n:>10.2f}{s:>10.2f}{s / n if n else float('nan'):>12.3f}")
        lines.append(f"{wl:<10}{'acceptance':<16}{'':>10}{r['ngram']['acceptance']:>10.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

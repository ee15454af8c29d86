"""``python -m runtime bench URL`` / ``python -m runtime bench --endpoint-name NAME``: load-test a serving endpoint.

The flags that ``vllm bench serve`` also has keep its names and defaults (``--num-prompts``, ``--random-input-len``,
``--request-rate``, ``--max-concurrency``, ``--ignore-eos``…), so a command moves between the two; what vLLM's
client lacks is here: LMI's schema, SageMaker endpoints (SigV4, inference components, variants) and LMI adapters.
Exit status: 0 when every request completed, 1 when any failed (the report is still printed and written), 2 for a
usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from runtime.bench.apis import APIS, Options
from runtime.bench.metrics import LATENCIES, Outcome, percentile_key, summarize
from runtime.bench.runner import Schedule, one, run
from runtime.bench.transports import Http, SageMaker, Transport
from runtime.bench.workload import random_requests


class UsageError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime bench", description=__doc__.split("\n\n")[0])
    target = p.add_argument_group("target")
    target.add_argument("url", nargs="?", help="the server's base URL, e.g. http://127.0.0.1:8080")
    target.add_argument("--endpoint-name", help="a SageMaker endpoint instead of a URL (SigV4 through botocore)")
    target.add_argument("--region", help="SageMaker: the endpoint's region (default: the AWS configuration's)")
    target.add_argument("--endpoint-url", help="SageMaker: the runtime API's URL (a VPC endpoint, a local test)")
    target.add_argument("--inference-component", help="SageMaker: the inference component (a LoRA adapter's)")
    target.add_argument("--target-variant", help="SageMaker: the production variant")
    target.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="HTTP header (repeatable)")
    target.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    req = p.add_argument_group("requests")
    req.add_argument("--api", choices=sorted(APIS), help="schema (default: completions for a URL, lmi for SageMaker)")
    req.add_argument("--model", help="OpenAI 'model' (default: the server's first model, or --adapter)")
    req.add_argument("--adapter", help="LoRA adapter: OpenAI 'model', LMI 'adapters'")
    req.add_argument("--tokenizer", required=True, help="model directory, artifact URI or hub id to count tokens with")
    req.add_argument("--no-stream", dest="stream", action="store_false", help="whole responses (only E2EL measured)")
    req.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length asked for")
    req.add_argument("--temperature", type=float, default=0.0)
    load = p.add_argument_group("workload")
    load.add_argument("--num-prompts", type=int, default=1000)
    load.add_argument("--random-input-len", type=int, default=1024)
    load.add_argument("--random-output-len", type=int, default=128)
    load.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1±ratio)")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson arrivals; gamma shape otherwise")
    load.add_argument("--max-concurrency", type=int, help="requests in flight at most (with rate inf: closed loop)")
    load.add_argument("--num-warmups", type=int, default=0, help="requests sent (and not counted) first")
    load.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles to report")
    out.add_argument("--result-json", type=Path, help="write the configuration and figures here")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _check(args)
        percentiles = _percentiles(args.percentiles)
        tokenizer = load_tokenizer(args.tokenizer)
    except UsageError as exc:
        print(f"kiln bench: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_bench(args, tokenizer, percentiles))


def _check(args: argparse.Namespace) -> None:
    if bool(args.url) == bool(args.endpoint_name):
        raise UsageError("give either a URL or --endpoint-name (a SageMaker endpoint), not both or neither")
    if args.url and urlsplit(args.url).scheme not in ("http", "https"):
        raise UsageError(f"URL {redact(args.url)!r} must start with http:// or https://")
    for name in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UsageError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if not args.request_rate > 0 or not args.burstiness > 0:
        raise UsageError("--request-rate and --burstiness must be positive")
    if not 0 <= args.random_range_ratio < 1:
        raise UsageError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if any("=" not in h for h in args.header):
        raise UsageError("--header takes KEY=VALUE")


def _percentiles(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--percentiles {text!r}: give numbers, e.g. 50,90,99") from None
    if not values or any(not 0 <= v <= 100 for v in values):
        raise UsageError(f"--percentiles {text!r}: each must be between 0 and 100")
    return values


def load_tokenizer(where: str) -> Any:
    """A tokenizer from a model directory, or from what ``runtime serve`` accepts (pulled and verified)."""
    from transformers import AutoTokenizer

    path = Path(where).expanduser()
    try:
        if not path.is_dir():
            from runtime.resolve import resolve

            path = resolve(where).path
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # the library's errors are many; the fix is always the flag
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--tokenizer {where!r}: no tokenizer could be loaded ({first})") from None


def redact(url: str) -> str:
    """The URL without user:password or query (either may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def transport(args: argparse.Namespace) -> Transport:
    if args.endpoint_name:
        workers = args.max_concurrency or min(args.num_prompts, 256)
        return SageMaker(
            args.endpoint_name,
            region=args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            endpoint_url=args.endpoint_url,
            inference_component=args.inference_component,
            target_variant=args.target_variant,
            workers=max(workers, 1),
            timeout=args.timeout,
        )
    headers = dict(h.split("=", 1) for h in args.header)
    return Http(args.url, headers, args.timeout)


async def _bench(args: argparse.Namespace, tokenizer: Any, percentiles: list[float]) -> int:
    api = APIS[args.api or ("lmi" if args.endpoint_name else "completions")]
    link = transport(args)
    try:
        model = args.model or args.adapter
        if model is None and api.name != "lmi" and not args.endpoint_name:
            model = await first_model(link)
        opts = Options(model, args.adapter, args.stream, args.ignore_eos, args.temperature)
        requests = random_requests(
            tokenizer, args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio,
            args.seed,
        )  # fmt: skip
        for _ in range(args.num_warmups):
            await one(link, api, requests[0], opts)
        schedule = Schedule(args.request_rate, args.burstiness, args.max_concurrency, args.seed)
        with _Progress(len(requests), args.progress) as tick:
            outcomes, duration = await run(link, api, requests, opts, schedule, tick)
    finally:
        await link.aclose()
    report = summarize(outcomes, duration, tokenizer, percentiles, args.stream)
    where = f"SageMaker endpoint {args.endpoint_name}" if args.endpoint_name else redact(args.url)
    print(render(report, f"{api.name} -> {where}", percentiles, args.stream))
    if args.result_json:
        args.result_json.write_text(json.dumps(_document(args, api.name, model, report), indent=2) + "\n")
    return 0 if report["failed"] == 0 else 1


async def first_model(link: Transport) -> str | None:
    """The first model the server lists (``vllm bench serve`` does the same), or None where it lists none."""
    if not isinstance(link, Http):
        return None
    try:
        models = (await link.client.get("/v1/models")).json().get("data") or []
        return str(models[0]["id"]) if models else None
    except Exception:  # no listing: the server picks, and the requests' errors say what is wrong
        return None


class _Progress:
    """A tqdm bar on stderr while requests finish (only on a terminal, unless asked otherwise)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="requests", unit="req", file=sys.stderr, leave=False)

    def __enter__(self) -> Any:
        def tick(outcome: Outcome) -> None:
            if self.bar is not None:
                self.bar.update(1)

        return tick

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _document(args: argparse.Namespace, api: str, model: str | None, report: dict[str, Any]) -> dict[str, Any]:
    config = {
        "api": api,
        "target": {"endpoint_name": args.endpoint_name} if args.endpoint_name else {"url": redact(args.url)},
        "inference_component": args.inference_component,
        "model": model,
        "adapter": args.adapter,
        "stream": args.stream,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "request_rate": "inf" if args.request_rate == math.inf else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "headers": sorted(k for k, _ in (h.split("=", 1) for h in args.header)),  # names only: values may be keys
    }
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": config, "results": report}


NAMES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)", "itl": "Inter-token Latency",
         "e2el": "End-to-end Latency"}  # fmt: skip


def render(report: dict[str, Any], title: str, percentiles: list[float], streaming: bool) -> str:
    rows = [
        ("Successful requests", report["completed"]),
        ("Failed requests", report["failed"]),
        ("Benchmark duration (s)", report["duration_s"]),
        ("Total input tokens", report["total_input_tokens"]),
        ("Total generated tokens", report["total_output_tokens"]),
        ("Request throughput (req/s)", report["request_throughput"]),
        ("Output token throughput (tok/s)", report["output_throughput"]),
        ("Total token throughput (tok/s)", report["total_token_throughput"]),
    ]
    lines = [f"{' kiln bench: ' + title + ' ':=^60}"] + [_row(k, v) for k, v in rows]
    for kind, count in sorted(report["errors"].items()):
        lines.append(_row(f"  {kind}", count))
        lines.append(f"    e.g. {report['error_examples'].get(kind, '')}"[:200])
    for name in LATENCIES if streaming else ("e2el",):
        lines.append(f"{' ' + NAMES[name] + ' ':-^60}")
        lines.append(_row(f"Mean {name.upper()} (ms)", report[f"mean_{name}_ms"]))
        for p in percentiles:
            key = percentile_key(name, p)
            lines.append(_row(f"P{key[1:].split('_')[0]} {name.upper()} (ms)", report[key]))
    if not streaming:
        lines.append("(not streamed: TTFT, TPOT and ITL are not measured)")
    lines.append("=" * 60)
    return "\n".join(lines)


def _row(label: str, value: Any) -> str:
    shown = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label + ':':<40}{shown:>20}"

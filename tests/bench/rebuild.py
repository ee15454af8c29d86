"""Incremental builds of the tiny artifact with ``compile=vllm``: the cold build, the no-op rebuild, and the rebuild
after changing only the compile config.

    python -m tests.bench.rebuild [--rounds 3] [--json results.json]

All in a private kiln cache. The no-op rebuild must do no stage work and print the same URI (target: <= 2 s);
the compile-config change must reuse synth and convert and redo only compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from tests.bench._serve import median, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-rebuild-"))
    env = {**os.environ, "KILN_CACHE": str(work / "cache")}
    try:
        results = {
            "cold build": [_build(env, "compile=vllm")],
            "no-op rebuild": [_build(env, "compile=vllm") for _ in range(args.rounds)],
            "compile config changed": [_build(env, "compile=vllm", "compile.kv_cache_gib=2")],
            "no-op rebuild after it": [_build(env, "compile=vllm", "compile.kv_cache_gib=2")],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| build (tiny, compile=vllm) | wall s, median | runs | stages |\n|---|---|---|---|")
    for name, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        print(f"| {name} | {median(walls):.2f} | {', '.join(f'{w:.2f}' for w in walls)} | {runs[-1]['stages']} |")
    uris = {r["uri"] for r in results["cold build"] + results["no-op rebuild"]}
    print(f"\nno-op rebuilds printed the cold build's URI: {len(uris) == 1}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _build(env: dict[str, str], *overrides: str) -> dict[str, object]:
    wall, proc = run("build", *overrides, env=env)
    stages = re.search(r"\(([^)]*)\)", proc.stderr.strip().splitlines()[-1])
    return {"wall_s": wall, "uri": proc.stdout.strip().splitlines()[-1], "stages": stages.group(1) if stages else ""}


if __name__ == "__main__":
    main()

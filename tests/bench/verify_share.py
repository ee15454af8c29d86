"""Verification's share of a start: a multi-GiB synthesized checkpoint served from the pull cache, which ``serve``
re-verifies (hashes every file) on every start while it imports the engine's libraries.

    python -m tests.bench.verify_share [--gib 1.5] [--rounds 3] [--cold] [--json results.json]

Per start: process start to the first streamed token, the seconds ``serve`` logs for hashing and for the engine's
import, verification's share of the start (hashing / first token) and how much of the hashing ran under the import
(they overlap: the share a start would lose without the overlap). ``--cold`` drops the page cache before each start
(needs root; a restart on a fresh host reads the weights from disk), where hashing is I/O bound.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.bench._serve import PY, build_tiny, free_port, median, start_and_first_token

# A Llama of hidden 2048, 16 heads (8 KV), MLP 5632: 47.2 M parameters, 94.4 MB in bfloat16, per layer.
LAYER_BYTES = 94.4e6
VERIFIED = re.compile(r"verified \d+ files \(([\d.]+) MB\) in ([\d.]+)s")
IMPORTED = re.compile(r"imported the \w+ engine in ([\d.]+)s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.5, help="checkpoint size (bfloat16 weights)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="drop the page cache before each start (root only)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    layers = max(1, round(args.gib * 2**30 / LAYER_BYTES))
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-verify-"))
    try:
        uri = build_tiny(work / "cache", *_model(layers))
        env = {**os.environ, "KILN_CACHE": str(work / "cache"), "KILN_LOG_LEVEL": "INFO", "KILN_LOG_FORMAT": "text"}
        first = _start(uri, env, cold=False)  # pulls into the pull cache (hashing as it fetches)
        starts = [_start(uri, env, cold=args.cold) for _ in range(args.rounds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shares = [s["verify_s"] / s["first_token_s"] for s in starts]
    hidden = [min(s["verify_s"], s["import_s"]) / s["verify_s"] for s in starts]
    summary = {"layers": layers, "verify_share_median": median(shares), "hidden_median": median(hidden)}
    print(f"\n{starts[0]['mb']:.0f} MB checkpoint, {layers} layers, {'cold' if args.cold else 'warm'} page cache")
    print("| start | first token s | hashing s | engine import s | verification's share |\n|---|---|---|---|---|")
    for i, s in enumerate([first, *starts]):
        label = "first (pull)" if i == 0 else f"restart {i}"
        share = s["verify_s"] / s["first_token_s"] if s["verify_s"] else 0.0
        print(f"| {label} | {s['first_token_s']:.1f} | {s['verify_s']:.2f} | {s['import_s']:.1f} | {share:.1%} |")
    print(f"\nverification's share of a restart: {summary['verify_share_median']:.1%} (median); "
          f"{summary['hidden_median']:.0%} of the hashing ran under the engine's import")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"first": first, "restarts": starts, "summary": summary}, indent=2))


def _model(layers: int) -> list[str]:
    return [
        "model.name=verify-bench",
        "model.synth.hidden_size=2048",
        "model.synth.intermediate_size=5632",
        f"model.synth.num_hidden_layers={layers}",
        "model.synth.num_attention_heads=16",
        "model.synth.num_key_value_heads=8",
        "model.dtype=bfloat16",
    ]


def _start(uri: str, env: dict[str, str], cold: bool) -> dict[str, float]:
    if cold:
        _drop_page_cache()
    port = free_port()
    cmd = [PY, "-m", "runtime", "serve", uri, "--port", str(port), "--enforce-eager"]
    start = start_and_first_token(cmd, env, port, "/ping")
    text = "\n".join(line for _, line in start.lines)
    verified, imported = VERIFIED.search(text), IMPORTED.search(text)
    return {
        "first_token_s": start.first_token_s,
        "ready_s": start.ready_s,
        "mb": float(verified.group(1)) if verified else 0.0,
        "verify_s": float(verified.group(2)) if verified else 0.0,  # none logged: a fresh pull hashes as it fetches
        "import_s": float(imported.group(1)) if imported else 0.0,
    }


def _drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root to drop the page cache ({exc.strerror})") from None


if __name__ == "__main__":
    main()

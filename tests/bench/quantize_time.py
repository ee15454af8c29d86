"""Quantization wall time per method: kiln's quantize stage vs calling llm-compressor's ``oneshot`` directly with
the same recipe and the same calibration windows, in the same run, on the tiny model and a larger synthesized one.

    python -m tests.bench.quantize_time [--methods gptq,awq,smoothquant,fp8] [--rounds 2] [--sizes tiny,medium]
                                        [--json results.json]

Both sides run in the llm-compressor toolchain interpreter, one fresh process per measurement, alternating
which goes first, and time their work after imports:

* direct: load the model, ``oneshot(model, recipe, dataset)``, ``save_pretrained(save_compressed=True)``;
* kiln:   the stage's quantization path: preflight, read and tokenize the calibration text, load, oneshot
          with layer progress and library output held back, save, carry the tokenizer files.

The fidelity report (a second, separate piece of work the direct call does not do) is timed on its own.
Overhead = kiln / direct - 1; the target is <= 10 %. Figures from a busy machine are provisional.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SIZES = {
    "tiny": [],  # conf/model/tiny.yaml: hidden 256, 4 layers (~2.9M parameters)
    "medium": [  # ~110M parameters, random weights (timing only)
        "model.name=bench-medium",
        "model.synth.hidden_size=1024",
        "model.synth.intermediate_size=2816",
        "model.synth.num_hidden_layers=10",
        "model.synth.num_attention_heads=16",
        "model.synth.num_key_value_heads=8",
        "model.synth.corpus_sentences=2000",
    ],
}
METHODS = {"gptq": [], "awq": [], "smoothquant": [], "fp8": [], "fp8-static": ["quantize.activations=static"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sizes", default="tiny,medium")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-quantize-"))
    env = {**os.environ, "KILN_CACHE": str(work / "cache")}
    rows = []
    try:
        python = _toolchain_python()
        for size in args.sizes.split(","):
            model_dir = _source(size, work, env)
            for method in args.methods.split(","):
                rows.append(_measure(python, size, method, model_dir, work, env, args.rounds))
                _print_row(rows[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _toolchain_python() -> str:
    from build.toolchains import get, resolve

    return resolve(get("quantize-llmcompressor")).python


def _source(size: str, work: Path, env: dict[str, str]) -> Path:
    """Build the unquantized artifact (synthesized, converted) and materialize it as a plain directory."""
    proc = subprocess.run(
        [sys.executable, "-m", "build", *SIZES[size]], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    uri = proc.stdout.strip().splitlines()[-1]
    out = work / f"src-{size}"
    subprocess.run([sys.executable, "-m", "artifacts", "pull", uri, str(out)], cwd=ROOT, env=env, check=True)
    return out


def _params(method: str, work: Path, env: dict[str, str]) -> tuple[dict[str, Any], Path]:
    """The stage params and calibration file the build would use for this method (resolved by Hydra)."""
    from hydra import compose, initialize_config_module

    from build.calibration import acquire
    from build.config import register_configs, to_plain, validate
    from quantize.config import stage_config

    name, _, _ = method.partition("-")
    register_configs()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = validate(compose(config_name="build", overrides=[f"quantize={name}", *METHODS[method]]))
    q = cfg.quantize
    os.environ["KILN_CACHE"] = env["KILN_CACHE"]
    data = acquire(q.calibration, min_tokens=(q.num_samples + q.eval_samples) * q.seq_len)
    params = {"config": stage_config(to_plain(q)), "target": {"engine": "vllm"}, "dtype": cfg.model.dtype}
    return params, data.input.path


def _measure(
    python: str, size: str, method: str, model_dir: Path, work: Path, env: dict[str, str], rounds: int
) -> dict[str, Any]:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    params, calib = _params(method, work, env)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"params": params, "model": str(model_dir), "calibration": str(calib)}))
    times: dict[str, list[float]] = {"direct": [], "kiln": [], "fidelity": []}
    for r in range(rounds):
        for mode in ("direct", "kiln") if r % 2 == 0 else ("kiln", "direct"):
            out = work / f"out-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run(
                [python, "-m", "tests.bench._quantize_child", mode, str(spec), str(out)],
                cwd=ROOT,
                env={**env, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                raise SystemExit(f"{mode} {method} on {size} failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            times[mode].append(result["seconds"])
            if "fidelity_seconds" in result:
                times["fidelity"].append(result["fidelity_seconds"])
    direct, kiln = statistics.median(times["direct"]), statistics.median(times["kiln"])
    return {
        "size": size,
        "method": method,
        "direct_s": times["direct"],
        "kiln_s": times["kiln"],
        "fidelity_s": times["fidelity"],
        "overhead": kiln / direct - 1,
    }


def _print_row(row: dict[str, Any]) -> None:
    if not getattr(_print_row, "header", False):
        print("\n| model | method | oneshot direct s | kiln stage s | overhead | fidelity report s |")
        print("|---|---|---|---|---|---|")
        _print_row.header = True  # type: ignore[attr-defined]
    d, k = statistics.median(row["direct_s"]), statistics.median(row["kiln_s"])
    fid = statistics.median(row["fidelity_s"]) if row["fidelity_s"] else float("nan")
    print(f"| {row['size']} | {row['method']} | {d:.2f} | {k:.2f} | {100 * row['overhead']:+.1f}% | {fid:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"\n(total {time.monotonic() - start:.0f}s)")

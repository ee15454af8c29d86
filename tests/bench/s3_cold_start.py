"""Cold start from S3: process start → first streamed token for a ~1 GiB checkpoint on a loopback S3 server.

    python -m tests.bench.s3_cold_start [--rounds 1] [--only abcd] [--server rclone|moto] [--json results.json]

Four ways, interleaved, each on a "new machine" (empty kiln, torch and vLLM caches; see tests/bench/_serve.py):

(a) ``python -m runtime serve s3://bench/hf/model/`` — kiln from the plain Hugging Face checkpoint prefix (LMI's
    ``HF_MODEL_ID=s3://…``): every byte verified, the weights downloading while vLLM imports;
(b) ``python -m runtime serve s3://bench/store/model:latest`` — kiln from a kiln artifact published to S3;
(c) ``vllm … --model s3://bench/hf/model/ --load-format runai_streamer`` — vLLM's documented S3 path (Run:ai's
    streamer reads the tensors straight from S3; nothing is verified);
(d) the LMI way: download the whole prefix (boto3's download_file per object), then start vLLM on the directory.

The S3 server is ``rclone serve s3`` over a local directory, in its own process (``--server moto`` for moto, whose
ranged GETs each read the whole object, so that there the server is what is measured).

The checkpoint is synthesized (random weights) and converted by the
build to bfloat16 safetensors; every variant serves it with the same engine arguments. Medians are reported with
the ratio to (c).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
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
    vllm_cmd,
)
from tests.bench._serve import start_and_first_token as measure
from tests.bench.s3_pull import moto_server, rclone_server

# ~1 GiB of bfloat16 weights (about 530 M parameters) with the tiny model's tokenizer.
SYNTH = [
    "model.synth.hidden_size=1024",
    "model.synth.intermediate_size=4096",
    "model.synth.num_hidden_layers=35",
    "model.synth.num_attention_heads=16",
    "model.synth.num_key_value_heads=4",
]
BUCKET = "bench"
STREAMER = "(c) vLLM --load-format runai_streamer"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--only", default="abcd", help="which ways to run, by letter (default: abcd)")
    p.add_argument("--server", choices=("rclone", "moto"), default="rclone", help="the loopback S3 server")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-s3cold-"))
    try:
        (work / "s3").mkdir()
        with rclone_server(work / "s3") if args.server == "rclone" else moto_server() as endpoint:
            results = bench(work, endpoint, args.rounds, args.only)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def bench(work: Path, endpoint: str, rounds: int, only: str = "abcd") -> dict[str, object]:
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",  # path-style addressing, as an S3-compatible server needs
        AWS_EC2_METADATA_DISABLED="true",
    )
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    cache = work / "build-cache"
    print("building the ~1 GiB checkpoint and publishing it to S3 (not measured)", flush=True)
    uri = build_tiny(cache, "model.name=bench-1g", *SYNTH, "publish=s3", f"publish.uri=s3://{BUCKET}/store")
    plain = pull(uri, cache, work / "plain")
    (plain / "manifest.json").unlink()
    for path in sorted(plain.iterdir()):
        s3.upload_file(str(path), BUCKET, f"hf/bench-1g/{path.name}")
    size = sum(p.stat().st_size for p in plain.iterdir())
    prefix = f"s3://{BUCKET}/hf/bench-1g/"
    tag_uri = f"s3://{BUCKET}/store/bench-1g:latest"
    print(f"checkpoint: {size / 2**30:.2f} GiB in {len(list(plain.iterdir()))} files at {prefix}", flush=True)

    variants: dict[str, Callable[[int, dict[str, str]], list[str]]] = {
        "(a) kiln serve s3://…/ (plain checkpoint prefix)": lambda port, env: _kiln(prefix, port),
        "(b) kiln serve s3://…:latest (kiln artifact)": lambda port, env: _kiln(tag_uri, port),
        STREAMER: lambda port, env: _vllm(prefix, port, "--load-format", "runai_streamer"),
        "(d) download everything, then vLLM (LMI)": lambda port, env: _download_then_vllm(prefix, env, port),
    }
    variants = {name: make for name, make in variants.items() if name[1] in only}
    starts: dict[str, list[Start]] = {name: [] for name in variants}
    failed: dict[str, str] = {}
    for r in range(rounds):
        for name, make in variants.items():
            env = fresh_machine_env(work)
            port = free_port()
            ping = "/ping" if name.startswith(("(a)", "(b)")) else "/health"
            try:
                s = measure(make(port, env), env, port, ping)
            except SystemExit as exc:  # one way failing does not stop the others
                failed[name] = str(exc).splitlines()[1] if "\n" in str(exc) else str(exc)
                print(f"round {r + 1}: {name}: FAILED\n{exc}", flush=True)
                continue
            starts[name].append(s)
            print(f"round {r + 1}: {name}: first token {s.first_token_s:.1f}s (ready {s.ready_s:.1f}s)", flush=True)
    return report({k: v for k, v in starts.items() if v}, size, failed)


def _kiln(model: str, port: int) -> list[str]:
    return [PY, "-m", "runtime", "serve", model, "--port", str(port), "--max-model-len", "2048"]


def _vllm(model: str, port: int, *extra: str) -> list[str]:
    return vllm_cmd(model, port, *extra)


def _download_then_vllm(prefix: str, env: dict[str, str], port: int) -> list[str]:
    """One process: download the prefix with boto3 (as LMI's s5cmd step does), then exec vLLM on the directory."""
    dest = Path(env["HOME"]) / "model"
    script = (
        "import boto3, os, sys, pathlib\n"
        f"bucket, _, prefix = {prefix!r}[5:].partition('/')\n"
        f"dest = pathlib.Path({str(dest)!r}); dest.mkdir(parents=True)\n"
        "s3 = boto3.client('s3')\n"
        "for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)['Contents']:\n"
        "    s3.download_file(bucket, o['Key'], str(dest / o['Key'][len(prefix):]))\n"
        "os.execv(sys.executable, sys.argv[1:])\n"
    )
    return [PY, "-c", script, *_vllm(str(dest), port)]


def report(starts: dict[str, list[Start]], size: int, failed: dict[str, str]) -> dict[str, object]:
    ref = median([s.first_token_s for s in starts[STREAMER]]) if STREAMER in starts else float("nan")
    print(f"\n| start ({size / 2**30:.2f} GiB from loopback S3) | first token, median s | runs | vs (c) streamer |")
    print("|---|---|---|---|")
    out: dict[str, object] = {"bytes": size, **first_token_rows(starts, ref, "ratio_to_streamer")}
    for name, why in failed.items():
        print(f"| {name} | failed: {why[:150]} | | |")
        out[name] = {"failed": why}
    return out


if __name__ == "__main__":
    main()

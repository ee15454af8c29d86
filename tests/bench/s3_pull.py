"""S3 benchmark: kiln's verified pull against plain boto3 ``download_file`` of the same objects, in the same run.

    python -m tests.bench.s3_pull [--size-mib 1024] [--rounds 3]        (or: nox -s bench)

Starts moto's S3 server as a separate process on a loopback port (so it does not share the client's GIL),
publishes a synthetic artifact of ``--size-mib`` (two equal weight shards and three small files), then measures:

- publish (cold), against boto3 ``upload_file`` of the same files;
- re-publish with nothing to do;
- pull into a new directory (parallel ranged GETs, sha256 of every byte, atomic rename), against boto3
  ``download_file`` of the same objects — one file after another, and all files at once — no hashing.

Pulls alternate kiln / boto3 for ``--rounds`` rounds; medians are reported. The ratio is the faster boto3
variant's time over kiln's: above 1.0 kiln is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from artifacts import ops
from artifacts.manifest import Manifest, Target
from artifacts.uri import ArtifactRef

MiB = 1024 * 1024
BUCKET = "kiln-bench"


@contextmanager
def moto_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _serving(cmd, port) as endpoint:
        yield endpoint


@contextmanager
def rclone_server(root: Path, key: str = "bench") -> Iterator[str]:
    """``rclone serve s3`` over the directory ``root`` (credentials ``key``/``key``): a Go S3 server whose ranged
    GETs read only the range. moto reads and copies the whole object under one lock for every ranged GET, so
    against moto a 1 GiB object's parallel readers measure moto (the Run:ai streamer's connections even time
    out). rclone ignores If-Match and has no SHA-256 checksums; the correctness tests stay on moto."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent)) or "rclone"
    cmd = [rclone, "serve", "s3", "-q", "--auth-key", f"{key},{key}", "--addr", f"127.0.0.1:{port}", str(root)]
    with _serving(cmd, port) as endpoint:
        yield endpoint


@contextmanager
def _serving(cmd: list[str], port: int) -> Iterator[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def make_artifact(root: Path, size_mib: int) -> tuple[Path, Manifest]:
    d = root / "bench-model"
    d.mkdir()
    shard = size_mib // 2 * MiB
    for i in (1, 2):
        with open(d / f"model-0000{i}-of-00002.safetensors", "wb") as f:
            for _ in range(shard // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
            f.write(os.urandom(shard % (16 * MiB)))
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (d / "tokenizer.json").write_bytes(os.urandom(2 * MiB))
    (d / "generation_config.json").write_text("{}")
    target = Target("vllm", "", ("cpu",), "bfloat16", 1, 4096)
    manifest = Manifest.create("bench-model", ops.scan_dir(d), target, serving={}, provenance={})
    (d / "manifest.json").write_bytes(manifest.to_bytes())
    return d, manifest


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def boto3_download(client: Any, keys: list[str], dest: Path, parallel: bool) -> None:
    dest.mkdir()
    jobs = [(k, dest / k.rsplit("/", 1)[1]) for k in keys]
    if parallel:
        with ThreadPoolExecutor(len(jobs)) as pool:
            list(pool.map(lambda job: client.download_file(BUCKET, job[0], str(job[1])), jobs))
    else:
        for key, path in jobs:
            client.download_file(BUCKET, key, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB, one round")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.rounds = 256, 1
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp, moto_server() as endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        figures = run(Path(tmp), args.size_mib, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def run(tmp: Path, size_mib: int, rounds: int) -> dict[str, Any]:
    import boto3

    client = boto3.session.Session().client("s3")
    client.create_bucket(Bucket=BUCKET)
    src, manifest = make_artifact(tmp, size_mib)
    total = manifest.total_size
    store = f"s3://{BUCKET}/store"
    print(f"artifact: {len(manifest.files)} files, {total / MiB:.0f} MiB; S3: moto server at {endpoint_of()}")

    t_publish = timed(lambda: ops.publish(src, manifest, store, tags=["latest"]))
    t_noop = timed(lambda: ops.publish(src, manifest, store, tags=["latest"]))
    t_upload = timed(lambda: [client.upload_file(str(src / e.path), BUCKET, f"plain/{e.path}") for e in manifest.files])
    ref = ArtifactRef(store=store, name=manifest.name, digest=manifest.digest)
    keys = [f"store/blobs/sha256/{e.sha256[7:]}" for e in manifest.files]

    kiln, seq, par = [], [], []
    for _ in range(rounds):
        kiln.append(timed(lambda: ops.pull(ref, tmp / "kiln")))
        seq.append(timed(lambda: boto3_download(client, keys, tmp / "seq", parallel=False)))
        par.append(timed(lambda: boto3_download(client, keys, tmp / "par", parallel=True)))
        for d in ("kiln", "seq", "par"):
            shutil.rmtree(tmp / d)
    k, s, p = statistics.median(kiln), statistics.median(seq), statistics.median(par)
    rate = total / MiB

    def row(what: str, seconds: float, note: str = "") -> None:
        print(f"  {what:<46} {seconds:7.2f} s  {rate / seconds:7.1f} MiB/s  {note}")

    print(f"publish and pull, median of {rounds} rounds for pulls:")
    row("kiln publish (cold, sha256 verified)", t_publish, f"boto3 upload_file: {t_upload:.2f} s")
    print(f"  {'kiln re-publish (nothing to upload)':<46} {t_noop:7.2f} s")
    row("kiln pull (parallel ranges, sha256, rename)", k, f"runs: {', '.join(f'{x:.2f}' for x in kiln)}")
    row("boto3 download_file, one file after another", s, f"runs: {', '.join(f'{x:.2f}' for x in seq)}")
    row("boto3 download_file, all files at once", p, f"runs: {', '.join(f'{x:.2f}' for x in par)}")
    print(f"pull ratio (faster boto3 / kiln): {min(s, p) / k:.2f}x")
    mib_s = {  # transfer rates, MiB/s (the pulls: medians)
        "kiln publish": rate / t_publish,
        "boto3 upload_file": rate / t_upload,
        "kiln pull": rate / k,
        "boto3 download_file, sequential": rate / s,
        "boto3 download_file, parallel": rate / p,
    }
    return {
        "size_mib": rate, "rounds": rounds, "server": "moto", "mib_per_s": mib_s, "republish_s": t_noop,
        "pull_s": {"kiln": kiln, "boto3 sequential": seq, "boto3 parallel": par},
        "pull_ratio": min(s, p) / k, "publish_ratio": t_upload / t_publish,
    }  # fmt: skip


def endpoint_of() -> str:
    return os.environ.get("AWS_ENDPOINT_URL", "")


if __name__ == "__main__":
    sys.exit(main())

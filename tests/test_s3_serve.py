"""S3 end to end, as a new user would: build with ``publish=s3`` against the loopback server, serve the ``s3://``
URI with the real engine, then corrupt the bucket and the cache and watch the runtime refuse to serve them.
Also a build whose ``model.source`` is an HF checkpoint stored as a plain S3 prefix."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import openai
import pytest

from artifacts import ops
from artifacts.manifest import MANIFEST_NAME, Manifest
from artifacts.uri import parse_ref
from build.cache import files_digest
from runtime.exitcodes import EX_CONFIG
from runtime.resolve import resolve
from tests.conftest import build, run_cli, start_server
from tests.s3_server import MotoS3, free_port

pytestmark = pytest.mark.integration


def test_build_publish_s3_serve_then_refuse_corruption(
    moto_s3: MotoS3, tiny_hf_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built for the transformers engine: S3 pull and verify are what is tested here, and that engine starts in
    # seconds where vLLM takes a minute (vLLM serving from S3 is the same code path after the pull).
    bucket = moto_s3.bucket("e2e")
    digest_uri = build(
        "publish=s3", f"publish.uri=s3://{bucket}/models", "target.engine=transformers", "model.name=tiny-llama-hf"
    )
    assert digest_uri.startswith(f"s3://{bucket}/models/tiny-llama-hf@sha256:")
    tag_uri = f"s3://{bucket}/models/tiny-llama-hf:latest"
    cache = tmp_path / "runtime-cache"
    monkeypatch.setenv("KILN_CACHE", str(cache))  # a fresh serving host: nothing pulled yet

    server = start_server(tag_uri, tmp_path)
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny-llama-hf", messages=[{"role": "user", "content": "What color is the sky?"}], max_tokens=12
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens >= 1  # random tiny weights: the words are gibberish, the tokens real
        assert reply.choices[0].finish_reason in ("length", "stop")
    finally:
        assert server.stop() == 0, server.logs()[-3000:]
    assert f"pulled {digest_uri}" in server.logs()
    entry = cache / "pulled" / digest_uri.rsplit(":", 1)[1]
    manifest = Manifest.from_bytes((entry / MANIFEST_NAME).read_bytes())

    # A cached file swapped for a symlink (to an identical copy outside the cache) is refused and fetched again.
    shutil.copy(entry / "config.json", tmp_path / "outside.json")
    (entry / "config.json").unlink()
    (entry / "config.json").symlink_to(tmp_path / "outside.json")
    assert resolve(tag_uri).path == entry
    assert not (entry / "config.json").is_symlink()

    # Corrupt every file's blob in the bucket: from here on, any download would fail verification.
    s3 = moto_s3.client()
    for e in manifest.files:
        s3.put_object(Bucket=bucket, Key=f"models/blobs/sha256/{e.sha256[7:]}", Body=os.urandom(e.size))
    # An intact cache entry is used as is: the digest URI needs no S3 at all, the tag URI downloads no blob.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert resolve(digest_uri).path == entry
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    assert resolve(tag_uri).path == entry

    # A damaged cache entry is fetched again, never served; the corrupt blob in the bucket is refused by name.
    with open(entry / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    proc = run_cli("runtime", "serve", tag_uri, "--port", "1", timeout=120)
    assert proc.returncode == EX_CONFIG, proc.stderr
    blob = rf"s3://{bucket}/models/blobs/sha256/([0-9a-f]{{64}})"
    named = re.search(rf"kiln runtime: (\S+): {blob} is corrupt", proc.stderr)
    assert named, proc.stderr  # the file and the bucket object at fault
    assert (named[1], f"sha256:{named[2]}") in {(e.path, e.sha256) for e in manifest.files}
    assert "Traceback" not in proc.stderr
    assert not entry.exists()
    assert [p.name for p in (cache / "pulled").iterdir()] == []  # no partial pull left behind


def test_build_from_an_s3_checkpoint_prefix(moto_s3: MotoS3, tiny_uri: str, tmp_path: Path, kiln_env: Path) -> None:
    ckpt = tmp_path / "ckpt"
    assert run_cli("artifacts", "pull", tiny_uri, str(ckpt)).returncode == 0
    (ckpt / MANIFEST_NAME).unlink()  # a plain Hugging Face checkpoint
    bucket = moto_s3.bucket()
    s3 = moto_s3.client()
    for path in ckpt.rglob("*"):
        s3.upload_file(str(path), bucket, f"hf/llama/{path.relative_to(ckpt).as_posix()}")
    s3.put_object(Bucket=bucket, Key="hf/llama/README.md", Body=b"not part of the checkpoint")
    uri = f"s3://{bucket}/hf/llama/"
    args = ("build", "model=hf", f"model.source={uri}", "model.name=from-s3")
    first = run_cli(*args, env={"KILN_LOG_LEVEL": "INFO"})
    assert first.returncode == 0, first.stderr
    assert f"{len(list(ckpt.iterdir()))} files to download" in first.stderr
    _, manifest = ops.load_manifest(parse_ref(first.stdout.strip().splitlines()[-1]))
    source = manifest.provenance["source"]
    assert source["kind"] == "s3"
    assert source["digest"] == files_digest(ops.scan_dir(ckpt))  # the same digest as the local directory
    again = run_cli(*args, env={"KILN_LOG_LEVEL": "INFO"})
    assert again.returncode == 0, again.stderr
    assert "0 files to download" in again.stderr
    assert again.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]
    # A mirrored file damaged in place (same size, other bytes) is fetched again, never built from.
    (mirror,) = [d for d in (kiln_env / "sources" / "s3").iterdir() if (d / "source.txt").read_text().strip() == uri]
    mirrored = mirror / "files" / "model.safetensors"
    with open(mirrored, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 16)
    repaired = run_cli(*args, env={"KILN_LOG_LEVEL": "INFO"})
    assert repaired.returncode == 0, repaired.stderr
    assert "no longer match what was downloaded; fetching them again" in repaired.stderr
    assert "1 files to download" in repaired.stderr
    assert repaired.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]
    empty = run_cli("build", "model=hf", f"model.source=s3://{bucket}/hf/nothing/", "model.name=x")
    assert empty.returncode == 1
    assert "[source] model.source:" in empty.stderr
    assert "no objects matching" in empty.stderr

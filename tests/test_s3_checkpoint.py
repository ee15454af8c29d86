"""LMI's most common deployment: a plain Hugging Face checkpoint copied to an S3 prefix, named by ``HF_MODEL_ID``,
``option.model_id`` in serving.properties, or the serve argument. Against moto's server through a loopback proxy
that records every request, so the tests see which objects were fetched (and which were not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from artifacts.manifest import MANIFEST_NAME
from tests.conftest import run_cli, start_server
from tests.s3_server import FaultProxy, MotoS3

pytestmark = pytest.mark.integration
TRANSFORMERS = {"OPTION_ROLLING_BATCH": "scheduler"}  # starts in seconds; the S3 path is the engine's same


@dataclass
class Prefix:
    moto: MotoS3
    bucket: str
    uri: str
    ckpt: Path  # the local original

    def put(self, rel: str, body: bytes) -> None:
        key = self.uri.split("/", 3)[3] + rel
        self.moto.client().put_object(Bucket=self.bucket, Key=key, Body=body)


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny transformers-engine model as a plain Hugging Face checkpoint (no kiln manifest)."""
    d = tmp_path_factory.mktemp("plain") / "tiny-llama"
    assert run_cli("artifacts", "pull", tiny_hf_uri, str(d)).returncode == 0
    (d / MANIFEST_NAME).unlink()
    return d


def upload(moto: MotoS3, bucket: str, prefix: str, ckpt: Path, checksum: bool = False) -> str:
    s3 = moto.client()
    extra = {"ChecksumAlgorithm": "SHA256"} if checksum else {}
    for path in sorted(ckpt.rglob("*")):
        if path.is_file():
            s3.put_object(
                Bucket=bucket, Key=f"{prefix}{path.relative_to(ckpt).as_posix()}", Body=path.read_bytes(), **extra
            )
    return f"s3://{bucket}/{prefix}"


@pytest.fixture
def prefix(moto_s3: MotoS3, checkpoint: Path) -> Prefix:
    bucket = moto_s3.bucket("ckpt")
    uri = upload(moto_s3, bucket, "hf/tiny-llama/", checkpoint)
    p = Prefix(moto_s3, bucket, uri, checkpoint)
    p.put("README.md", b"not part of the checkpoint")
    p.put("original/consolidated.pth", b"pickle: never fetched by default")
    return p


@pytest.fixture
def proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    p = FaultProxy(upstream=int(moto_s3.endpoint.rsplit(":", 1)[1]))
    yield p
    p.close()


def weight_gets(proxy: FaultProxy) -> list[str]:
    return [r for r in proxy.requests if r.startswith("GET ") and ".safetensors" in r]


def mirror_of(logs: str) -> Path:
    (line,) = [x for x in logs.splitlines() if "serving its verified mirror " in x]
    return Path(line.rsplit("serving its verified mirror ", 1)[1].strip())


def ask(base: str) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "What color is the sky?"}], max_tokens=4
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens >= 1


def test_serve_a_plain_s3_checkpoint_three_ways_verified_and_cached(
    prefix: Prefix, proxy: FaultProxy, tmp_path: Path
) -> None:
    env = {**TRANSFORMERS, "AWS_ENDPOINT_URL": proxy.endpoint, "KILN_LOG_LEVEL": "INFO"}

    # `config` says what the location held, and fetches no weights to say it.
    shown = run_cli("runtime", "config", "--json", env={**env, "HF_MODEL_ID": prefix.uri})
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["model"] == {"location": prefix.uri, "kind": "plain Hugging Face checkpoint on S3"}
    assert weight_gets(proxy) == []
    assert not any("README.md" in r or "consolidated.pth" in r for r in proxy.requests)

    # HF_MODEL_ID (container mode): the weights come down once.
    server = start_server("", tmp_path, env={**env, "HF_MODEL_ID": prefix.uri})
    try:
        ask(server.base)
    finally:
        assert server.stop() == 0, server.logs()[-3000:]
    assert len(weight_gets(proxy)) >= 1
    assert "importing the transformers engine while the weights download" in server.logs()

    # serving.properties naming it (LMI's option.model_id): the intact mirror is re-verified, no weight is fetched.
    proxy.requests.clear()
    props = tmp_path / "model-dir"
    props.mkdir()
    (props / "serving.properties").write_text(f"option.model_id={prefix.uri}\noption.rolling_batch=scheduler\n")
    server = start_server(str(props), tmp_path, env=env)
    try:
        ask(server.base)
    finally:
        assert server.stop() == 0, server.logs()[-3000:]
    assert weight_gets(proxy) == [], proxy.requests
    assert "0 files to download" in server.logs()

    # A changed object is fetched again; a damaged mirror file too (never served).
    proxy.requests.clear()
    prefix.put("generation_config.json", json.dumps({"max_new_tokens": 7}).encode())
    mirror = mirror_of(server.logs())
    with open(mirror / "model.safetensors", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 16)
    server = start_server(prefix.uri, tmp_path, env=env)
    try:
        ask(server.base)
    finally:
        assert server.stop() == 0, server.logs()[-3000:]
    assert any(r.startswith("GET ") and "generation_config.json" in r for r in proxy.requests)
    assert len(weight_gets(proxy)) >= 1
    assert "no longer match what was downloaded; fetching them again" in server.logs()
    original = prefix.ckpt / "model.safetensors"
    assert (mirror / "model.safetensors").read_bytes() == original.read_bytes()
    assert json.loads((mirror / "generation_config.json").read_text()) == {"max_new_tokens": 7}
    assert not (mirror / "README.md").exists()
    assert not (mirror / "original").exists()

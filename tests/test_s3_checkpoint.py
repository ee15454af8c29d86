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
from tests.s3_server import FaultProxy, MotoS3, free_port
from tests.test_s3_faults import fails_cleanly, iam_user  # noqa: F401 (a fixture)
from tests.test_s3_store import make_artifact

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


# -- bad input: one line naming what and the fix, exit 1, no traceback, no credential, nothing half-written --------


def config_fails(uri: str, *needles: str, env: dict[str, str] | None = None) -> str:
    proc = run_cli("runtime", "config", env={**TRANSFORMERS, "HF_MODEL_ID": uri, **(env or {})}, timeout=120)
    err = fails_cleanly(proc, *needles)
    assert len([x for x in err.splitlines() if x.startswith("kiln runtime:")]) == 1, err
    return err


def test_prefixes_that_hold_no_servable_checkpoint_are_refused_naming_what_they_hold(
    moto_s3: MotoS3, checkpoint: Path, tmp_path: Path
) -> None:
    bucket = moto_s3.bucket("bad")
    s3 = moto_s3.client()
    config_fails("s3://kiln-no-such-bucket/llama/", "bucket 'kiln-no-such-bucket' does not exist")
    config_fails(f"s3://{bucket}/missing/", f"s3://{bucket}/missing/: nothing to serve", "aws s3 sync")
    s3.put_object(Bucket=bucket, Key="empty/", Body=b"")  # a console-made "folder"
    config_fails(f"s3://{bucket}/empty/", "nothing to serve")
    s3.put_object(Bucket=bucket, Key="noconfig/model.safetensors", Body=b"x")
    config_fails(f"s3://{bucket}/noconfig/", "holds 1 objects but no config.json at its top")
    upload(moto_s3, bucket, "nested/tiny/", checkpoint)
    config_fails(f"s3://{bucket}/nested/", f"config.json is under s3://{bucket}/nested/tiny/: point there")
    push = run_cli("artifacts", "push", str(make_artifact(tmp_path)[0]), f"s3://{bucket}/store")
    assert push.returncode == 0, push.stderr
    config_fails(f"s3://{bucket}/store/", "is a kiln artifact store, not a model", f"s3://{bucket}/store/<name>:<tag>")
    for path in checkpoint.iterdir():
        if path.suffix != ".safetensors":
            s3.upload_file(str(path), bucket, f"pickled/{path.name}")
    s3.put_object(Bucket=bucket, Key="pickled/pytorch_model.bin", Body=b"\x80\x04pickle")
    config_fails(f"s3://{bucket}/pickled/", "only pickle weights (pytorch_model.bin)", "OPTION_ALLOW_PICKLE=true")
    s3.delete_object(Bucket=bucket, Key="pickled/pytorch_model.bin")
    config_fails(f"s3://{bucket}/pickled/", "holds config.json but no weights")


def test_pickle_weights_come_only_when_allowed(moto_s3: MotoS3, checkpoint: Path) -> None:
    from artifacts.errors import ArtifactError
    from runtime.resolve import resolve

    bucket = moto_s3.bucket("pickle")
    for path in checkpoint.iterdir():
        if path.suffix != ".safetensors":
            moto_s3.client().upload_file(str(path), bucket, f"p/{path.name}")
    moto_s3.client().put_object(Bucket=bucket, Key="p/pytorch_model.bin", Body=b"\x80\x04weights")
    with pytest.raises(ArtifactError, match="only pickle weights"):
        resolve(f"s3://{bucket}/p/")
    allowed = resolve(f"s3://{bucket}/p/", allow_pickle=True)
    assert allowed.weights is not None
    allowed.weights.wait()
    assert (allowed.path / "pytorch_model.bin").read_bytes() == b"\x80\x04weights"
    shown = run_cli(
        "runtime", "config", env={**TRANSFORMERS, "HF_MODEL_ID": f"s3://{bucket}/p/", "OPTION_ALLOW_PICKLE": "true"}
    )
    assert shown.returncode == 0, shown.stderr
    assert "allow_pickle" in shown.stdout


def test_access_denied(prefix: Prefix, iam_user: dict[str, str]) -> None:  # noqa: F811
    config_fails(prefix.uri, "access denied", "s3:ListBucket", env=iam_user)


def test_unreachable_endpoint(prefix: Prefix) -> None:
    config_fails(
        prefix.uri, "cannot be reached", "AWS_ENDPOINT_URL", env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    )


def test_a_killed_weight_fetch_resumes_and_never_leaves_a_partial_file(
    prefix: Prefix, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from artifacts.errors import ArtifactError
    from runtime.resolve import resolve

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    model = resolve(prefix.uri)  # the small files: complete and recorded
    assert model.weights is not None
    proxy.cut_after, proxy.cuts = 0, -1  # every request from here on is cut: the weight download fails
    with pytest.raises(ArtifactError):
        model.weights.wait()
    assert not (model.path / "model.safetensors").exists()
    assert [p.name for p in model.path.glob(".tmp-*")] == []
    proxy.heal()
    proxy.requests.clear()
    again = resolve(prefix.uri)
    assert not any(r.startswith("GET ") and "config.json" in r for r in proxy.requests)  # kept, re-verified
    assert again.weights is not None
    again.weights.wait()
    assert (again.path / "model.safetensors").read_bytes() == (prefix.ckpt / "model.safetensors").read_bytes()


def test_s3_sha256_checksums_are_checked(moto_s3: MotoS3, checkpoint: Path) -> None:
    from artifacts.errors import VerificationError
    from artifacts.s3 import S3Transport
    from artifacts.s3_mirror import _check_s3_checksum, open_prefix

    bucket = moto_s3.bucket("sums")
    uri = upload(moto_s3, bucket, "m/", checkpoint, checksum=True)
    mirror = open_prefix(uri, ["*"])
    assert all(o.sha256_checksum for o in mirror.objects)
    entries = mirror.fetch()  # every file matches S3's own SHA-256
    assert {e.path for e in entries} == {p.name for p in checkpoint.iterdir()}
    (obj,) = [o for o in mirror.objects if o.rel == "config.json"]
    with pytest.raises(VerificationError, match="do not match the SHA-256 checksum S3 holds"):
        _check_s3_checksum(S3Transport(bucket), obj, b"\x00" * 32)  # what a corrupted download would hash to

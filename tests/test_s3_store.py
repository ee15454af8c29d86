"""The S3 store against moto's server on loopback, over HTTP: layout, dedup, multipart, streaming verification,
copies between stores, corrupt or vanishing objects, dropped connections and killed publishes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts import ops
from artifacts.errors import ManifestError, NotFoundError, StoreError, UriError, VerificationError
from artifacts.manifest import Manifest, Target
from artifacts.s3 import S3Store, redact
from artifacts.uri import parse_ref
from runtime.exitcodes import EX_CONFIG
from tests.conftest import ROOT, run_cli
from tests.s3_server import FaultProxy, MotoS3

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
TARGET = Target(
    engine="vllm", engine_version="", devices=("cpu",), dtype="bfloat16", tensor_parallel_degree=1, max_model_len=64
)


def make_artifact(root: Path, name: str = "demo", files: dict[str, bytes] | None = None) -> tuple[Path, Manifest]:
    d = root / name
    files = files or {"config.json": b'{"a": 1}', "sub/model.bin": os.urandom(3 * MiB), "copy.bin": b"same" * 100}
    if "copy.bin" in files:
        files["copy2.bin"] = files["copy.bin"]  # identical content: stored once
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    m = Manifest.create(name=name, files=ops.scan_dir(d), target=TARGET, serving={}, provenance={})
    (d / "manifest.json").write_bytes(m.to_bytes())
    return d, m


def blob_key(m: Manifest, path: str, prefix: str = "store") -> str:
    entry = next(e for e in m.files if e.path == path)
    return f"{prefix}/blobs/sha256/{entry.sha256.split(':')[1]}"


def test_publish_pull_layout_and_dedup(moto_s3: MotoS3, tmp_path: Path) -> None:
    bucket = moto_s3.bucket()
    src, m = make_artifact(tmp_path)
    ref = ops.publish(src, m, f"s3://{bucket}/store", tags=["latest", "v1"], record={"host": "test"})
    assert str(ref) == f"s3://{bucket}/store/demo@{m.digest}"
    keys = moto_s3.keys(bucket)
    hexd = m.digest.split(":")[1]
    assert len([k for k in keys if "/blobs/" in k]) == 4  # config, model.bin, copy (once), the manifest
    assert {f"store/names/demo/manifests/{hexd}", "store/names/demo/tags/latest", "store/names/demo/tags/v1"} <= set(
        keys
    )
    assert f"store/names/demo/records/{hexd}.json" in keys
    got = ops.pull(parse_ref(f"s3://{bucket}/store/demo:v1"), tmp_path / "pulled")
    assert got.digest == m.digest
    assert (tmp_path / "pulled" / "sub" / "model.bin").read_bytes() == (src / "sub" / "model.bin").read_bytes()
    assert ops.verify_dir(tmp_path / "pulled", got) == []
    ops.verify_ref(ref)
    [info] = S3Store(f"s3://{bucket}/store").list_artifacts()
    assert (info.name, info.digests, info.tags) == ("demo", (m.digest,), {"latest": m.digest, "v1": m.digest})


def test_multipart_upload_and_ranged_download(moto_s3: MotoS3, tmp_path: Path) -> None:
    """A blob above the part size goes up in parts and comes down in parallel ranges, hashed in order."""
    bucket = moto_s3.bucket()
    src, m = make_artifact(tmp_path, files={"big.bin": os.urandom(13 * MiB)})
    store = S3Store(f"s3://{bucket}/store", part_size=5 * MiB, range_size=1 * MiB, buffer_chunks=3)
    entry = next(e for e in m.files if e.path == "big.bin")
    store.put_blob(entry.sha256, src / "big.bin", entry.size)
    head = moto_s3.client().head_object(Bucket=bucket, Key=blob_key(m, "big.bin"))
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 3 MiB
    seen: list[int] = []
    store.fetch_blob(entry.sha256, entry.size, tmp_path / "out.bin", seen.append)
    assert (tmp_path / "out.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert seen == [MiB] * 13  # thirteen ranges, delivered in order
    store.check_blob(entry.sha256, entry.size)


def test_republish_uploads_only_what_is_missing(
    moto_s3: MotoS3, fault_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto_s3.bucket()
    src, m = make_artifact(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)  # count the bytes sent to S3
    ref = ops.publish(src, m, f"s3://{bucket}/store", tags=["latest"])
    first = fault_proxy.sent
    assert first > 3 * MiB
    assert ops.publish(src, m, f"s3://{bucket}/store", tags=["latest"]) == ref
    assert fault_proxy.sent - first < 64 * 1024  # HEADs, the manifest marker and the tag: no blob bytes
    # A new version sharing all but one small file uploads only that file.
    (src / "config.json").write_text('{"a": 2}')
    m2 = Manifest.create(name="demo", files=ops.scan_dir(src), target=TARGET, serving={}, provenance={})
    before = fault_proxy.sent
    ops.publish(src, m2, f"s3://{bucket}/store", tags=["latest"])
    assert fault_proxy.sent - before < 64 * 1024
    assert ops.resolve(parse_ref(f"s3://{bucket}/store/demo:latest")).digest == m2.digest


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["single-put", "multipart"])
def test_source_changed_after_hashing_is_never_stored(moto_s3: MotoS3, tmp_path: Path, size: int) -> None:
    bucket = moto_s3.bucket()
    src, m = make_artifact(tmp_path, files={"w.bin": os.urandom(size)})
    (src / "w.bin").write_bytes(os.urandom(size))  # same size, other bytes: the manifest is now stale
    store = f"s3://{bucket}/store"
    with pytest.raises(VerificationError, match=r"w\.bin .*is corrupt"):
        _publish_small_parts(src, m, store)
    assert moto_s3.keys(bucket) == []  # no blob, no manifest, no tag
    assert moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted


def _publish_small_parts(src: Path, m: Manifest, store_uri: str) -> None:
    store = S3Store(store_uri, part_size=5 * MiB)
    for e in m.files:
        store.put_blob(e.sha256, src / e.path, e.size)


def test_copy_streams_between_stores(moto_s3: MotoS3, tmp_path: Path) -> None:
    a, b = moto_s3.bucket(), moto_s3.bucket()
    src, m = make_artifact(tmp_path)
    local = ops.publish(src, m, f"file://{tmp_path}/local")
    on_a = ops.copy(local, f"s3://{a}/x", tags=["latest"])
    proc = run_cli("artifacts", "copy", f"s3://{a}/x/demo:latest", f"s3://{b}", "--tag", "prod")
    assert proc.returncode == 0, proc.stderr
    on_b = parse_ref(proc.stdout.strip())
    back = ops.copy(on_b, f"file://{tmp_path}/back", tags=["latest"])
    assert on_a.digest == on_b.digest == back.digest == m.digest
    ops.verify_ref(parse_ref(f"s3://{b}/demo:prod"))
    ops.verify_ref(parse_ref(f"file://{tmp_path}/back/demo:latest"))
    ls = run_cli("artifacts", "ls", f"s3://{b}")
    assert ls.stdout.strip() == f"s3://{b}/demo@{m.digest}  tags: prod"


@pytest.mark.parametrize("damage", ["truncated", "replaced"])
def test_corrupt_blob_is_refused_naming_the_object(moto_s3: MotoS3, tmp_path: Path, damage: str) -> None:
    bucket = moto_s3.bucket()
    src, m = make_artifact(tmp_path)
    ref = ops.publish(src, m, f"s3://{bucket}/store", tags=["latest"])
    key = blob_key(m, "sub/model.bin")
    good = (src / "sub" / "model.bin").read_bytes()
    bad = good[: len(good) // 2] if damage == "truncated" else good[:-4] + b"\x00\x01\x02\x03"
    moto_s3.client().put_object(Bucket=bucket, Key=key, Body=bad)
    with pytest.raises(VerificationError, match=key):
        ops.verify_ref(ref)
    with pytest.raises(VerificationError, match=rf"sub/model\.bin: s3://{bucket}/{key} is corrupt"):
        ops.pull(ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".pull-*"))
    if damage == "replaced":  # the CLI says the same, and exits 1
        proc = run_cli("artifacts", "pull", str(ref), str(tmp_path / "out2"))
        assert proc.returncode == 1
        assert key in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_object_vanishing_mid_download(moto_s3: MotoS3, tmp_path: Path, change: str) -> None:
    bucket = moto_s3.bucket()
    data = os.urandom(12 * MiB)
    src, m = make_artifact(tmp_path, files={"big.bin": data})
    store = S3Store(f"s3://{bucket}/store", range_size=1 * MiB, buffer_chunks=2, concurrency=2)
    entry = m.files[0] if m.files[0].path == "big.bin" else m.files[1]
    store.put_blob(entry.sha256, src / "big.bin", entry.size)
    key = blob_key(m, "big.bin")
    client = moto_s3.client()

    def meddle(_: int) -> None:
        if change == "deleted":
            client.delete_object(Bucket=bucket, Key=key)
        else:
            client.put_object(Bucket=bucket, Key=key, Body=data[::-1])

    dest = tmp_path / "got" / "big.bin"
    error = NotFoundError if change == "deleted" else VerificationError
    with pytest.raises(error, match=key):
        store.fetch_blob(entry.sha256, entry.size, dest, meddle)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []  # no partial file left


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/escape.txt", "a/../../escape.txt"])
def test_manifest_naming_paths_outside_the_artifact(moto_s3: MotoS3, tmp_path: Path, path: str) -> None:
    """A hostile manifest planted in the bucket is refused before anything is written."""
    bucket = moto_s3.bucket()
    src, m = make_artifact(tmp_path)
    ref = ops.publish(src, m, f"s3://{bucket}/store")
    raw = json.loads(m.to_bytes())
    raw["files"][0]["path"] = path
    data = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    hexd = hashlib.sha256(data).hexdigest()
    c = moto_s3.client()
    c.put_object(Bucket=bucket, Key=f"store/blobs/sha256/{hexd}", Body=data)
    c.put_object(Bucket=bucket, Key=f"store/names/demo/manifests/{hexd}", Body=b"")
    c.put_object(Bucket=bucket, Key="store/names/demo/tags/evil", Body=f"sha256:{hexd}".encode())
    with pytest.raises(ManifestError, match="unsafe path"):
        ops.pull(parse_ref(f"s3://{bucket}/store/demo:evil"), tmp_path / "out" / "art")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    assert not (tmp_path / "escape.txt").exists()
    if path.startswith(".."):  # the runtime refuses it the same way (one CLI run is enough)
        proc = run_cli("runtime", "serve", f"{ref.store}/demo:evil", "--port", "1", timeout=120)
        assert proc.returncode == EX_CONFIG
        assert "unsafe path" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_push_refuses_a_directory_with_symlinks(moto_s3: MotoS3, tmp_path: Path) -> None:
    bucket = moto_s3.bucket()
    src, _ = make_artifact(tmp_path)
    (tmp_path / "secret.txt").write_text("outside")
    (src / "config.json").unlink()
    os.symlink(tmp_path / "secret.txt", src / "config.json")
    proc = run_cli("artifacts", "push", str(src), f"s3://{bucket}/store")
    assert proc.returncode == 1
    assert "symlink" in proc.stderr
    assert moto_s3.keys(bucket) == []


def test_bad_s3_uris_named() -> None:
    with pytest.raises(UriError, match="not a valid S3 bucket name"):
        S3Store("s3://ab/prefix")
    with pytest.raises(UriError, match="not a valid S3 bucket name"):
        S3Store("s3://Bad_Bucket")
    with pytest.raises(UriError, match="'..'"):
        S3Store("s3://bucket/a/../b")


def test_redact_removes_credentials() -> None:
    url = (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F2026"
        "&X-Amz-Signature=0123abcd&X-Amz-Security-Token=FwoGZXIvYXdzE"
    )
    text = redact(
        f"failed {url} with key AKIAIOSFODNN7EXAMPLE and secret sekrit-value-1234 via http://u:pw-9876@proxy:8080/",
        ["sekrit-value-1234"],
    )
    assert "pw-9876" not in text
    assert "AKIAIOSFODNN7EXAMPLE" not in text
    assert "0123abcd" not in text
    assert "FwoGZXIvYXdzE" not in text
    assert "sekrit-value-1234" not in text
    assert "https://b.s3.amazonaws.com/k" in text


def test_connection_dropped_mid_upload_then_resumed(moto_s3: MotoS3, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """Every connection that carries more than 4 MiB is reset: the big blob fails, retries included; nothing
    half-published is visible; once the network heals, re-running uploads only what is missing."""
    bucket = moto_s3.bucket()
    src, m = make_artifact(tmp_path, files={"config.json": b"{}", "small.bin": os.urandom(2 * MiB)})
    (src / "big.bin").write_bytes(os.urandom(20 * MiB))
    m = Manifest.create(name="demo", files=ops.scan_dir(src), target=TARGET, serving={}, provenance={})
    (src / "manifest.json").write_bytes(m.to_bytes())
    fault_proxy.cut_after = 4 * MiB
    env = {"AWS_ENDPOINT_URL": fault_proxy.endpoint, "AWS_MAX_ATTEMPTS": "2"}
    proc = run_cli("artifacts", "push", str(src), f"s3://{bucket}/store", "--tag", "latest", env=env)
    assert proc.returncode == 1
    assert "connection" in proc.stderr
    assert "re-run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert fault_proxy.resets >= 2
    keys = moto_s3.keys(bucket)
    assert blob_key(m, "big.bin") not in keys
    assert blob_key(m, "small.bin") in keys  # finished blobs stay: the re-run skips them
    assert not [k for k in keys if "/names/" in k]  # no manifest, no tag
    assert moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted
    fault_proxy.heal()
    before = fault_proxy.sent
    os.environ["AWS_ENDPOINT_URL"], saved = fault_proxy.endpoint, os.environ["AWS_ENDPOINT_URL"]
    try:
        ops.publish(src, m, f"s3://{bucket}/store", tags=["latest"])
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
    assert 20 * MiB <= fault_proxy.sent - before < 21 * MiB  # the big blob only
    ops.verify_ref(parse_ref(f"s3://{bucket}/store/demo:latest"))


def test_transient_drop_is_retried(
    moto_s3: MotoS3, fault_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto_s3.bucket()
    src, m = make_artifact(tmp_path)
    fault_proxy.cut_after, fault_proxy.cuts = 1 * MiB, 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    ref = ops.publish(src, m, f"s3://{bucket}/s")
    assert fault_proxy.resets == 1
    ops.verify_ref(ref)


@pytest.mark.usefixtures("tiny_uri")  # the tiny build's stages are cached: the build goes straight to publish
def test_killed_build_publish_leaves_nothing_and_rerun_completes(moto_s3: MotoS3, fault_proxy: FaultProxy) -> None:
    """SIGKILL a ``python -m build publish=s3`` while its weights are on the wire, then run it again."""
    bucket = moto_s3.bucket()
    uri = f"s3://{bucket}/models"
    args = [sys.executable, "-m", "build", "publish=s3", f"publish.uri={uri}", "model.name=tiny-kill"]
    fault_proxy.rate = 1 * MiB  # bytes/s: slow enough to kill mid-upload
    env = {**os.environ, "AWS_ENDPOINT_URL": fault_proxy.endpoint}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while fault_proxy.sent < 1 * MiB and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert fault_proxy.sent >= 1 * MiB, "the build never started uploading"
    assert not [k for k in moto_s3.keys(bucket) if "/names/" in k]  # nothing points at the partial upload
    fault_proxy.heal()
    again = run_cli("build", "publish=s3", f"publish.uri={uri}", "model.name=tiny-kill", env=env)
    assert again.returncode == 0, again.stderr
    ref = parse_ref(again.stdout.strip().splitlines()[-1])
    ops.verify_ref(ref)
    ops.verify_ref(parse_ref(f"{uri}/tiny-kill:latest"))


def test_missing_objects_are_named(moto_s3: MotoS3, tmp_path: Path) -> None:
    bucket = moto_s3.bucket()
    with pytest.raises(NotFoundError, match=f"s3://{bucket}/demo:latest does not exist"):
        ops.load_manifest(parse_ref(f"s3://{bucket}/demo:latest"))
    with pytest.raises(NotFoundError, match="does not exist"):
        ops.load_manifest(parse_ref(f"s3://{bucket}/demo@sha256:{'0' * 64}"))
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-kiln' does not exist"):
        ops.load_manifest(parse_ref("s3://no-such-bucket-kiln/demo:latest"))

"""The local content-addressed store and the operations on it: publish, pull, verify, copy, tags, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from artifacts import ops
from artifacts.errors import NotFoundError, UriError, VerificationError
from artifacts.local import LocalStore
from artifacts.manifest import Manifest, Target
from artifacts.uri import parse_ref
from tests.conftest import run_cli

pytestmark = pytest.mark.unit


def make_artifact(root: Path, name: str = "demo", payload: bytes = b"weights" * 1000) -> tuple[Path, Manifest]:
    d = root / name
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "model.bin").write_bytes(payload)
    (d / "copy.bin").write_bytes(payload)  # identical content: stored once
    target = Target(
        engine="vllm", engine_version="", devices=("cpu",), dtype="bfloat16", tensor_parallel_degree=1, max_model_len=64
    )
    m = Manifest.create(name=name, files=ops.scan_dir(d), target=target, serving={}, provenance={})
    (d / "manifest.json").write_bytes(m.to_bytes())
    return d, m


def test_publish_pull_round_trip_and_dedup(tmp_path: Path) -> None:
    src, m = make_artifact(tmp_path)
    store_uri = f"file://{tmp_path}/store"
    ref = ops.publish(src, m, store_uri, tags=["latest", "v1"])
    assert ref.digest == m.digest
    blobs = list((tmp_path / "store" / "blobs" / "sha256").iterdir())
    assert len(blobs) == 3  # config, one payload (deduplicated), the manifest itself
    pulled = tmp_path / "pulled"
    got = ops.pull(parse_ref(f"{store_uri}/demo:v1"), pulled)
    assert got.digest == m.digest
    assert (pulled / "sub" / "model.bin").read_bytes() == (src / "sub" / "model.bin").read_bytes()
    assert ops.verify_dir(pulled, got) == []


def test_republish_uploads_nothing(tmp_path: Path) -> None:
    src, m = make_artifact(tmp_path)
    store = LocalStore(f"file://{tmp_path}/store")
    ops.publish(src, m, store.uri)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()}
    ops.publish(src, m, store.uri)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()}
    assert before == after


def test_corrupt_blob_detected_by_verify_and_pull(tmp_path: Path) -> None:
    src, m = make_artifact(tmp_path)
    ref = ops.publish(src, m, f"file://{tmp_path}/store")
    entry = next(e for e in m.files if e.path == "config.json")
    blob = LocalStore(ref.store).blob_path(entry.sha256)
    blob.chmod(0o644)
    blob.write_text('{"a": 2}')
    with pytest.raises(VerificationError, match=entry.sha256):
        ops.verify_ref(ref)
    with pytest.raises(VerificationError, match="corrupt"):
        ops.pull(ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pull-")]  # no partial directory left


def test_verify_dir_names_the_bad_file(tmp_path: Path) -> None:
    src, m = make_artifact(tmp_path)
    with open(src / "sub" / "model.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(VerificationError, match=r"sub/model\.bin: size 10"):
        ops.verify_dir(src, m)
    (src / "sub" / "model.bin").unlink()
    os.symlink(src / "copy.bin", src / "sub" / "model.bin")
    with pytest.raises(VerificationError, match="symlink"):
        ops.verify_dir(src, m)


def test_missing_tag_and_digest(tmp_path: Path) -> None:
    src, m = make_artifact(tmp_path)
    ref = ops.publish(src, m, f"file://{tmp_path}/store")
    with pytest.raises(NotFoundError, match="demo:nope"):
        ops.load_manifest(parse_ref(f"{ref.store}/demo:nope"))
    with pytest.raises(NotFoundError, match="does not exist"):
        ops.load_manifest(parse_ref(f"{ref.store}/demo@sha256:{'0' * 64}"))


def test_copy_between_stores(tmp_path: Path) -> None:
    src, m = make_artifact(tmp_path)
    ref = ops.publish(src, m, f"file://{tmp_path}/a")
    copied = ops.copy(ref, f"file://{tmp_path}/b", tags=["latest"])
    assert copied.digest == ref.digest
    ops.verify_ref(parse_ref(f"file://{tmp_path}/b/demo:latest"))


@pytest.mark.integration  # spawns the CLI
def test_cli_ls_show_verify_pull_push(tmp_path: Path) -> None:
    src, m = make_artifact(tmp_path)
    store = f"file://{tmp_path}/store"
    push = run_cli("artifacts", "push", str(src), store, "--tag", "latest")
    assert push.returncode == 0, push.stderr
    uri = push.stdout.strip()
    assert uri == f"{store}/demo@{m.digest}"
    ls = run_cli("artifacts", "ls", store)
    assert f"{uri}  tags: latest" in ls.stdout
    show = run_cli("artifacts", "show", f"{store}/demo:latest")
    assert json.loads(show.stdout)["manifest"]["name"] == "demo"
    assert run_cli("artifacts", "verify", uri).returncode == 0
    assert run_cli("artifacts", "pull", uri, str(tmp_path / "p")).returncode == 0
    assert run_cli("artifacts", "verify", str(tmp_path / "p")).returncode == 0
    (tmp_path / "p" / "config.json").write_text("{}")
    bad = run_cli("artifacts", "verify", str(tmp_path / "p"))
    assert bad.returncode == 1
    assert "config.json" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_cli("artifacts", "show", f"{store}/nope:latest")
    assert missing.returncode == 1
    assert "nope:latest does not exist" in missing.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file:///x/Bad@sha256:abc", "digest must be"),
        ("file:///x/Bad:tag", "invalid artifact name"),
        ("ftp://host/x:tag", "not a store URI"),
        ("a/b:c", "neither a store URI"),
    ],
)
def test_bad_uris_named(text: str, message: str) -> None:
    from artifacts.errors import UriError

    with pytest.raises(UriError, match=message):
        parse_ref(text, "file:///tmp/store")


@pytest.mark.parametrize("tag", ["../../../escaped", "a/b", "..", ".hidden", "", "x" * 129, "tag with space"])
def test_tags_outside_the_rule_are_refused_before_anything_is_written(tmp_path: Path, tag: str) -> None:
    src, m = make_artifact(tmp_path)
    store = tmp_path / "store"
    with pytest.raises(UriError, match="tag .* is invalid: use letters, digits"):
        ops.publish(src, m, f"file://{store}", tags=["latest", tag])
    assert not store.exists()  # refused before the first blob: nothing half-published
    ref = ops.publish(src, m, f"file://{store}")
    with pytest.raises(UriError, match="is invalid"):
        ops.copy(ref, f"file://{tmp_path}/other", tags=[tag])
    with pytest.raises(UriError, match="is invalid"):  # the store itself checks too: every entry point, one rule
        LocalStore(f"file://{store}").set_tag("demo", tag, m.digest)
    assert sorted(p.name for p in store.iterdir()) == ["blobs", "names"]
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("name", ["../up", "a/b", "Upper", ".."])
def test_names_and_digests_outside_the_rule_are_refused_by_the_store(tmp_path: Path, name: str) -> None:
    store = LocalStore(f"file://{tmp_path}/store")
    with pytest.raises(UriError, match="artifact name .* is invalid"):
        store.put_manifest(name, b"{}")
    with pytest.raises(UriError, match="artifact name .* is invalid"):
        store.resolve_tag(name, "latest")
    with pytest.raises(UriError, match="digest .* is invalid"):
        store.set_tag("demo", "latest", "sha256:../../x")
    assert not (tmp_path / "store" / "names").exists()


@pytest.mark.integration  # spawns the CLI
def test_cli_push_refuses_a_traversing_tag(tmp_path: Path) -> None:
    src, _ = make_artifact(tmp_path)
    store = tmp_path / "store"
    proc = run_cli("artifacts", "push", str(src), f"file://{store}", "--tag", "../../../escaped")
    assert proc.returncode == 1
    assert "tag '../../../escaped' is invalid: use letters, digits" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "escaped").exists()
    assert not store.exists()

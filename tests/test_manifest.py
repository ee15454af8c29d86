"""The manifest format: canonical bytes, digests, validation of unsafe content."""

from __future__ import annotations

import json

import pytest

from artifacts.digest import sha256_bytes
from artifacts.errors import ManifestError
from artifacts.manifest import FileEntry, Manifest, Target, canonical_json

pytestmark = pytest.mark.unit
D = "sha256:" + "a" * 64


def target(**kw: object) -> Target:
    base = {
        "engine": "vllm",
        "engine_version": "",
        "devices": ("cpu",),
        "dtype": "bfloat16",
        "tensor_parallel_degree": 1,
        "max_model_len": 128,
    }
    return Target(**{**base, **kw})  # type: ignore[arg-type]


def manifest(files: list[FileEntry] | None = None, **kw: object) -> Manifest:
    return Manifest.create(
        name=str(kw.get("name", "m")),
        files=files or [FileEntry("a.json", 1, D)],
        target=target(),
        serving={"max_num_seqs": 4},
        provenance={"p": 1},
    )


def test_digest_is_sha256_of_canonical_bytes_and_order_independent() -> None:
    m1 = manifest([FileEntry("b", 2, D), FileEntry("a", 1, D)])
    m2 = manifest([FileEntry("a", 1, D), FileEntry("b", 2, D)])
    assert m1.to_bytes() == m2.to_bytes()
    assert m1.digest == sha256_bytes(m1.to_bytes())
    assert m1.to_bytes() == canonical_json(json.loads(m1.to_bytes()))


def test_round_trip_preserves_digest() -> None:
    m = manifest()
    again = Manifest.from_bytes(m.to_bytes())
    assert again == m
    assert again.digest == m.digest


@pytest.mark.parametrize(
    "path", ["../etc/passwd", "/abs", "a/../b", "a//b", "./a", "a\\b", "manifest.json", "signatures.json", ""]
)
def test_unsafe_paths_refused(path: str) -> None:
    with pytest.raises(ManifestError, match="path|manifest"):
        FileEntry(path, 1, D)


def test_file_and_directory_clash_refused() -> None:
    with pytest.raises(ManifestError, match="file and as a directory"):
        manifest([FileEntry("a", 1, D), FileEntry("a/b", 1, D)])


def test_duplicate_and_bad_digest_refused() -> None:
    with pytest.raises(ManifestError, match="twice"):
        manifest([FileEntry("a", 1, D), FileEntry("a", 1, D)])
    with pytest.raises(ManifestError, match="sha256"):
        FileEntry("a", 1, "md5:abc")


def test_unknown_schema_and_malformed_json_named() -> None:
    data = json.loads(manifest().to_bytes())
    data["schema"] = "kiln.artifact/v9"
    with pytest.raises(ManifestError, match="unsupported manifest schema 'kiln.artifact/v9'"):
        Manifest.from_bytes(json.dumps(data).encode())
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_bytes(b"{nope")


def test_unknown_target_fields_kept_for_the_runtime_to_refuse() -> None:
    data = json.loads(manifest().to_bytes())
    data["target"]["gpu_arch"] = "sm_90"
    m = Manifest.from_bytes(json.dumps(data).encode())
    assert m.target.unknown == {"gpu_arch": "sm_90"}
    assert json.loads(m.to_bytes())["target"]["gpu_arch"] == "sm_90"


def test_bad_name_refused() -> None:
    with pytest.raises(ManifestError, match="artifact name"):
        manifest(name="Bad Name")


@pytest.mark.parametrize(
    ("entries", "refusal"), [(1_000_000, "bytes, more than kiln reads"), (200_000, "lists 200000 files")]
)
def test_a_manifest_of_too_many_entries_is_refused_before_its_entries_are_validated(entries: int, refusal: str) -> None:
    """10^6 entries (118 MB of JSON) took 29 s of validation before the limits; 200 000 fit the byte limit."""
    data = json.loads(manifest().to_bytes())
    data["files"] = [{"path": f"f/{i}", "size": 1, "sha256": D} for i in range(entries)]
    with pytest.raises(ManifestError, match=refusal):
        Manifest.from_bytes(json.dumps(data).encode())


def test_a_manifest_larger_than_kiln_reads_is_refused_unparsed() -> None:
    from artifacts.manifest import MAX_MANIFEST_BYTES

    with pytest.raises(ManifestError, match="more than kiln reads"):
        Manifest.from_bytes(b" " * (MAX_MANIFEST_BYTES + 1))  # not JSON either: the size is checked first

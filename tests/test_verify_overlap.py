"""Verification overlapped with the engine's import: ``serve`` learns the engine from the manifest before it pulls or
hashes the files and imports the engine's libraries meanwhile; nothing is loaded before the hashes match."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from artifacts import ops
from artifacts.errors import VerificationError
from artifacts.manifest import Manifest
from artifacts.uri import parse_ref
from runtime.resolve import resolve
from tests.conftest import fake_registered

pytestmark = pytest.mark.integration


def artifact_dir(tiny_uri: str, dest: Path, engine: str | None = None) -> Path:
    ops.pull(parse_ref(tiny_uri), dest)
    if engine is not None:  # the same files, built for another engine (a directory verifies against its manifest)
        doc = json.loads((dest / "manifest.json").read_bytes())
        doc["target"]["engine"] = engine
        (dest / "manifest.json").write_bytes(Manifest.from_bytes(json.dumps(doc).encode()).to_bytes())
    return dest


def flip_a_weight_byte(model: Path) -> None:
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_the_manifest_is_announced_before_any_file_is_hashed(tiny_uri: str, tmp_path: Path) -> None:
    """The callback damages a weight file: that resolve then refuses it proves the hashing came after the callback
    (for a directory and for a pull-cache entry, the two paths that hash on every start)."""
    model = artifact_dir(tiny_uri, tmp_path / "dir")
    seen: list[str] = []

    def damage(manifest: Manifest) -> None:
        seen.append(manifest.target.engine)
        flip_a_weight_byte(model)

    with pytest.raises(VerificationError, match="model.safetensors"):
        resolve(str(model), on_manifest=damage)
    assert seen == ["vllm"]

    ref = resolve(tiny_uri)  # pulls into the session's pull cache (or finds it there)
    entry = ref.path
    seen.clear()

    def damage_entry(manifest: Manifest) -> None:
        seen.append(manifest.name)
        flip_a_weight_byte(entry)

    # the damaged entry is discarded and fetched again from the store, as before: the start still succeeds
    again = resolve(tiny_uri, on_manifest=damage_entry)
    assert seen
    assert set(seen) == {"tiny-llama"}
    assert ops.verify_dir(again.path, again.manifest) == []  # type: ignore[arg-type]


def test_serve_imports_the_engine_while_it_verifies(
    tiny_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from runtime.app import configure

    model = artifact_dir(tiny_uri, tmp_path / "dir", engine="transformers")
    with caplog.at_level(logging.INFO, logger="kiln.runtime"), fake_registered():
        startup = configure({"model": str(model)}, [], {"HF_HUB_OFFLINE": "1"}, prepare=True)
    assert startup.plan.spec.name == "transformers"
    messages = [r.getMessage() for r in caplog.records]
    importing = next(i for i, m in enumerate(messages) if m.startswith("importing the transformers engine while"))
    verified = next(i for i, m in enumerate(messages) if m.startswith("verified 6 files"))
    assert importing < verified, messages  # the import began before the hashing ended
    assert any(m.startswith("imported the transformers engine in") for m in messages), messages

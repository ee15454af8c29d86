"""Signed artifacts (artifacts/signing.py): Ed25519 signatures over the manifest digest, made at publish or later,
kept by every store, carried by pulled and staged directories, and required by a runtime with ``trusted_keys``."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from artifacts import ops, signing
from artifacts.store import open_store
from artifacts.uri import parse_ref
from tests.conftest import build, configure_with_fake, run_cli
from tests.s3_server import MotoS3

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
EX_CONFIG = 78


def independent_id(public_pem: Path) -> str:
    """The key id as the module docstring defines it, computed here from the PEM file with cryptography alone."""
    raw = load_pem_public_key(public_pem.read_bytes()).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two key pairs, "a" and "b": name -> private key path (the public key is beside it as .pub)."""
    out = {}
    for name in ("a", "b"):
        signing.generate(tmp_path / "keys" / name)
        out[name] = tmp_path / "keys" / name
    return out


def pub(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def trusted(*privates: Path) -> dict[str, signing.TrustedKey]:
    return {k.id: k for k in (signing.load_public(pub(p)) for p in privates)}


# -- the signature itself ------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_signature_verifies_only_for_its_key_and_its_manifest(keys: dict[str, Path]) -> None:
    doc = signing.sign(DIGEST_A, signing.load_private(keys["a"]))
    a_id, b_id = independent_id(pub(keys["a"])), independent_id(pub(keys["b"]))
    assert json.loads(doc)["key"] == a_id
    assert signing.check([doc], DIGEST_A, trusted(keys["a"]), "art") == a_id

    with pytest.raises(signing.SignatureError) as other_key:
        signing.check([doc], DIGEST_A, trusted(keys["b"]), "art")
    assert f"expected a signature by {b_id}" in str(other_key.value)
    assert f"{a_id} (not a trusted key)" in str(other_key.value)

    with pytest.raises(signing.SignatureError, match=f"signs another manifest, {DIGEST_A}"):
        signing.check([doc], DIGEST_B, trusted(keys["a"]), "art")

    # the document re-labelled for another manifest: the signature no longer matches what it claims to sign
    relabelled = json.dumps(json.loads(doc) | {"manifest": DIGEST_B}).encode()
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.check([relabelled], DIGEST_B, trusted(keys["a"]), "art")

    # a signature made by key b, labelled as key a's
    by_b = json.loads(signing.sign(DIGEST_A, signing.load_private(keys["b"])))
    forged = json.loads(doc) | {"signature": by_b["signature"]}
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.check([json.dumps(forged).encode()], DIGEST_A, trusted(keys["a"]), "art")

    with pytest.raises(signing.SignatureError, match="found no signature"):
        signing.check([], DIGEST_A, trusted(keys["a"]), "art")
    # one good signature among bad ones is enough
    assert signing.check([b"not json", relabelled, doc], DIGEST_A, trusted(keys["a"]), "art") == a_id


@pytest.mark.unit
def test_the_signed_bytes_are_the_prefixed_digest(keys: dict[str, Path]) -> None:
    """Checked with cryptography directly, so the payload is what the module docstring says it is."""
    doc = json.loads(signing.sign(DIGEST_A, signing.load_private(keys["a"])))
    public = load_pem_public_key(pub(keys["a"]).read_bytes())
    public.verify(base64.b64decode(doc["signature"]), b"kiln artifact manifest v1\n" + DIGEST_A.encode())  # type: ignore[union-attr]


@pytest.mark.unit
def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    proc = run_cli("artifacts", "keygen", str(tmp_path / "k"))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert f"key id: {independent_id(tmp_path / 'k.pub')}" in proc.stdout
    assert "PRIVATE KEY" not in proc.stdout + proc.stderr
    before = (tmp_path / "k").read_bytes()
    again = run_cli("artifacts", "keygen", str(tmp_path / "k"))
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert (tmp_path / "k").read_bytes() == before


@pytest.mark.unit
def test_keys_that_cannot_sign_are_refused_naming_the_file(keys: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(signing.SigningError, match="junk is not an unencrypted PEM private key"):
        signing.load_private(tmp_path / "junk")
    with pytest.raises(signing.SigningError, match="is not an unencrypted PEM private key"):
        signing.load_private(pub(keys["a"]))  # a public key given where the private one goes
    with pytest.raises(signing.SigningError, match="cannot read signing key"):
        signing.load_private(tmp_path / "missing")
    with pytest.raises(signing.SigningError, match="not a PEM public key"):
        signing.load_public(keys["a"])


# -- stores, pull, copy, the CLI -------------------------------------------------------------------------------------


def copy_of_tiny(tiny_uri: str, store: Path) -> str:
    """The session's tiny artifact copied (unsigned) into a store of the test's own; its URI by digest."""
    ref = ops.copy(parse_ref(tiny_uri), store.as_uri())
    return str(ref)


@pytest.mark.integration
def test_signatures_travel_with_pull_and_copy_and_verify_checks_them(
    tiny_uri: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    uri = copy_of_tiny(tiny_uri, tmp_path / "one")
    a_id = independent_id(pub(keys["a"]))
    unsigned = run_cli("artifacts", "verify", uri, "--trusted-key", str(pub(keys["a"])))
    assert unsigned.returncode == 1
    assert f"expected a signature by {a_id}" in unsigned.stderr

    signed = run_cli("artifacts", "sign", uri, "--key", str(keys["a"]))
    assert signed.returncode == 0, signed.stderr
    assert a_id in signed.stdout
    ok = run_cli("artifacts", "verify", uri, "--trusted-key", str(pub(keys["a"])))
    assert ok.returncode == 0, ok.stderr
    assert f"signed by {a_id}" in ok.stdout

    copied = ops.copy(parse_ref(uri), (tmp_path / "two").as_uri())
    carried = open_store(copied.store).get_signatures(copied.name, copied.digest or "")
    assert [json.loads(d)["key"] for d in carried] == [a_id]
    pulled = tmp_path / "pulled"
    ops.pull(parse_ref(uri), pulled)
    assert ops.verify_dir(pulled, ops.read_dir_manifest(pulled)) == []  # signatures.json is not an unlisted file
    ok_dir = run_cli("artifacts", "verify", str(pulled), "--trusted-key", str(pub(keys["a"])))
    assert ok_dir.returncode == 0, ok_dir.stderr
    assert f"signed by {a_id}" in ok_dir.stdout
    pushed = run_cli("artifacts", "push", str(pulled), (tmp_path / "three").as_uri())
    assert pushed.returncode == 0, pushed.stderr
    again = run_cli("artifacts", "verify", pushed.stdout.strip(), "--trusted-key", str(pub(keys["a"])))
    assert again.returncode == 0, again.stderr  # a pushed directory keeps its signatures
    wrong = run_cli("artifacts", "verify", str(pulled), "--trusted-key", str(pub(keys["b"])))
    assert wrong.returncode == 1
    assert f"{a_id} (not a trusted key)" in wrong.stderr


@pytest.mark.integration
def test_s3_stores_keep_signatures_and_staged_trees_carry_them(
    tiny_uri: str, keys: dict[str, Path], moto_s3: MotoS3, tmp_path: Path
) -> None:
    from artifacts.s3 import S3Store
    from artifacts.s3_tree import stage_tree, tree_prefix

    bucket = moto_s3.bucket()
    local = parse_ref(tiny_uri)
    _, manifest = ops.load_manifest(local)
    pulled = tmp_path / "tiny"
    ops.pull(local, pulled)
    ref = ops.publish(pulled, manifest, f"s3://{bucket}/store", signing_key=keys["b"])
    store = S3Store(f"s3://{bucket}/store")
    b_id = independent_id(pub(keys["b"]))
    assert [json.loads(d)["key"] for d in store.get_signatures(ref.name, ref.digest or "")] == [b_id]
    leaf = f"{(ref.digest or '').split(':')[1]}/{b_id.replace(':', '-')}.json"
    assert f"store/names/{ref.name}/signatures/{leaf}" in moto_s3.keys(bucket)
    stage_tree(store, manifest)
    carried = moto_s3.client().get_object(Bucket=bucket, Key=f"{tree_prefix(store, manifest)}/signatures.json")
    docs = [json.dumps(d).encode() for d in json.loads(carried["Body"].read())]
    assert signing.check(docs, manifest.digest, trusted(keys["b"]), "tree") == b_id


# -- publish at build time -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_build_signs_what_it_publishes_and_a_bad_key_publishes_nothing(
    tiny_uri: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    store = (tmp_path / "built").as_uri()
    (tmp_path / "junk.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    bad = run_cli("build", f"publish.uri={store}", f"publish.signing_key={tmp_path / 'junk.pem'}")
    assert bad.returncode != 0
    assert "publish.signing_key" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert "not a key" not in bad.stdout + bad.stderr  # the key file's content is never echoed
    assert not (tmp_path / "built" / "names").exists()

    uri = build(f"publish.uri={store}", f"publish.signing_key={keys['a']}")
    ref = ops.resolve(parse_ref(uri))
    docs = ops.signatures(ref)
    assert signing.check(docs, ref.digest or "", trusted(keys["a"]), uri) == independent_id(pub(keys["a"]))


# -- the runtime's requirement ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_serve_requires_a_trusted_signature_before_it_loads_anything(
    tiny_uri: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    uri = copy_of_tiny(tiny_uri, tmp_path / "store")
    env = {"OPTION_TRUSTED_KEYS": str(pub(keys["a"]))}
    a_id = independent_id(pub(keys["a"]))

    unsigned = run_cli("runtime", "serve", uri, env=env, timeout=120)
    assert unsigned.returncode == EX_CONFIG, unsigned.stderr
    assert f"expected a signature by {a_id}" in unsigned.stderr
    assert "found no signature" in unsigned.stderr
    assert "listening" not in unsigned.stderr
    assert "Traceback" not in unsigned.stderr

    ops.sign(parse_ref(uri), keys["b"])
    other = run_cli("runtime", "config", uri, env=env, timeout=120)
    assert other.returncode != 0
    assert f"{independent_id(pub(keys['b']))} (not a trusted key)" in other.stderr

    ops.sign(parse_ref(uri), keys["a"])  # after the first pull: serve picks the new signature up from the store
    ok = run_cli("runtime", "config", uri, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.integration
def test_the_models_own_files_cannot_choose_the_trusted_keys(
    tiny_uri: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    from runtime.config.schema import ConfigError

    model = tmp_path / "model"
    ops.pull(parse_ref(copy_of_tiny(tiny_uri, tmp_path / "store")), model)
    (model / "serving.properties").write_text(f"option.trusted_keys={pub(keys['b'])}\n")
    with pytest.raises(ConfigError) as exc:
        configure_with_fake(model, [])
    assert "trusted_keys cannot come from the model's own files" in str(exc.value)


@pytest.mark.integration
def test_a_plain_checkpoint_is_refused_when_signatures_are_required(tiny_dir: Path, keys: dict[str, Path]) -> None:
    from runtime.config.schema import ConfigError

    with pytest.raises(ConfigError, match="no kiln manifest to sign"):
        configure_with_fake(tiny_dir, [], {"OPTION_TRUSTED_KEYS": str(pub(keys["a"]))}, engine="fake")
    assert configure_with_fake(tiny_dir, [], engine="fake").plan is not None  # without the requirement it serves


@pytest.mark.integration
def test_adapters_must_be_signed_too_when_signatures_are_required(
    tiny_uri: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    import asyncio

    from runtime.adapters import AdapterRequestError, Adapters, Base
    from runtime.engines.base import EngineSettings
    from tests.conftest import adapter_build
    from tests.fake_engine.engine import FakeEngine

    base_uri, adapter_uri = adapter_build("adapter.synth.seed=0")
    assert base_uri == tiny_uri
    adapter = str(ops.copy(parse_ref(adapter_uri), (tmp_path / "store").as_uri()))  # unsigned, in a store of its own
    base_dir = tmp_path / "base"
    ops.pull(parse_ref(tiny_uri), base_dir)
    engine = FakeEngine(EngineSettings(model_dir=base_dir))
    base = Base("tiny-llama", base_dir, ops.read_dir_manifest(base_dir).digest)
    registry = Adapters.create(engine, base, 64, [str(tmp_path)], trusted_keys=[str(pub(keys["a"]))])
    a_id = independent_id(pub(keys["a"]))

    async def register(name: str, src: str) -> None:
        await engine.start()
        await registry.register(name, src)

    with pytest.raises(AdapterRequestError) as unsigned:
        asyncio.run(register("lora", adapter))
    assert unsigned.value.status == 400
    assert f"expected a signature by {a_id}" in unsigned.value.message
    plain = tmp_path / "plain-peft"
    ops.pull(parse_ref(adapter), plain)
    (plain / "manifest.json").unlink()
    with pytest.raises(AdapterRequestError, match="plain PEFT directory"):
        asyncio.run(register("plain", str(plain)))

    ops.sign(parse_ref(adapter), keys["a"])
    asyncio.run(register("lora", adapter))
    assert registry.get("lora") is not None

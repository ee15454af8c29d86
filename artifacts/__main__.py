"""``python -m artifacts ls | show | verify | pull | push | copy | keygen | sign``: inspect, move, sign artifacts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from artifacts import ops, signing
from artifacts.errors import ArtifactError
from artifacts.logs import setup_logging
from artifacts.paths import default_store_uri
from artifacts.store import open_store
from artifacts.uri import ArtifactRef, normalize_store_uri, parse_ref


def _ref(text: str) -> ArtifactRef:
    return parse_ref(text, default_store_uri())


def cmd_ls(args: argparse.Namespace) -> int:
    store = open_store(normalize_store_uri(args.store) if args.store else default_store_uri())
    for info in store.list_artifacts():
        by_digest = {d: sorted(t for t, td in info.tags.items() if td == d) for d in info.digests}
        for digest, tags in by_digest.items():
            print(f"{store.uri}/{info.name}@{digest}" + (f"  tags: {', '.join(tags)}" if tags else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    ref, manifest = ops.load_manifest(_ref(args.uri))
    print(json.dumps({"uri": str(ref), "digest": ref.digest, "manifest": manifest.to_dict()}, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    trusted = {k.id: k for k in map(signing.load_public, args.trusted_key)}
    path = Path(args.uri)
    if path.is_dir():
        manifest = ops.read_dir_manifest(path)
        extra = ops.verify_dir(path, manifest)
        signer = trusted and signing.check(signing.read_dir(path), manifest.digest, trusted, str(path))
        print(f"ok: {path} matches {manifest.name}@{manifest.digest} ({len(manifest.files)} files)")
        for rel in extra:
            print(f"note: {rel} is not listed in the manifest", file=sys.stderr)
    else:
        ref, manifest = ops.verify_ref(_ref(args.uri))
        signer = trusted and signing.check(ops.signatures(ref), manifest.digest, trusted, str(ref))
        print(f"ok: {ref} ({len(manifest.files)} files, {manifest.total_size} bytes)")
    if signer:
        print(f"ok: signed by {signer}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    key_id, public = signing.generate(Path(args.path))
    print(f"wrote {args.path} (private: keep it secret) and {public} (public: give it to servers as trusted_keys)")
    print(f"key id: {key_id}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    ref, key_id = ops.sign(_ref(args.uri), Path(args.key))
    print(f"signed {ref} with {key_id}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    manifest = ops.pull(_ref(args.uri), Path(args.dir))
    print(f"pulled {manifest.name}@{manifest.digest} into {args.dir}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if src.is_dir():
        manifest = ops.read_dir_manifest(src)
        ops.verify_files(src, manifest.files, contents=False)  # publishing hashes every byte it uploads
        # the directory's signatures go with it (those of this manifest: a signature is checked where it is used)
        docs = [d for d in signing.read_dir(src) if signing.doc_manifest(d) == manifest.digest]
        ref = ops.publish(src, manifest, normalize_store_uri(args.dest), tags=args.tag, signature_docs=docs)
    else:
        ref = ops.copy(_ref(args.src), normalize_store_uri(args.dest), tags=args.tag)
    print(ref)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m artifacts", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list artifacts in a store (default: the local store)")
    p.add_argument("store", nargs="?", help="store URI or path")
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("show", help="print an artifact's manifest as JSON")
    p.add_argument("uri")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("verify", help="check every file of an artifact (URI or pulled directory)")
    p.add_argument("uri")
    p.add_argument(
        "--trusted-key", action="append", default=[], help="also require a signature by this public key (repeatable)"
    )
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts: PATH and PATH.pub")
    p.add_argument("path", help="where the private key goes (the public key is written beside it as PATH.pub)")
    p.set_defaults(fn=cmd_keygen)
    p = sub.add_parser("sign", help="sign a stored artifact's manifest with a private key")
    p.add_argument("uri", help="artifact URI (name:tag, name@sha256:…, file://…, s3://…)")
    p.add_argument("--key", required=True, help="the private key (from `python -m artifacts keygen`)")
    p.set_defaults(fn=cmd_sign)
    p = sub.add_parser("pull", help="materialize an artifact into a new directory")
    p.add_argument("uri")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_pull)
    for name, help_text in (
        ("push", "publish an artifact directory or URI to a store"),
        ("copy", "copy an artifact between stores (streamed: nothing is staged locally)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src", help="artifact URI, or a directory holding manifest.json")
        p.add_argument("dest", help="destination store URI")
        p.add_argument("--tag", action="append", default=[], help="tag to set at the destination (repeatable)")
        p.set_defaults(fn=cmd_push)
    args = parser.parse_args(argv)
    setup_logging("INFO" if args.verbose else "WARNING")
    try:
        return int(args.fn(args))
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

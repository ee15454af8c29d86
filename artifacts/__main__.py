"""``python -m artifacts ls | show | verify | pull | push | copy`` — inspect and move artifacts between stores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from artifacts import ops
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
    path = Path(args.uri)
    if path.is_dir():
        manifest = ops.read_dir_manifest(path)
        extra = ops.verify_dir(path, manifest)
        print(f"ok: {path} matches {manifest.name}@{manifest.digest} ({len(manifest.files)} files)")
        for rel in extra:
            print(f"note: {rel} is not listed in the manifest", file=sys.stderr)
        return 0
    ref, manifest = ops.verify_ref(_ref(args.uri))
    print(f"ok: {ref} ({len(manifest.files)} files, {manifest.total_size} bytes)")
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
        ref = ops.publish(src, manifest, normalize_store_uri(args.dest), tags=args.tag)
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
    p.set_defaults(fn=cmd_verify)
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

"""``python -m runtime serve [URI|DIR]`` — verify an artifact, check it fits this host, and serve it.

With no URI it serves SageMaker's model directory (``$SM_MODEL_DIR`` or ``/opt/ml/model``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from artifacts.errors import ArtifactError
from artifacts.logs import setup_logging
from runtime.app import ServeOptions, plan, serve
from runtime.host import TargetMismatchError
from runtime.resolve import resolve

log = logging.getLogger("kiln.runtime")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve an artifact (URI or directory) over HTTP")
    p.add_argument("model", nargs="?", help="artifact URI, artifact directory, or Hugging Face checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--served-model-name", help="model name in API responses (default: the artifact name)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, help="max concurrent sequences (LMI: max_rolling_batch_size)")
    p.add_argument("--dtype")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--kv-cache-gib", type=float, help="KV cache budget in GiB (CPU hosts)")
    p.add_argument("--chat-template", help="file holding a Jinja chat template to use instead of the tokenizer's")
    p.add_argument(
        "--graceful-timeout", type=float, default=30.0, help="seconds to drain in-flight requests on SIGTERM"
    )
    p.add_argument(
        "--ignore-compile-cache",
        action="store_true",
        help="serve a precompiled artifact without its compile cache, even where its target.compile key does not "
        "match this host (vLLM then compiles at start)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging("INFO")
    target = args.model or os.environ.get("SM_MODEL_DIR", "/opt/ml/model")
    opts = ServeOptions(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        kv_cache_gib=args.kv_cache_gib,
        chat_template=args.chat_template,
        graceful_timeout_s=args.graceful_timeout,
        ignore_compile_cache=args.ignore_compile_cache,
    )
    try:
        model = resolve(target)
        log.info("verified %s (%s)", model.name, model.source)
        engine, settings = plan(model, opts)
    except TargetMismatchError as exc:
        print(f"kiln runtime: this artifact cannot run here: {exc}", file=sys.stderr)
        return 1
    except (ArtifactError, ValueError, OSError) as exc:
        print(f"kiln runtime: {exc}", file=sys.stderr)
        return 1
    return serve(model, engine, settings, opts)


if __name__ == "__main__":
    sys.exit(main())

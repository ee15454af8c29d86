"""``python -m runtime serve [URI|DIR]`` — verify an artifact, check it fits this host, and serve it.
``python -m runtime config [URI|DIR]`` — print the resolved serving configuration and where each value came from.

With no URI both read SageMaker's model directory (``$SM_MODEL_DIR`` or ``/opt/ml/model``), or the model named by
``HF_MODEL_ID`` / ``option.model_id``. Settings come from the artifact, ``serving.properties``, the environment and
these flags, in that order of precedence (see README, "Configuration").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from artifacts.errors import ArtifactError
from artifacts.logs import setup_logging
from runtime.app import configure, plan, serve, with_compile_cache
from runtime.config import ConfigError, as_json, render
from runtime.host import TargetMismatchError

log = logging.getLogger("kiln.runtime")
# Flags that set configuration values (dest = the canonical setting); None means "not given".
SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("--host", {}),
    ("--port", {"type": int}),
    ("--served-model-name", {"help": "model name in API responses (default: the artifact name)"}),
    ("--engine", {"help": "engine for a plain Hugging Face directory (an artifact names its own)"}),
    ("--dtype", {}),
    ("--max-model-len", {"type": int}),
    ("--max-num-seqs", {"type": int, "help": "max concurrent sequences (LMI: max_rolling_batch_size)"}),
    ("--tensor-parallel-degree", {"type": int}),
    ("--enforce-eager", {"action": argparse.BooleanOptionalAction}),
    ("--enable-prefix-caching", {"action": argparse.BooleanOptionalAction}),
    ("--enable-chunked-prefill", {"action": argparse.BooleanOptionalAction}),
    ("--kv-cache-gib", {"type": float, "help": "KV cache budget in GiB (CPU hosts)"}),
    ("--job-queue-size", {"type": int, "help": "generation requests in flight before 503"}),
    ("--predict-timeout", {"type": float, "help": "seconds one request may take"}),
    ("--model-loading-timeout", {"type": float}),
    ("--output-formatter", {"choices": ["json", "jsonlines", "sse"], "help": "LMI response form"}),
    ("--tgi-compat", {"action": argparse.BooleanOptionalAction}),
    ("--chat-template", {"help": "Jinja chat template (file or text) instead of the tokenizer's"}),
    ("--graceful-timeout", {"type": float, "help": "seconds to drain in-flight requests on SIGTERM"}),
    (
        "--ignore-compile-cache",
        {
            "action": "store_true",
            "help": "serve a precompiled artifact without its compile cache, even where its target.compile key does "
            "not match this host (vLLM then compiles at start)",
        },
    ),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="serve an artifact (URI or directory) over HTTP")
    config_p = sub.add_parser("config", help="print the resolved configuration with the source of every value")
    config_p.add_argument("--json", action="store_true", help="JSON instead of a table")
    for p in (serve_p, config_p):
        p.add_argument("model", nargs="?", help="artifact URI, artifact directory, or Hugging Face directory")
        for flag, kw in SETTINGS:
            p.add_argument(flag, default=None, **kw)
        p.add_argument(
            "--option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="any setting or engine argument, e.g. --option max_num_batched_tokens=512 (repeatable)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging("INFO" if args.command == "serve" else "WARNING")
    cli = {"model": args.model, **{f.lstrip("-").replace("-", "_"): None for f, _ in SETTINGS}}
    cli.update({k: getattr(args, k) for k in cli if k != "model"})
    try:
        model, resolved = configure(cli, args.option, os.environ)
        log.info("verified %s (%s)", model.name, model.source)
        engine, settings = plan(model, resolved.config)
        if args.command == "serve":
            settings = with_compile_cache(model, resolved.config, settings)
    except TargetMismatchError as exc:
        print(f"kiln runtime: this artifact cannot run here: {exc}", file=sys.stderr)
        return 1
    except (ArtifactError, ConfigError, ValueError, OSError) as exc:
        print(f"kiln runtime: {exc}", file=sys.stderr)
        return 1
    if args.command == "config":
        if args.json:
            print(json.dumps({"settings": as_json(resolved), "engine": engine, "device": settings.device}, indent=2))
        else:
            print(render(resolved))
            print(
                f"-> {model.name} on {engine} ({settings.device}, dtype {settings.dtype}, "
                f"max_model_len {settings.max_model_len}, tensor_parallel_degree {settings.tensor_parallel_degree})"
            )
        return 0
    return serve(model, engine, settings, resolved)


if __name__ == "__main__":
    sys.exit(main())

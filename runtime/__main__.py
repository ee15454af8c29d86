"""``python -m runtime serve [URI|DIR|HUB_ID]`` — verify an artifact, check it fits this host, and serve it.
``python -m runtime config [URI|DIR|HUB_ID]`` — print the resolved serving configuration and where each value came
from.
``python -m runtime bench URL|--endpoint-name NAME --tokenizer DIR`` — load-test an endpoint (``runtime/bench``).
``python -m runtime deploy s3://…/NAME@sha256:… --endpoint-name E --image I --role ARN [--dry-run]`` — deploy an
artifact to SageMaker (``runtime/deploy``).
``python -m runtime supervise [serve args…]`` — ``serve`` in a child process, restarted when it fails (the
container's entrypoint; ``runtime/supervisor.py``).

With no model both read the model named by ``HF_MODEL_ID`` / ``OPTION_MODEL_ID``, or SageMaker's model directory
(``$SM_MODEL_DIR`` or ``/opt/ml/model``); then the server listens on 0.0.0.0:8080 (container mode). Settings come
from the artifact, ``serving.properties``, the environment and these flags, in that order of precedence (see
README, "Configuration"). ``serve`` exits 78 (``EX_CONFIG``) when no restart could help it start (a bad setting, a
model that is missing or does not verify, an artifact for another host), 1 when one might (``runtime/exitcodes.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing
from typing import Any, TextIO

from artifacts.errors import ArtifactError, StoreError
from artifacts.logs import setup_logging
from runtime import process
from runtime.app import Startup, configure, serve
from runtime.config import FIELDS, ConfigError, ServeConfig, as_json, render
from runtime.exitcodes import EX_CONFIG, EX_FAILURE
from runtime.host import TargetMismatchError

log = logging.getLogger("kiln.runtime")
NOT_FLAGS = {"model"}  # the positional argument


def flag_kwargs(name: str) -> dict[str, Any]:
    """argparse options for one ServeConfig field, from its annotation and description (written once there)."""
    info = ServeConfig.model_fields[name]
    kinds = [a for a in _alternatives(info.annotation) if a is not type(None)]
    kw: dict[str, Any] = {"default": None, "help": info.description}
    kind = kinds[0]
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is typing.Literal:
        kw["choices"] = list(typing.get_args(kind))
    elif kind in (int, float):
        kw["type"] = kind
    return kw


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def flags() -> list[str]:
    return sorted(FIELDS - NOT_FLAGS, key=list(ServeConfig.model_fields).index)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="serve a model over HTTP")
    config_p = sub.add_parser("config", help="print the resolved configuration with the source of every value")
    sub.add_parser("bench", help="load-test an endpoint (python -m runtime bench --help)", add_help=False)
    sub.add_parser("deploy", help="deploy an artifact to SageMaker (python -m runtime deploy --help)", add_help=False)
    sub.add_parser("supervise", help="serve, restarted when it fails (takes serve's arguments)", add_help=False)
    config_p.add_argument("--json", action="store_true", help="JSON instead of a table")
    for p in (serve_p, config_p):
        p.add_argument("model", nargs="?", help="artifact URI, artifact or Hugging Face directory, or hub id")
        for name in flags():
            p.add_argument("--" + name.replace("_", "-"), dest=name, **flag_kwargs(name))
        p.add_argument(
            "--option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="any setting or engine argument, e.g. --option max_num_batched_tokens=512 (repeatable)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own flags (vllm bench serve's names), not the serving settings
        from runtime.bench.cli import main as bench

        return bench(argv[1:])
    if argv[:1] == ["deploy"]:
        from runtime.deploy.cli import main as deploy

        setup_logging("WARNING")
        return deploy(argv[1:])
    if argv[:1] == ["supervise"]:  # serve's own arguments, passed on to the server it runs
        from runtime.supervisor import main as supervise

        return supervise(argv[1:])
    args = _parser().parse_args(argv)
    setup_logging("INFO" if args.command == "serve" else "WARNING")
    cli = {"model": args.model, **{name: getattr(args, name) for name in flags()}}
    if args.command == "config":
        with process.kiln_logs_only():
            startup = _configure(cli, args.option, prepare=False, terminal=sys.stderr)
            if isinstance(startup, Startup):
                print_config(startup, as_json_output=args.json)
        return 0 if isinstance(startup, Startup) else 1
    # Engine output (from the configuration check on, which may import the engine library) goes to its log file.
    with process.engine_output() as terminal:
        startup = _configure(cli, args.option, prepare=True, terminal=terminal)
        return serve(startup) if isinstance(startup, Startup) else startup


def _configure(cli: dict[str, Any], options: list[str], prepare: bool, terminal: TextIO) -> Startup | int:
    """The checked start-up, or ``serve``'s exit code after telling the operator (one block, no traceback) what is
    wrong."""
    try:
        startup = configure(cli, options, os.environ, prepare=prepare)
    except TargetMismatchError as exc:  # from pulling and verifying, before the configuration is read
        print(f"kiln runtime: this artifact cannot run here: {exc}", file=terminal)
        return EX_CONFIG
    except (ArtifactError, ConfigError, ValueError, OSError) as exc:
        print(f"kiln runtime: {exc}", file=terminal)
        # A store or the disk may recover (network, credentials, space): worth a restart. Anything else is the
        # configuration or the model itself, and the next start would fail the same way.
        return EX_FAILURE if isinstance(exc, StoreError | OSError) else EX_CONFIG
    log.info("verified %s (%s)", startup.model.name, startup.model.source)
    return startup


def print_config(startup: Startup, as_json_output: bool) -> None:
    plan, resolved = startup.plan, startup.resolved
    s = plan.settings
    where = f"{startup.location.origin} -> {startup.model.kind}"
    if as_json_output:
        doc = {
            "settings": as_json(resolved, plan.chosen),
            "engine": plan.spec.name,
            "device": s.device,
            "model": {"location": startup.location.target, "kind": startup.model.kind},
            "quantization": plan.quantization,
            "task": s.task,
            "speculative": s.speculative.config() if s.speculative else None,
            "engine_args": plan.spec.native_args(s),
        }
        print(json.dumps(doc, indent=2, default=str))
        return
    print(render(resolved, plan.chosen))
    print(f"model: {startup.location.target} ({where})")
    print(
        f"-> {startup.model.name} on {plan.spec.name} ({s.device}, "
        + ("embeddings, " if s.task == "embed" else "")
        + f"dtype {s.dtype}, max_model_len {s.max_model_len}, "
        f"max_num_seqs {s.max_num_seqs}, tensor_parallel_degree {s.tensor_parallel_degree}"
        + (f", quantization {plan.quantization}" if plan.quantization != "none" else "")
        + (f", speculative {s.speculative.method} x{s.speculative.num_speculative_tokens}" if s.speculative else "")
        + ")"
    )


def run() -> int:
    """``main``, then leave without interpreter teardown: engine libraries' finalizers (vLLM's AsyncLLM.__del__,
    nanobind's leak report) misbehave once the interpreter is half torn down, after serving has already stopped
    cleanly and every child process was stopped."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(run())

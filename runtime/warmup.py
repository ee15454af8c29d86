"""``python -m runtime.warmup MODEL_DIR --target JSON --serving JSON --cache-dir DIR --report FILE``: fill a compile
cache for the artifact the build is making.

The build's compile stage runs this in a child process, in a toolchain that has the engine. It derives the engine
settings with the function ``serve`` uses (runtime/settings.py: derive) from the artifact's target and serving
blocks as the build will write them, so the cache it fills is the one a later ``serve`` looks up; then it calls the
engine's ``compile.warm_up`` hook and writes the hook's report (with this host's compile key) to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from artifacts.logs import setup_logging
from artifacts.manifest import Target
from runtime import engines
from runtime.config import ConfigError, Sources, artifact_entries, cli_entries, resolve_config
from runtime.host import TargetMismatchError, detect
from runtime.settings import Plan, derive

log = logging.getLogger("kiln.runtime.warmup")


def plan_for(model_dir: Path, target: Target, serving: dict[str, Any], options: list[str]) -> Plan:
    """The plan ``serve`` would make for this artifact with no operator configuration (plus ``options``)."""
    sources = Sources(artifact=artifact_entries(serving), cli=cli_entries({}, options))
    resolved = resolve_config(sources, target, lambda name: engines.get(name).native_keys())
    return derive(model_dir, target, resolved.config, detect())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.warmup", description=__doc__)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--target", required=True, help="JSON: the artifact's target block")
    p.add_argument("--serving", default="{}", help="JSON: the artifact's serving block")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a setting for the warm-up")
    p.add_argument("--cache-dir", type=Path, required=True, help="the compile cache to fill")
    p.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    args = p.parse_args(argv)
    setup_logging("INFO")
    try:
        target = Target.from_dict(json.loads(args.target))
        plan = plan_for(args.model_dir, target, json.loads(args.serving), args.option)
        if plan.spec.compile is None:
            raise ConfigError([f"the {plan.spec.name} engine has no precompiled content to warm up"])
        log.info("warming up %s on %s into %s", args.model_dir, plan.settings.device, args.cache_dir)
        report = asyncio.run(plan.spec.compile.warm_up(plan.settings, args.cache_dir))
    except (ConfigError, TargetMismatchError) as exc:
        args.report.write_text(json.dumps({"error": str(exc)}))
        return 1
    except Exception as exc:  # the build shows this line; the traceback stays in the log
        log.exception("warm-up failed")
        args.report.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    report["settings"] = {k: v for k, v in vars(plan.settings).items() if k not in ("model_dir", "compile_cache")}
    args.report.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    log.info("warm-up done in %.1fs: %d cache files", report["total_s"], report["files"])
    return 0


if __name__ == "__main__":  # engines spawn processes from this one: the guard is required
    sys.exit(main())

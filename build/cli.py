"""The CLI boundary of ``python -m build``: validate, run, print the URI last; errors as one readable block."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from artifacts.errors import ArtifactError
from artifacts.logs import setup_logging
from build.config import validate
from build.errors import BuildError
from build.pipeline import run_build
from build.stages import StageCrashError
from build.summary import summarize, write_json

log = logging.getLogger("kiln.build")


def main(cfg: DictConfig) -> int:
    """Run one build; return the process exit code. The last stdout line on success is the artifact URI."""
    setup_logging("WARNING")
    debug = bool(cfg.get("debug", False))
    try:
        typed = validate(cfg)
        result = run_build(typed)
    except BuildError as exc:
        return _fail(str(exc))
    except ArtifactError as exc:
        return _fail(f"[publish] {exc}")
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        return _fail(f"[config] {key + ': ' if key else ''}{getattr(exc, 'msg', exc)}")
    except StageCrashError as exc:
        if debug:
            print(exc.remote_traceback, file=sys.stderr)
        return _fail(f"{exc}\n  rerun with debug=true for the traceback" if not debug else str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was published", code=130)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        return _fail(
            f"[internal] unexpected {type(exc).__name__}: {exc}"
            + ("" if debug else "\n  rerun with debug=true for the traceback")
        )
    stages = ", ".join(f"{s.stage} {'cached' if s.cached else 'ran'}" for s in result.stages)
    print(
        f"built {result.manifest.name} in {result.seconds:.1f}s ({stages}): {len(result.manifest.files)} files, "
        f"{result.manifest.total_size / 1e6:.1f} MB",
        file=sys.stderr,
    )
    if typed.summary is not None:  # before the URI line: a build whose summary is missing has failed
        try:
            write_json(Path(typed.summary), summarize(typed, result))
        except OSError as exc:
            return _fail(
                f"[summary] summary: cannot write {typed.summary}: {exc.strerror or exc} ({result.uri} is published)"
            )
    if result.base is not None:  # an adapter build: the base first, the adapter (the artifact asked for) last
        print(f"adapter {result.manifest.name} for base {result.base}", file=sys.stderr)
        print(result.base, flush=True)
    print(result.uri, flush=True)
    return 0


def _fail(message: str, code: int = 1) -> int:
    print(f"kiln build failed: {message}", file=sys.stderr)
    return code

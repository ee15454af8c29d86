"""Runs one stage's work inside a toolchain interpreter: ``python -m build.stage_exec REQUEST RESPONSE``.

This module is what the orchestrator starts in another environment, so it imports only the standard library,
``build.errors`` and the stage's own entry module (never Hydra).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from build.errors import as_build_error
from build.toolchains import installed_versions

StageFn = Callable[[Mapping[str, Any], Mapping[str, Path], Path], Mapping[str, Any]]
REPO_ROOT = Path(__file__).resolve().parents[1]


def kiln_env() -> dict[str, str]:
    """This environment, with kiln's packages importable from this checkout: for Python child processes."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def load_entry(entry: str) -> StageFn:
    """``"package.module:function"`` → the function."""
    module, _, fn = entry.partition(":")
    fn_obj: StageFn = getattr(importlib.import_module(module), fn)
    return fn_obj


def call_entry(entry: str, params: Mapping[str, Any], inputs: Mapping[str, str | Path], out: Path) -> dict[str, Any]:
    return dict(load_entry(entry)(params, {k: Path(v) for k, v in inputs.items()}, out))


def main(request_path: str, response_path: str) -> int:
    req = json.loads(Path(request_path).read_text())
    logging.basicConfig(
        level=req.get("log_level", "WARNING"), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    resp: dict[str, Any] = {"packages": installed_versions(req["packages"])}
    try:
        resp["result"] = call_entry(req["entry"], req["params"], req["inputs"], Path(req["out"]))
        resp["ok"] = True
    except Exception as exc:
        err = as_build_error(exc)
        if err is None:
            resp |= {"ok": False, "traceback": traceback.format_exc()}
        else:
            resp |= {"ok": False, "error": {"stage": err.stage, "message": err.message, "key": err.key, "fix": err.fix}}
    Path(response_path).write_text(json.dumps(resp))
    return 0 if resp["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

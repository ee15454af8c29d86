"""Stage execution: run a stage's entry function in its toolchain, cached by the digest of its inputs.

A stage's work is a plain function ``run(params, inputs, out) -> result`` (JSON-able params and result,
input directories, an empty output directory). :func:`run_stage` resolves the toolchain, looks the stage up
in the cache, and otherwise runs it in-process or in the toolchain's interpreter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from artifacts.errors import is_out_of_space
from build import toolchains
from build.cache import StageCache, StageRecord, code_digest
from build.errors import BuildError, as_build_error
from build.stage_exec import REPO_ROOT, call_entry, kiln_env

log = logging.getLogger("kiln.build.stages")


@dataclass(frozen=True)
class StageInput:
    path: Path
    digest: str


@dataclass(frozen=True)
class StageSpec:
    name: str  # "synth", "convert", "quantize", "compile"
    toolchain: str
    entry: str  # "module:function"
    host_bound: bool = False  # output is machine code for this host: its CPU and interpreter join the cache key
    code: tuple[str, ...] = ()  # modules outside the entry's package whose code shapes the output


def run_stage(
    spec: StageSpec,
    params: Mapping[str, Any],
    inputs: Mapping[str, StageInput],
    cache: StageCache,
    *,
    force: bool = False,
) -> StageRecord:
    """Return the cached output of (spec, params, inputs, toolchain, code) or compute and cache it."""
    began = time.monotonic()  # the record's seconds: this build's time on the stage, hashing its code included
    tc = toolchains.get(spec.toolchain)
    key_material = {
        "stage": spec.name,
        "entry": spec.entry,
        "params": dict(params),
        "inputs": {k: v.digest for k, v in sorted(inputs.items())},
        "toolchain": {"name": tc.name, "lock": tc.lock_digest},
        "code": code_digest(spec.entry, *spec.code),
    }
    if spec.host_bound:
        key_material["host"] = toolchains.host_fingerprint(tc)
    if not force and (hit := cache.lookup(spec.name, key_material)):
        log.info("%s: cache hit (%s)", spec.name, hit.output_digest)
        return replace(hit, seconds=round(time.monotonic() - began, 3))
    interp = toolchains.resolve(tc)
    log.info("%s: running in toolchain %s (%s)", spec.name, tc.name, interp.origin)
    with cache.staging(spec.name) as out, _disk_full_named(spec.name, cache.root):
        start = time.monotonic()
        result, packages = _execute(spec, interp, tc, params, inputs, out)
        record = cache.commit(
            spec.name,
            key_material,
            out,
            result=result,
            packages=packages,
            seconds=time.monotonic() - start,
            overwrite=force,
        )
    return replace(record, seconds=round(time.monotonic() - began, 3))


@contextlib.contextmanager
def _disk_full_named(stage: str, root: Path) -> Iterator[None]:
    """A stage that fills the disk fails as a build error naming the cache's disk and the fix, not as a crash; its
    staging directory is removed on the way out, so no half-written entry stays."""
    try:
        yield
    except BuildError:
        raise
    except Exception as exc:
        text = exc.remote_traceback if isinstance(exc, StageCrashError) else exc
        if not is_out_of_space(text):
            raise
        free = shutil.disk_usage(root).free / 1e6
        raise BuildError(
            stage,
            f"no space left on device writing the stage's output under {root} ({free:.1f} MB free)",
            fix="free space on that disk, or point KILN_CACHE at a larger one (the stage cache is $KILN_CACHE/stages)",
        ) from None


def _execute(
    spec: StageSpec,
    interp: toolchains.Interpreter,
    tc: toolchains.Toolchain,
    params: Mapping[str, Any],
    inputs: Mapping[str, StageInput],
    out: Path,
) -> tuple[dict[str, Any], dict[str, str]]:
    if interp.in_process:
        try:
            result = call_entry(spec.entry, params, {k: v.path for k, v in inputs.items()}, out)
        except Exception as exc:
            if (err := as_build_error(exc)) is None or err is exc:
                raise
            raise err from exc
        return result, toolchains.installed_versions(tc.pins)
    with tempfile.TemporaryDirectory(prefix="kiln-stage-") as tmp:
        req, resp = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req.write_text(
            json.dumps(
                {
                    "entry": spec.entry,
                    "params": dict(params),
                    "out": str(out),
                    "packages": list(tc.pins),
                    "inputs": {k: str(v.path) for k, v in inputs.items()},
                    "log_level": logging.getLevelName(logging.getLogger("kiln").getEffectiveLevel()),
                }
            )
        )
        # The stage's stdout goes to stderr: the build's stdout carries only the artifact URI.
        proc = subprocess.run(
            [interp.python, "-m", "build.stage_exec", str(req), str(resp)],
            env=kiln_env(),
            cwd=REPO_ROOT,
            stdout=sys.stderr,
        )
        if not resp.exists():
            raise BuildError(
                spec.name,
                f"the {tc.name} toolchain process exited with code {proc.returncode} without a result",
                fix=f"check the interpreter in {interp.origin}: {interp.python}",
            )
        data = json.loads(resp.read_text())
    if data["ok"]:
        return data["result"], data["packages"]
    if "error" in data:
        e = data["error"]
        raise BuildError(e["stage"], e["message"], key=e["key"], fix=e["fix"])
    raise StageCrashError(spec.name, data["traceback"])


class StageCrashError(Exception):
    """An unexpected exception inside a stage's toolchain process; carries the remote traceback."""

    def __init__(self, stage: str, remote_traceback: str) -> None:
        self.stage = stage
        self.remote_traceback = remote_traceback
        last = remote_traceback.strip().splitlines()[-1] if remote_traceback.strip() else "unknown error"
        super().__init__(f"[{stage}] crashed: {last}")

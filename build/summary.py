"""The build summary for CI systems, and the artifact job that writes it only for a verified artifact.

``python -m build summary=PATH`` writes :func:`summarize` of the build as JSON after a successful publish.
``python -m build.summary [overrides…]`` (what ``nox -s artifact`` runs) is CI's artifact job: it runs that build,
checks the published artifact with ``python -m artifacts verify URI``, and only then writes the summary at the
``summary=`` override's path (default :data:`DEFAULT_PATH`). When the build or the verification fails it exits
non-zero with one ``kiln artifact failed: …`` line and leaves no summary: a stale one is removed first, so a CI
step that uploads the file cannot mistake an earlier success for this run's.

Stage ``seconds`` are this build's wall time for the stage: its work when it ran, its cache lookup (every cached
file re-hashed) when ``cached``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifacts import __version__ as kiln_version

if TYPE_CHECKING:  # the job runs the build in a subprocess: no pipeline imports at run time
    from build.cache import StageRecord
    from build.config import BuildConfig
    from build.pipeline import BuildResult

SCHEMA = "kiln.build-summary/1"  # bumped when a field changes meaning or goes away
DEFAULT_PATH = "artifact-summary.json"
KEY = "summary"


def summarize(cfg: BuildConfig, result: BuildResult) -> dict[str, Any]:
    """The summary of a published build: identity, size, fidelity, stages, store and kiln version."""
    m = result.manifest
    return {
        "schema": SCHEMA,
        "uri": result.uri,
        "name": m.name,
        "digest": result.ref.digest,
        "store": result.ref.store,
        "base": None if result.base is None else str(result.base),  # an adapter build: the base model artifact
        "kiln_version": kiln_version,
        "size": {"bytes": m.total_size, "files": len(m.files)},
        "target": m.target.to_dict(),
        "fidelity": fidelity(cfg, result.stages),
        "seconds": round(result.seconds, 3),
        "stages": [{"stage": s.stage, "cached": s.cached, "seconds": s.seconds} for s in result.stages],
    }


def fidelity(cfg: BuildConfig, stages: Sequence[StageRecord]) -> dict[str, Any] | None:
    """The quantize stage's fidelity report and the gate it passed (None: not quantized)."""
    rec = next((s for s in stages if s.stage == "quantize"), None)
    if rec is None:
        return None
    report = rec.result["report"]
    gate = {k: getattr(cfg.quantize, k, None) for k in ("max_kl", "min_top1")}  # None: that limit is not set
    return {"method": report["method"], "scheme": report["scheme"], "gate": gate, **report["fidelity"]}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the whole summary or none."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the artifact job: build, verify, then the summary ------------------------------------------------------------


class JobError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the artifact job; the exit code is the job's (the build's own code when the build failed)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        path, overrides = split_args(args)
        path.unlink(missing_ok=True)
        uri = run_job(path, overrides)
    except JobError as exc:
        print(f"kiln artifact failed: {exc}; no summary was written", file=sys.stderr)
        return exc.code
    print(f"kiln artifact: {uri} verified; summary: {path}", file=sys.stderr)
    print(uri, flush=True)  # the build's contract holds for the job too: the last stdout line is the URI
    return 0


def split_args(args: list[str]) -> tuple[Path, list[str]]:
    """(summary path, the other build overrides). ``summary=PATH`` is the build's own key; the job takes it."""
    if "--multirun" in args or "-m" in args:
        raise JobError("--multirun: the job builds one artifact; run one job per configuration (a CI matrix)", 2)
    ours = [a for a in args if a.lstrip("+").startswith(f"{KEY}=")]  # +summary= and ++summary= too: ours wins
    paths = [a.partition("=")[2] for a in ours]
    text = paths[-1] if paths else DEFAULT_PATH
    if text in ("", "null"):
        raise JobError(f"{KEY}={text}: the artifact job always writes a summary; give a path ({KEY}=out.json)", 2)
    path = Path(text.strip("'\"")).absolute()
    if not path.parent.is_dir():
        raise JobError(f"{KEY}={text}: directory {path.parent} does not exist; create it", 2)
    return path, [a for a in args if a not in ours]


def run_job(path: Path, overrides: list[str]) -> str:
    """Build with a draft summary, verify the URI the build printed, then write the summary; return the URI."""
    with tempfile.TemporaryDirectory(prefix="kiln-artifact-") as tmp:
        draft = Path(tmp) / "summary.json"
        uri = _build(overrides, draft)
        if not draft.is_file():  # exit 0 without building: a Hydra flag such as --cfg or --help
            raise JobError("the build exited 0 without publishing: drop Hydra's own flags (--cfg, --help, ...)")
        data = json.loads(draft.read_text())
    if data["uri"] != uri:
        raise JobError(f"the build printed {uri} but its summary names {data['uri']}")
    data["verified"] = {"command": f"python -m artifacts verify {uri}", "result": _verify(uri)}
    write_json(path, data)
    return uri


def _build(overrides: list[str], draft: Path) -> str:
    """``python -m build … summary=DRAFT``: stderr (progress, errors) passes through; returns the URI line."""
    quoted = "'" + str(draft).replace("\\", "\\\\").replace("'", "\\'") + "'"  # Hydra's quoted-string grammar
    proc = subprocess.run(
        [sys.executable, "-m", "build", *overrides, f"{KEY}={quoted}"], stdout=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        # a build killed by a signal has a negative code (-9): the job exits 1 for it
        raise JobError(f"the build exited with code {proc.returncode} (its error is above)", max(proc.returncode, 1))
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _verify(uri: str) -> str:
    """``python -m artifacts verify URI`` (every file re-read from the store and hashed); returns its ok line."""
    proc = subprocess.run([sys.executable, "-m", "artifacts", "verify", uri], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise JobError(f"verification of {uri} failed: {why}")
    return proc.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())

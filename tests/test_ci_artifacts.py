"""CI's artifact job (issue #14): ``nox -s artifact`` runs ``python -m build.summary``, which builds, publishes,
verifies and writes the summary; ``.github/workflows/artifacts.yml`` runs that session for a small matrix.

The workflow tests compose every job's overrides against the real ``conf/``, so the workflow cannot drift from the
configs. The job tests run the module the session runs, on the tiny model, against a temporary local store, and
check the summary against facts read independently: the URI the job printed, the store's own files on disk, the
installed package's version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose

from artifacts.manifest import Manifest
from build.cache import StageRecord
from build.config import BuildConfig, validate
from build.errors import ConfigError
from build.summary import DEFAULT_PATH, fidelity, main
from tests.conftest import ROOT, run_cli

WORKFLOW = ROOT / ".github" / "workflows" / "artifacts.yml"
# What GitHub substitutes for the expressions the workflow uses outside the matrix (repository variables, the
# commit): plausible values, so that the overrides validate as they would on a runner.
EXPRESSIONS = {
    "vars.KILN_STORE": "s3://kiln-ci-example/artifacts",
    "github.sha": "3f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39",
}
TINY = ("model=tiny", "quantize=none", "compile=none")
EXPR_RE = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


# -- the workflow ------------------------------------------------------------------------------------------------


def load_workflow() -> dict[Any, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict), f"{WORKFLOW} is not a YAML mapping"
    return data


def expand(text: str, matrix: dict[str, Any]) -> str:
    """``text`` with ``${{ matrix.X }}`` and the EXPRESSIONS substituted; any other expression fails the test."""

    def value(m: re.Match[str]) -> str:
        expr = m.group(1)
        if expr.startswith("matrix."):
            return str(matrix[expr.removeprefix("matrix.")])
        assert expr in EXPRESSIONS, f"{WORKFLOW}: no test value for the expression ${{{{ {expr} }}}}; add one"
        return EXPRESSIONS[expr]

    return EXPR_RE.sub(value, text)


def artifact_runs() -> list[tuple[str, dict[str, Any], list[str], dict[str, Any]]]:
    """(job id, matrix entry, the overrides after ``nox -s artifact --``, the job) for every job and matrix entry."""
    out = []
    for job_id, job in load_workflow()["jobs"].items():
        runs = [s["run"] for s in job["steps"] if "nox -s artifact" in s.get("run", "")]
        assert len(runs) == 1, f"job {job_id} should run `nox -s artifact` exactly once, runs it {len(runs)} times"
        for entry in job.get("strategy", {}).get("matrix", {}).get("include", [{}]):
            words = shlex.split(expand(runs[0], entry))
            assert words[:4] == ["nox", "-s", "artifact", "--"], f"job {job_id}: {words[:4]}"
            out.append((job_id, entry, words[4:], job))
    return out


RUNS = artifact_runs()


@pytest.mark.unit
def test_workflow_runs_on_push_with_oidc_and_no_stored_keys() -> None:
    wf = load_workflow()
    on = wf.get("on", wf.get(True))  # PyYAML reads the bare key `on` as the boolean True (YAML 1.1)
    assert "push" in on
    assert wf["permissions"]["id-token"] == "write"  # without it the job gets no OIDC token to assume the role
    text = WORKFLOW.read_text()
    assert "secrets." not in text
    assert "AWS_ACCESS_KEY_ID" not in text
    assert "AWS_SECRET_ACCESS_KEY" not in text
    for job_id, job in wf["jobs"].items():
        aws = [s for s in job["steps"] if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@")]
        assert len(aws) == 1, f"job {job_id} should assume its AWS role once"
        assert aws[0]["with"]["role-to-assume"].startswith("${{ vars.")


@pytest.mark.unit
def test_matrix_covers_no_quantization_and_a_quantizer() -> None:
    methods = {entry["quantize"] for _, entry, _, _ in RUNS}
    assert "none" in methods
    assert methods - {"none"}, "the matrix should build one quantized artifact too"
    names = [entry["name"] for _, entry, _, _ in RUNS]
    assert len(set(names)) == len(names), f"matrix entries share an artifact name (and so its tags): {names}"


@pytest.mark.unit
@pytest.mark.parametrize(("job_id", "entry", "overrides", "job"), RUNS, ids=[f"{r[0]}-{r[1]['name']}" for r in RUNS])
def test_workflow_overrides_compose_with_conf(
    hydra: None, job_id: str, entry: dict[str, Any], overrides: list[str], job: dict[str, Any]
) -> None:
    typed = validate(compose(config_name="build", overrides=overrides))
    assert isinstance(typed, BuildConfig)
    assert (typed.model.name, typed.quantize.method) == (entry["name"], entry["quantize"])
    assert (typed.publish.store, typed.publish.uri) == ("s3", EXPRESSIONS["vars.KILN_STORE"])
    assert EXPRESSIONS["github.sha"] in typed.publish.tags
    uploads = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert [expand(s["with"]["path"], entry) for s in uploads] == [typed.summary], "upload the summary the job writes"


# -- the job's arguments and the summary's fidelity section -------------------------------------------------------


@pytest.mark.unit
def test_job_refuses_a_summary_path_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TINY, f"summary={tmp_path}/missing/out.json"]) == 2
    err = capsys.readouterr().err
    assert f"directory {tmp_path}/missing does not exist" in err
    assert main([*TINY, "summary=null"]) == 2
    assert "always writes a summary" in capsys.readouterr().err


@pytest.mark.unit
def test_job_refuses_multirun(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--multirun", "model=tiny,tiny_trained"]) == 2
    assert "one job per configuration" in capsys.readouterr().err


@pytest.mark.unit
def test_build_config_names_the_summary_key(hydra: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"summary: .*does not exist"):
        validate(compose(config_name="build", overrides=[f"summary={tmp_path}/missing/out.json"]))


@pytest.mark.unit
def test_fidelity_section_is_the_quantize_report_and_its_gate(hydra: None) -> None:
    cfg = validate(compose(config_name="build", overrides=["quantize=fp8", "quantize.max_kl=0.001"]))
    figures = {"kl_mean": 1.09e-4, "kl_max": 4.84e-2, "top1_agreement": 0.994, "ppl_source": 6.706}
    report = {"method": "fp8", "scheme": "fp8-dynamic", "fidelity": figures}
    rec = StageRecord("quantize", "sha256:0", Path("."), (), "sha256:0", {"report": report}, {}, {})
    assert fidelity(cfg, [rec]) == {
        "method": "fp8",
        "scheme": "fp8-dynamic",
        "gate": {"max_kl": 0.001, "min_top1": None},
        **figures,
    }
    assert fidelity(cfg, []) is None


# -- the job, end to end on the tiny model -------------------------------------------------------------------------


def job(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m build.summary ARGS``: what ``nox -s artifact -- ARGS`` runs in .nox/kiln."""
    return run_cli("build.summary", *args)


def blob(store: Path, digest: str) -> Path:
    return store / "blobs" / "sha256" / digest.removeprefix("sha256:")


@pytest.mark.integration
def test_summary_matches_the_store(tmp_path: Path) -> None:
    store, out = tmp_path.resolve() / "store", tmp_path / "out.json"
    proc = job(*TINY, "force=true", f"publish.uri={store}", f"summary={out}")
    assert proc.returncode == 0, proc.stderr
    uri = proc.stdout.strip().splitlines()[-1]
    summary = json.loads(out.read_text())
    name = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())["name"]
    digest = (store / "names" / name / "tags" / "latest").read_text().strip()
    manifest_bytes = blob(store, digest).read_bytes()
    manifest = Manifest.from_bytes(manifest_bytes)
    assert uri == f"file://{store}/{name}@{digest}"
    assert (summary["uri"], summary["name"], summary["store"]) == (uri, name, f"file://{store}")
    assert summary["digest"] == digest == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == manifest.digest
    on_disk = [blob(store, f.sha256).stat().st_size for f in manifest.files]
    assert summary["size"] == {"bytes": sum(on_disk), "files": len(on_disk)}
    assert summary["kiln_version"] == importlib.metadata.version("kiln")
    assert summary["fidelity"] is None  # quantize=none
    # model=tiny is synthesized (synth), every build converts; quantize=none and compile=none add no stage
    stored_stages = [s["stage"] for s in manifest.provenance["stages"]]
    assert [s["stage"] for s in summary["stages"]] == stored_stages == ["synth", "convert"]
    assert [s["cached"] for s in summary["stages"]] == [False, False]  # force=true
    assert all(0 < s["seconds"] <= summary["seconds"] for s in summary["stages"])
    assert summary["verified"]["result"].startswith(f"ok: {uri} ({len(on_disk)} files, {sum(on_disk)} bytes)")
    assert f"summary: {out}" in proc.stderr


@pytest.mark.integration
def test_rerun_hits_the_cache_and_publishes_the_same_uri(tmp_path: Path) -> None:
    store, out = tmp_path.resolve() / "store", tmp_path / "out.json"
    first = job(*TINY, f"publish.uri={store}", f"summary={out}")
    assert first.returncode == 0, first.stderr
    again = job(*TINY, f"publish.uri={store}", f"summary={out}")
    assert again.returncode == 0, again.stderr
    summary = json.loads(out.read_text())
    assert summary["uri"] == again.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]
    assert [(s["stage"], s["cached"]) for s in summary["stages"]] == [("synth", True), ("convert", True)]


@pytest.mark.integration
def test_default_summary_path_is_in_the_working_directory(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "build.summary", *TINY, f"publish.uri={tmp_path / 'store'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / DEFAULT_PATH).read_text())["uri"] == proc.stdout.strip().splitlines()[-1]
    assert f"summary: {tmp_path / DEFAULT_PATH}" in proc.stderr


@pytest.mark.integration
def test_failed_build_exits_nonzero_and_leaves_no_summary(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    out.write_text('{"uri": "an earlier run"}')  # a stale success must not survive a failed run
    proc = job(*TINY, "model.dtype=int3", f"publish.uri={tmp_path / 'store'}", f"summary={out}")
    assert proc.returncode == 1
    assert not out.exists()
    assert proc.stdout == ""
    assert "kiln build failed: [config] invalid configuration" in proc.stderr
    assert "model.dtype: 'int3' is not one of" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "kiln artifact failed: the build exited with code 1 (its error is above); no summary was written"


@pytest.mark.integration
def test_failed_verification_exits_nonzero_and_leaves_no_summary(tmp_path: Path) -> None:
    store, out = tmp_path.resolve() / "store", tmp_path / "out.json"
    assert job(*TINY, f"publish.uri={store}", f"summary={out}").returncode == 0
    manifest = Manifest.from_bytes(blob(store, json.loads(out.read_text())["digest"]).read_bytes())
    target = blob(store, max(manifest.files, key=lambda f: f.size).sha256)
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF  # same size, different content: only a re-hash notices, and the re-publish skips the blob
    target.write_bytes(bytes(data))
    proc = job(*TINY, f"publish.uri={store}", f"summary={out}")
    assert proc.returncode == 1
    assert not out.exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln artifact failed: verification of file://"), last
    assert "corrupt" in last, last
    assert last.endswith("; no summary was written")


@pytest.mark.integration
def test_hydra_flag_that_stops_the_build_is_a_failure(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = job("--cfg", "job", *TINY, f"publish.uri={tmp_path / 'store'}", f"summary={out}")
    assert proc.returncode == 1
    assert not out.exists()
    assert "drop Hydra's own flags (--cfg, --help, ...)" in proc.stderr.strip().splitlines()[-1]

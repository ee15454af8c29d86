"""Two servers starting at once on one kiln cache: both pull the same artifact into the one pull cache, concurrently
(the S3 responses are slowed so the pulls overlap, and the proxy shows both fetching the weights), and both start;
one verified entry is left, no partial copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts import ops
from artifacts.uri import parse_ref
from tests.conftest import ROOT
from tests.s3_server import FaultProxy, MotoS3

pytestmark = pytest.mark.integration


def test_two_servers_pull_one_artifact_into_one_cache(
    tiny_uri: str, moto_s3: MotoS3, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket = moto_s3.bucket()
    ref = ops.copy(parse_ref(tiny_uri), f"s3://{bucket}/store")
    weights = next(e for e in ops.load_manifest(ref)[1].files if e.path == "model.safetensors")
    fault_proxy.down_rate = 2e6  # 5.8 MB of weights: about 3 s per pull, so two starts a moment apart overlap
    cache = tmp_path / "shared-cache"
    env = {**os.environ, "AWS_ENDPOINT_URL": fault_proxy.endpoint, "KILN_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "runtime", "config", str(ref), "--json"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert '"engine": "vllm"' in out
    blob = f"blobs/sha256/{weights.sha256.split(':')[1]}"
    gets = [r for r in fault_proxy.requests if r.startswith("GET") and blob in r]
    assert len(gets) >= 2, fault_proxy.requests  # both pulled: the race was run, not avoided
    entries = sorted(p.name for p in (cache / "pulled").iterdir())
    assert entries == [ref.digest.split(":")[1]], entries  # type: ignore[union-attr]  # no .pull-* leftovers
    entry = cache / "pulled" / entries[0]
    assert ops.verify_dir(entry, ops.read_dir_manifest(entry)) == []

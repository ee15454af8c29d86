"""Build matrices: `python -m build --multirun` on real launchers (joblib here, a real local Ray cluster), and
concurrent builds racing on the same stage-cache keys and the same store.

Every build here is the tiny model with `quantize=none compile=none`; the matrices vary what only the manifest sees
(model.name, target.engine) so that, after the session's `tiny_uri` build, the jobs cost a process start each. The
race test misses one stage (convert) on purpose, so both processes do the work and commit the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, run_cli

pytestmark = pytest.mark.integration

URI = re.compile(r"file://\S+@sha256:[0-9a-f]{64}")


def multirun(sweep_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m build --multirun`` with the sweep's Hydra directory under the test's tmp (not the shared /tmp)."""
    return run_cli("build", "--multirun", f"hydra.sweep.dir={sweep_dir}", *overrides, timeout=timeout)


def assert_verifies(uri: str) -> None:
    proc = run_cli("artifacts", "verify", uri)
    assert proc.returncode == 0, f"{uri} does not verify:\n{proc.stderr}"


def name_of(uri: str) -> str:
    return uri.rpartition("/")[2].partition("@")[0]


# -- launcher configs: what the README's commands compose, without a cluster -----------------------------------------


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("ray", "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"),
        ("ray_cluster", "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launcher_configs_compose(hydra: None, launcher: str, target: str) -> None:
    from hydra import compose

    overrides = [f"hydra/launcher={launcher}", "model=tiny", "quantize=fp8", "target.engine=transformers"]
    cfg = compose("build", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    assert (cfg.quantize.method, cfg.target.engine) == ("fp8", "transformers")  # the build's own keys still compose


def test_ray_cluster_config_connects_to_an_existing_cluster(hydra: None) -> None:
    """Ray refuses object_store_memory when connecting to a cluster; the plugin sets it unless the key is null."""
    from hydra import compose

    over = ["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=10.0.0.1:6379"]
    init = compose("build", overrides=over, return_hydra_config=True).hydra.launcher.ray.init
    assert init.address == "10.0.0.1:6379"
    assert "object_store_memory" in init
    assert init.object_store_memory is None


def test_slurm_config_keeps_submitit_keys_overridable(hydra: None) -> None:
    from hydra import compose

    over = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1"]
    launcher = compose("build", overrides=over, return_hydra_config=True).hydra.launcher
    assert (launcher.partition, launcher.gpus_per_node, launcher.cpus_per_task) == ("gpu", 1, 8)


# -- the stage cache under concurrent commits ------------------------------------------------------------------------


def test_a_second_commit_of_the_same_key_keeps_the_first_entrys_files(tmp_path: Path) -> None:
    """Two builds that miss the same key both run the stage; the later commit must not delete the entry the earlier
    one committed (that build is reading those files in its next stage or publish) but adopt it."""
    from build.cache import StageCache

    cache = StageCache(tmp_path / "stages")
    material = {"stage": "convert", "params": {"n": 1}}
    records, inodes = [], []
    for _ in range(2):
        with cache.staging("convert") as out:
            (out / "model.safetensors").write_bytes(b"same bytes")
            records.append(cache.commit("convert", material, out, result={}, packages={}, seconds=0.0))
        inodes.append(os.stat(records[-1].path / "model.safetensors").st_ino)
    first, second = records
    assert (second.path, second.output_digest) == (first.path, first.output_digest)
    assert (first.path / "model.safetensors").read_bytes() == b"same bytes"
    # The file the first build holds is still that file, not a copy renamed into its place after a delete.
    assert inodes[1] == inodes[0]
    assert sorted(p.name for p in (tmp_path / "stages" / "convert").iterdir()) == [first.key.split(":")[1]]


def assert_cache_entries_whole(stages: Path) -> None:
    """Every stage-cache entry is complete: no staging or discarded directories left, a stage.json whose key names
    its directory, and an out/ holding exactly the files it lists, each with the recorded size and sha256."""
    for stage_dir in stages.iterdir():
        leftovers = [p.name for p in stage_dir.iterdir() if p.name.startswith(".")]
        assert not leftovers, f"{stage_dir}: temporary directories left behind: {leftovers}"
        for entry in stage_dir.iterdir():
            meta = json.loads((entry / "stage.json").read_text())
            assert meta["key"] == f"sha256:{entry.name}"
            out = entry / "out"
            on_disk = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
            assert sorted(on_disk) == sorted(path for path, _, _ in meta["files"]), entry
            for path, size, digest in meta["files"]:
                data = on_disk[path].read_bytes()
                assert (len(data), "sha256:" + hashlib.sha256(data).hexdigest()) == (size, digest), f"{entry}/{path}"


def test_concurrent_builds_of_one_config_agree(tiny_uri: str, kiln_env: Path) -> None:
    """Two `python -m build` processes started together with identical overrides, one cache, one store: convert
    misses for both (a shard size no other test uses), both run it and commit the same key."""
    overrides = ["model.name=tiny-race", "convert.max_shard_size=3MB", "quantize=none", "compile=none"]
    cmd = [sys.executable, "-m", "build", *overrides]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "convert ran" in err, f"no race: this build found convert cached\n{err}"  # both did the work
    uris = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert uris[0] == uris[1], uris
    assert name_of(uris[0]) == "tiny-race"
    assert_verifies(uris[0])
    assert_verifies(tiny_uri)  # the artifact sharing the racing builds' synth entry and store is intact too
    assert_cache_entries_whole(kiln_env / "stages")


# -- joblib: a local matrix ------------------------------------------------------------------------------------------


def test_joblib_matrix_prints_one_uri_per_job(tiny_uri: str, tmp_path: Path) -> None:
    proc = multirun(
        tmp_path / "sweep",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model=tiny",
        "model.name=mr-a,mr-b",
        "quantize=none",
        "compile=none",
        "target.engine=vllm,transformers",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4, proc.stdout
    assert all(URI.fullmatch(line) for line in lines), proc.stdout
    assert sorted(name_of(u) for u in lines) == ["mr-a", "mr-a", "mr-b", "mr-b"]
    assert len(set(lines)) == 4  # the engine is in the target block, so each job is its own artifact
    for uri in lines:
        assert_verifies(uri)


# -- Ray: a real local cluster ---------------------------------------------------------------------------------------


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A one-node Ray cluster on loopback (`ray start --head`, 2 CPUs, no dashboard) in its own process group and
    temp dir, so that stopping it stops exactly it (`ray stop` would stop every Ray on the machine)."""
    ray = Path(sys.executable).with_name("ray")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="kray-", dir="/tmp")  # short: Ray's socket paths live under it
    ports = {"--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port()}
    cmd = [
        str(ray), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
        *(f"{flag}={value}" for flag, value in ports.items()),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    try:
        assert proc.returncode == 0, f"ray start failed:\n{out}"
        yield f"127.0.0.1:{port}"
    finally:
        stop_group(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


def stop_group(pgid: int) -> None:
    """SIGTERM the Ray processes `ray start` left in its process group, SIGKILL what is left after 3 s (the GCS and
    raylet outlive SIGTERM by more than that; nothing of the cluster is kept)."""
    import time

    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def test_ray_cluster_sweep(tiny_uri: str, ray_head: str, tmp_path: Path) -> None:
    proc = multirun(
        tmp_path / "sweep",
        "hydra/launcher=ray_cluster",
        f"hydra.launcher.ray.init.address={ray_head}",
        "model=tiny",
        "model.name=ray-a,ray-b",
        "quantize=none",
        "compile=none",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Connecting to existing Ray cluster" in proc.stderr  # not a private local Ray
    # Ray forwards each task's stdout prefixed, `(_run_job pid=…) file://…`: one URI line per job.
    uris = sorted(URI.findall(proc.stdout))
    assert [name_of(u) for u in uris] == ["ray-a", "ray-b"], proc.stdout
    for uri in uris:
        assert_verifies(uri)

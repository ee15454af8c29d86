"""A full disk during a pull, a build stage and a publish: a clear error naming the disk and the fix, nothing partial
left behind. Each command runs in its own mount namespace (``unshare -rm``) over a small tmpfs the test mounts, so
the disk really fills (ENOSPC from the kernel), and no root or loop device is needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration
SMALL = "3m"  # the tiny model's weights are 5.8 MB


@cache
def namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def on_small_disk(mount: Path, *command: str, env: dict[str, str]) -> tuple[int, str, list[str], dict[str, str]]:
    """Run ``python -m <command>`` with a ``SMALL`` tmpfs mounted at ``mount``; returns its exit code, its stderr,
    every path left on the small disk afterwards (relative to it) and the sha256 of each file under
    ``blobs/sha256/`` (read before the namespace, and its tmpfs, go away)."""
    if not namespaces_work():
        pytest.skip("needs unprivileged mount namespaces (unshare -rm) to mount a small tmpfs")
    mount.mkdir(parents=True, exist_ok=True)
    script = (
        'mount -t tmpfs -o size=$1 tmpfs "$2" || exit 99; shift 2; "$@" 2>/proc/self/fd/3; echo "rc=$?"; '
        'cd "$MOUNT" && find . -mindepth 1 && echo "--sums--" && '
        "find . -path './blobs/sha256/*' -type f -exec sha256sum {} +"
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"exec 3>&2; {script}", "sh", SMALL, str(mount), sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env, "MOUNT": str(mount)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    rc_line = next(i for i, line in enumerate(lines) if line.startswith("rc="))
    sums_line = lines.index("--sums--")
    paths = [p.removeprefix("./") for p in lines[rc_line + 1 : sums_line]]
    sums = {path.removeprefix("./"): digest for digest, path in (ln.split() for ln in lines[sums_line + 1 :])}
    return int(lines[rc_line][3:]), proc.stderr, paths, sums


def test_serve_refuses_a_pull_that_does_not_fit_before_downloading(tiny_uri: str, tmp_path: Path) -> None:
    mount = tmp_path / "small"
    rc, err, left, _ = on_small_disk(mount, "runtime", "serve", tiny_uri, env={"KILN_CACHE": str(mount)})
    assert rc == 1, err  # not EX_CONFIG: freeing space is a fix a restart can pick up
    assert "not enough space to pull tiny-llama@sha256:" in err
    assert f"into {mount}/pulled" in err
    assert "$KILN_CACHE/pulled" in err
    assert "Traceback" not in err
    assert not [p for p in left if p.startswith("pulled/")], left  # no partial entry, no .pull-* directory


def test_a_stage_that_fills_the_disk_fails_naming_the_stage_and_leaves_no_entry(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    env = {"KILN_CACHE": str(mount), "KILN_STORE": str(tmp_path / "store")}
    rc, err, left, _ = on_small_disk(mount, "build", env=env)
    assert rc == 1, err
    assert f"[synth] no space left on device writing the stage's output under {mount}/stages" in err
    assert "fix: free space on that disk, or point KILN_CACHE at a larger one" in err
    assert "[internal]" not in err
    assert "Traceback" not in err
    # the stage's directory may remain, empty: no committed entry, no staging directory
    assert [p for p in left if p.startswith("stages/")] == ["stages/synth"], left
    assert not (tmp_path / "store" / "names").exists()


def test_a_publish_that_fills_the_store_leaves_no_blob_manifest_or_tag(tiny_uri: str, tmp_path: Path) -> None:
    """The stages are cached from the session's tiny build (their cache is on the normal disk); the store is small."""
    store = tmp_path / "small"
    rc, err, left, sums = on_small_disk(store, "build", f"publish.uri={store.as_uri()}", env={})
    assert rc == 1, err
    assert "[publish] no space left on device writing" in err
    assert f"into {store}/blobs/sha256" in err
    assert "Traceback" not in err
    assert not [p for p in left if "/.tmp-" in p or p.startswith("names")], left
    # what did land is whole: every blob left in the store hashes to its name (the small files fit before the
    # weights filled the disk)
    assert sums, left
    assert all(path.rpartition("/")[2] == digest for path, digest in sums.items()), sums

"""``python -m runtime supervise``: the container's entrypoint keeps the server up as standard-supervisor does.

The server processes are real (``python -m tests.fake_serve supervise …`` runs kiln's supervisor, which starts
``python -m tests.fake_serve serve …``: kiln's server with the fake engine), so restarts, exit codes and signals are
the ones a container sees, in seconds.
"""

from __future__ import annotations

import signal
import time
from contextlib import suppress
from pathlib import Path

import httpx
import psutil
import pytest

from runtime.exitcodes import EX_CONFIG, EX_USAGE
from runtime.supervisor import STABLE_S, Policy, failures_after, verdict
from tests.conftest import Server, assert_all_gone, launch_fake, wait_ready

STARTED = "started the server"  # the supervisor's log line for each server it starts


def start_supervisor(model: str, tmp: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
    """``supervise MODEL --engine fake --port P …`` as a process; not waited for."""
    return launch_fake("supervise", model, tmp, *extra, env=env)


def server_pid(sup: Server) -> int:
    """The pid of the server the supervisor runs now."""
    (child,) = psutil.Process(sup.proc.pid).children()
    return child.pid


def descendants(sup: Server) -> list[psutil.Process]:
    return psutil.Process(sup.proc.pid).children(recursive=True)


def kill_engine(sup: Server) -> None:
    r = httpx.post(sup.base + "/v1/completions", json={"prompt": "[die]", "max_tokens": 9, "stream": True}, timeout=30)
    assert '"code":503' in r.text  # the engine died mid-stream


def wait_restarted(sup: Server, old_pid: int, timeout: float = 60) -> None:
    """Until a server other than ``old_pid`` answers /ping 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert sup.proc.poll() is None, f"the supervisor exited with {sup.proc.returncode}:\n{sup.logs()[-3000:]}"
        with suppress(ValueError, psutil.NoSuchProcess, httpx.TransportError):
            if server_pid(sup) != old_pid and httpx.get(sup.base + "/ping", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"no new server after {timeout}s:\n{sup.logs()[-3000:]}")


@pytest.mark.integration
def test_a_dead_engine_is_restarted_and_serves_again_until_the_retry_limit(tiny_dir: Path, tmp_path: Path) -> None:
    sup = start_supervisor(str(tiny_dir), tmp_path, env={"PROCESS_MAX_START_RETRIES": "1"})
    try:
        wait_ready(sup, 120)
        first = server_pid(sup)
        kill_engine(sup)
        wait_restarted(sup, first)
        r = httpx.post(sup.base + "/v1/completions", json={"prompt": "The cat", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200, r.text
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
        assert "restarting it (retry 1 of 1)" in sup.logs()
        kill_engine(sup)  # the second failure in a row, one more than the one retry allowed
        assert sup.proc.wait(timeout=60) == 1, sup.logs()[-3000:]
    finally:
        sup.stop(signal.SIGKILL)
    logs = sup.logs()
    assert logs.count(STARTED) == 2
    assert "after 1 restarts (PROCESS_MAX_START_RETRIES); giving up" in logs


@pytest.mark.integration
@pytest.mark.parametrize(
    ("problem", "extra", "code"),
    [
        ("missing model", [], EX_CONFIG),
        ("bad setting", ["--option", "max_num_seqs=0"], EX_CONFIG),
        ("unparsable flag", ["--max-model-len", "lots"], EX_USAGE),
    ],
)
def test_a_configuration_error_exits_at_once_without_retries(
    tiny_dir: Path, tmp_path: Path, problem: str, extra: list[str], code: int
) -> None:
    model = str(tmp_path / "no-such-model") if problem == "missing model" else str(tiny_dir)
    sup = start_supervisor(model, tmp_path, *extra)
    try:
        assert sup.proc.wait(timeout=60) == code, sup.logs()[-3000:]
    finally:
        sup.stop(signal.SIGKILL)
    logs = sup.logs()
    assert logs.count(STARTED) == 1, logs
    assert "not restarting it" in logs
    assert "Traceback" not in logs


@pytest.mark.integration
def test_sigterm_drains_the_server_and_exits_0_leaving_no_process(tiny_dir: Path, tmp_path: Path) -> None:
    sup = start_supervisor(str(tiny_dir), tmp_path, "--option", "token_delay_s=0.02")
    body = {"prompt": "The cat", "max_tokens": 60, "temperature": 0, "stream": True}
    try:
        wait_ready(sup, 120)
        family = descendants(sup)
        assert family
        with httpx.stream("POST", sup.base + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            sup.proc.send_signal(signal.SIGTERM)  # mid-stream: the request in flight still completes
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert sup.proc.wait(timeout=60) == 0, sup.logs()[-3000:]
    finally:
        sup.stop(signal.SIGKILL)
    assert_all_gone(family)
    assert sup.logs().count(STARTED) == 1  # a requested stop is not a failure to recover from


@pytest.mark.unit
def test_policy_follows_standard_supervisor() -> None:
    assert Policy.from_env({}) == Policy(auto_recovery=True, max_retries=3)
    assert Policy.from_env({"PROCESS_AUTO_RECOVERY": "FALSE", "PROCESS_MAX_START_RETRIES": "0"}) == Policy(False, 0)
    with pytest.raises(ValueError, match="PROCESS_MAX_START_RETRIES='three'.*set it to e.g. 3"):
        Policy.from_env({"PROCESS_MAX_START_RETRIES": "three"})
    with pytest.raises(ValueError, match="PROCESS_AUTO_RECOVERY='maybe'.*true or false"):
        Policy.from_env({"PROCESS_AUTO_RECOVERY": "maybe"})
    policy = Policy()
    assert [verdict(1, n, policy) for n in (1, 2, 3, 4)] == [None, None, None, 1]
    assert verdict(-9, 1, policy) is None  # killed (the OOM killer): worth a restart
    assert verdict(EX_CONFIG, 1, policy) == EX_CONFIG
    assert verdict(0, 1, policy) == 0
    assert verdict(1, 1, Policy(auto_recovery=False)) == 1
    # A server that served for a while was a good start: its death starts a new count.
    assert failures_after(3, STABLE_S + 1) == 1
    assert failures_after(3, 5.0) == 4

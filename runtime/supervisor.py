"""``python -m runtime supervise [serve args…]``: run ``serve`` as a child process and restart it when it fails, the
way SageMaker's ``standard-supervisor`` (model-hosting-container-standards) keeps a model server up.

* ``PROCESS_AUTO_RECOVERY`` (default ``true``): restart the server when it exits non-zero.
* ``PROCESS_MAX_START_RETRIES`` (default 3): restarts allowed in a row; one more failure and the supervisor exits 1,
  so the platform sees the container fail and replaces it. A server that stayed up ``STABLE_S`` seconds was a
  successful start: its death starts a new count, so a long-lived endpoint is not retired by rare crashes.
* A failure no restart can cure (``runtime serve``'s ``EX_CONFIG`` or a command-line error) is not retried: the
  supervisor exits with that code at once.
* SIGTERM or SIGINT is forwarded to the server, which drains in-flight requests; the supervisor waits for it and
  exits 0 after a clean drain. No process of the server's outlives the supervisor: it is their subreaper and stops
  any left over (an engine worker orphaned by a crash) before a restart and on the way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from artifacts.logs import setup_logging
from runtime import process
from runtime.exitcodes import EX_CONFIG, EX_FAILURE, EX_OK, PERMANENT

log = logging.getLogger("kiln.runtime")
STABLE_S = 300.0  # a server up this long was a successful start; its later death is a fresh failure
RESTART_DELAY_S = 1.0  # between a failure and the restart: a crash loop does not spin the CPU
LEFTOVER_GRACE_S = 10.0  # for the server's leftover processes to stop after SIGTERM, before SIGKILL
PR_SET_PDEATHSIG = 1
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Policy:
    auto_recovery: bool = True
    max_retries: int = 3

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Policy:
        """standard-supervisor's variables; a value it cannot read raises ValueError naming the variable and fix."""
        recovery = env.get("PROCESS_AUTO_RECOVERY", "true").strip().lower()
        if recovery not in TRUE | FALSE:
            raise ValueError(f"PROCESS_AUTO_RECOVERY={recovery!r} is not a boolean: set it to true or false")
        retries = env.get("PROCESS_MAX_START_RETRIES", "3").strip()
        if not retries.isdigit():
            raise ValueError(f"PROCESS_MAX_START_RETRIES={retries!r} is not a whole number: set it to e.g. 3")
        return cls(auto_recovery=recovery in TRUE, max_retries=int(retries))


def verdict(code: int, failures: int, policy: Policy) -> int | None:
    """The supervisor's exit code once the server exited with ``code``, its ``failures``-th failure in a row; None
    means restart it."""
    if code == EX_OK:  # it drained after a SIGTERM sent to it directly: a stop, not a failure
        return EX_OK
    if code in PERMANENT:  # the next start would fail the same way
        return code
    if not policy.auto_recovery or failures > policy.max_retries:
        return EX_FAILURE
    return None


def failures_after(failures: int, uptime_s: float) -> int:
    """The count of failures in a row once a server that ran ``uptime_s`` seconds failed."""
    return 1 if uptime_s >= STABLE_S else failures + 1


def serve_command(args: list[str]) -> list[str]:
    """``python -m <this program> serve …``: the module the supervisor itself was started from (``runtime``, or a
    wrapper that registers more engines before running it, as the tests' ``tests.fake_serve`` does)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name.removesuffix(".__main__") if spec is not None else "runtime"
    return [sys.executable, "-m", module, "serve", *args]


class Supervisor:
    def __init__(self, command: list[str], policy: Policy) -> None:
        self.command = command
        self.policy = policy
        self.child: subprocess.Popen[bytes] | None = None
        self.stop_signal: int | None = None

    def on_signal(self, sig: int, frame: FrameType | None) -> None:
        """Forward the stop to the server; the loop waits for it to drain and exits."""
        if self.stop_signal is None:
            log.info("%s: stopping the server", signal.Signals(sig).name, extra={"fields": {"signal": sig}})
        self.stop_signal = sig
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(sig)

    def run(self) -> int:
        failures = 0
        while True:
            started = time.monotonic()
            code = self._run_once()
            if self.stop_signal is not None:
                return self._stopped_code(code)
            failures = failures_after(failures, time.monotonic() - started)
            decided = verdict(code, failures, self.policy)
            if decided is not None:
                self._say_why(code, decided)
                return decided
            log.warning(
                "the server exited with code %d; restarting it (retry %d of %d)",
                code,
                failures,
                self.policy.max_retries,
                extra={"fields": {"exit_code": code, "retry": failures, "max_retries": self.policy.max_retries}},
            )
            if not self._pause(RESTART_DELAY_S):
                return EX_OK

    def _run_once(self) -> int:
        """Start the server, wait for it, stop whatever it left behind; its exit code."""
        # Its own process group: a terminal's ^C reaches the server once, through this process, not twice.
        self.child = subprocess.Popen(self.command, process_group=0, preexec_fn=_die_with_parent)
        log.info("started the server", extra={"fields": {"pid": self.child.pid}})
        if self.stop_signal is not None:  # a signal that came while it was starting
            self.child.send_signal(self.stop_signal)
        code = self.child.wait()
        process.stop_children(LEFTOVER_GRACE_S)
        return code

    def _stopped_code(self, code: int) -> int:
        """After a requested stop: 0 for a clean drain (or death by the forwarded signal), else the server's code."""
        if code in (EX_OK, -(self.stop_signal or 0)):
            log.info("the server stopped")
            return EX_OK
        return code if code > 0 else 128 - code

    def _say_why(self, code: int, decided: int) -> None:
        fields = {"fields": {"exit_code": code}}
        if decided == EX_OK:
            log.info("the server stopped on its own (exit 0)", extra=fields)
        elif code in PERMANENT:
            log.error("the server cannot start as configured (exit %d); not restarting it", code, extra=fields)
        elif not self.policy.auto_recovery:
            log.error("the server exited with code %d; PROCESS_AUTO_RECOVERY=false, not restarting", code, extra=fields)
        else:
            log.error(
                "the server exited with code %d after %d restarts (PROCESS_MAX_START_RETRIES); giving up",
                code,
                self.policy.max_retries,
                extra=fields,
            )

    def _pause(self, seconds: float) -> bool:
        """Sleep unless a stop comes; False if one did."""
        deadline = time.monotonic() + seconds
        while self.stop_signal is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.stop_signal is None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the supervisor dies (SIGKILL gives the supervisor no chance to
    forward anything), so no server outlives it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def main(argv: list[str]) -> int:
    setup_logging("INFO")
    try:
        policy = Policy.from_env(os.environ)
    except ValueError as exc:
        print(f"kiln runtime: {exc}", file=sys.stderr)
        return EX_CONFIG
    supervisor = Supervisor(serve_command(argv), policy)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, supervisor.on_signal)
    with process.reaped_children(LEFTOVER_GRACE_S):
        return supervisor.run()

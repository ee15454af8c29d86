"""The serving process's hygiene: engine output kept off the terminal, and no process left behind.

* Engine libraries write to the terminal from C++, from child processes and from their own loggers (vLLM's
  warnings, torch's NUMA notice, nanobind's leak report at exit). :func:`engine_output` sends all of that to a log
  file (file descriptors 1 and 2 of this process and so of every child), while kiln's own log lines keep the
  terminal. ``KILN_LOG_LEVEL=DEBUG`` or ``KILN_ENGINE_LOG=-`` keeps everything on the terminal; ``KILN_ENGINE_LOG``
  names another file.
* Engines spawn processes that spawn processes (vLLM: engine core, then workers). :func:`reaped_children` makes this
  process their subreaper (Linux), so an orphaned grandchild is re-parented here instead of to init, and stops
  every child still alive when serving ends.
* Engines may fork their processes from this one (vLLM on CPU, ``runtime/engines/vllm/patches.py``), and a forked
  child inherits every descriptor, the HTTP server's sockets among them. :func:`forked_children_close_http` closes
  those in each forked child, so that only the server holds the port and its clients' connections.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from artifacts.paths import cache_root

log = logging.getLogger("kiln.runtime")
PR_SET_CHILD_SUBREAPER = 36
TAIL_LINES = 30
_current_log: Path | None = None
_http_ports: set[int] = set()


def _keeps_terminal() -> bool:
    verbose = os.environ.get("KILN_LOG_LEVEL", "").upper() == "DEBUG"
    target = os.environ.get("KILN_ENGINE_LOG", "")
    return target == "-" or (verbose and not target)


@contextlib.contextmanager
def engine_output() -> Iterator[TextIO]:
    """Everything written to stdout/stderr by anything but kiln's loggers goes to the engine log while inside.
    Yields the terminal's stream, for kiln's own messages (errors) meant for the operator."""
    global _current_log
    if _keeps_terminal():
        yield sys.stderr
        return
    target = os.environ.get("KILN_ENGINE_LOG", "")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = Path(target) if target else cache_root() / "logs" / f"engine-{stamp}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["KILN_ENGINE_OUTPUT"] = "file"  # engines may log more verbosely into a file than onto a terminal
    restore = _split_logging(terminal)
    _current_log = path
    log.info("engine output: %s (KILN_LOG_LEVEL=DEBUG shows it here)", path)
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        restore()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved:
            os.close(f)
        terminal.close()
        _current_log = None


@contextlib.contextmanager
def kiln_logs_only() -> Iterator[None]:
    """Libraries' log records (an engine library's import-time warnings) stay out of a command's output."""
    if _keeps_terminal():
        yield
        return
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    only = _NameFilter("kiln", keep=True)
    for h in handlers:
        h.addFilter(only)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(only)


def _split_logging(terminal: TextIO) -> Callable[[], None]:
    """kiln's records keep the terminal; every other logger's records follow stderr into the engine log."""
    root = logging.getLogger()
    before = list(root.handlers)
    streams = [h for h in before if isinstance(h, logging.StreamHandler)]
    kiln_only = _NameFilter("kiln", keep=True)
    others = logging.StreamHandler(sys.stderr)
    others.addFilter(_NameFilter("kiln", keep=False))
    if streams:
        others.setFormatter(streams[0].formatter)
    for h in streams:
        h.setStream(terminal)
        h.addFilter(kiln_only)
    root.addHandler(others)

    def restore() -> None:
        for h in streams:
            h.removeFilter(kiln_only)
            h.setStream(sys.stderr)
        root.removeHandler(others)

    return restore


class _NameFilter(logging.Filter):
    def __init__(self, prefix: str, keep: bool) -> None:
        super().__init__()
        self.prefix, self.keep = prefix, keep

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == self.prefix or record.name.startswith(self.prefix + ".")
        return ours == self.keep


def engine_log_tail(lines: int = TAIL_LINES) -> str:
    """The last lines of the engine log (for a failure's report), or "" when output stays on the terminal."""
    if _current_log is None:
        return ""
    with contextlib.suppress(OSError):
        text = _current_log.read_text(errors="replace").splitlines()[-lines:]
        return f"last lines of the engine log {_current_log}:\n" + "\n".join(f"  | {line}" for line in text)
    return ""


@contextlib.contextmanager
def reaped_children(grace_s: float = 10.0) -> Iterator[None]:
    """Adopt orphaned descendants while inside; stop every child still alive on the way out."""
    _become_subreaper()
    try:
        yield
    finally:
        stop_children(grace_s)


def _become_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def children(pid: int | None = None) -> list[int]:
    """Live child processes of ``pid`` (this process by default), from /proc (Linux; elsewhere: none).

    multiprocessing's resource tracker is left out: it ignores SIGTERM by design and exits, after cleaning up what
    the engine's processes left registered, when this process exits and its pipe closes."""
    parent = os.getpid() if pid is None else pid
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            if int(fields[1]) != parent or fields[0] == "Z":
                continue
            if b"multiprocessing.resource_tracker" not in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
    return out


def stop_children(grace_s: float) -> None:
    """SIGTERM every remaining child, SIGKILL what outlives ``grace_s``, and reap them all."""
    pids = children()
    if pids:
        log.debug("stopping %d leftover engine processes: %s", len(pids), pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while (pids := children()) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.05)
        _reap()
        if not pids:
            return


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def forked_children_close_http(port: int) -> None:
    """In every child forked from this process from now on, close the sockets of the HTTP server on ``port``.

    Otherwise an engine process would hold the listening socket, so the port would stay bound while it lives on
    after the server, and every connection open at the fork, so a client whose connection the server closed would
    never see it end."""
    _register_close_at_fork()
    _http_ports.add(port)


@functools.cache
def _register_close_at_fork() -> None:
    """Once per process: os.register_at_fork has no undo."""
    os.register_at_fork(after_in_child=_close_http_sockets)


def _close_http_sockets() -> None:
    """Close each inherited TCP socket whose local port is an HTTP server's (its listening socket and the
    connections it accepted); leave every other descriptor as it is."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux: nothing to look up descriptors by
        return
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket, or the listing's own descriptor, already closed
            continue
        try:
            ours = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockname()[1] in _http_ports
        except OSError:
            ours = False
        if ours:
            sock.close()
        else:
            sock.detach()  # not ours to close

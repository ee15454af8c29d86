"""A child forked from the serving process holds none of the HTTP server's sockets (runtime/process.py), and
nothing else of the parent's is closed in it. The end-to-end case, vLLM's forked engine core and worker on CPU,
is in tests/test_compile.py."""

from __future__ import annotations

import multiprocessing
import os
import socket
from multiprocessing.connection import Connection

import pytest

from runtime import process

pytestmark = pytest.mark.unit


def _identity(fd: int) -> tuple[int, int] | None:
    """What a descriptor refers to (a closed number may be reused by the next open, so the number is not enough)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open_in_child(fds: dict[str, tuple[int, tuple[int, int] | None]], out: Connection) -> None:
    """Report which of ``fds`` (number, identity in the parent) this forked process still holds."""
    out.send({name: _identity(fd) == same for name, (fd, same) in fds.items()})


@pytest.fixture
def http_port(monkeypatch: pytest.MonkeyPatch) -> int:
    """A port registered as the HTTP server's for this test only (the fork hook itself stays registered)."""
    monkeypatch.setattr(process, "_http_ports", set())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    process.forked_children_close_http(port)
    return port


def test_a_forked_child_holds_none_of_the_http_servers_sockets(http_port: int) -> None:
    server = socket.create_server(("127.0.0.1", http_port))
    client = socket.create_connection(("127.0.0.1", http_port))
    accepted, _ = server.accept()
    other = socket.create_server(("127.0.0.1", 0))  # someone else's listening socket, e.g. an engine's own
    reader, writer = multiprocessing.Pipe(duplex=False)
    numbers = {
        "listening": server.fileno(),
        "accepted": accepted.fileno(),
        "other socket": other.fileno(),
        "pipe": writer.fileno(),
        "stdout": 1,
    }
    fds = {name: (fd, _identity(fd)) for name, fd in numbers.items()}
    try:
        child = multiprocessing.get_context("fork").Process(target=_open_in_child, args=(fds, writer))
        child.start()
        still = reader.recv()
        child.join(30)
        assert child.exitcode == 0
        assert still == {"listening": False, "accepted": False, "other socket": True, "pipe": True, "stdout": True}
        # the parent's are untouched, and the connection works both ways
        accepted.sendall(b"ping")
        assert client.recv(4) == b"ping"
        # once the server closes its end, the client sees the end at once: no child keeps the connection open
        accepted.close()
        client.settimeout(5)
        assert client.recv(1) == b""
    finally:
        for s in (server, client, accepted, other):
            s.close()

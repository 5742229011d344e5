"""Raw-socket helpers for the e2e tests (plain blocking sockets: the proxy is another process)."""

from __future__ import annotations

import socket
import time

from harness import tasks


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    """A connected TCP socket to ``host:port`` with ``timeout`` on every operation."""
    sock = socket.create_connection(tasks.split_address(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_lines(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    """Read exactly ``count`` lines (with their ``\\n``); ``AssertionError`` on EOF or timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "only %d of %d lines within %gs: %r" % (data.count(b"\n"), count, timeout, data)
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        assert chunk, "EOF after %d of %d lines: %r" % (data.count(b"\n"), count, data)
        data += chunk
    lines = data.split(b"\n")
    assert lines[count:] == [b""], "more than %d lines: %r" % (count, data)
    return [line + b"\n" for line in lines[:count]]


def recv_until_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything received until EOF; ``AssertionError`` if no EOF within ``timeout``."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no EOF within %gs (got %r)" % (timeout, data)
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError("no EOF within %gs (got %r)" % (timeout, data)) from None
        if not chunk:
            return data
        data += chunk

"""Helpers shared by every test suite: polling with a deadline, raw client sockets, reading lines, totals.

Everything here is cooperative: it waits with ``gevent.sleep`` and gevent
sockets, so the in-process tests keep their servers (which run on the same
hub) going, and the e2e tests, whose proxy is another process, behave as with
plain blocking calls.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

import gevent
from gevent import socket

from harness import tasks
from harness.binaries import fooproxy_command

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.005) -> T:
    """Call ``predicate`` until it returns something truthy, at most ``timeout`` seconds.

    Returns that value, or the last (falsy) one at the deadline, so callers
    write ``assert wait_until(...)`` and may use what it found. A poll, not a
    fixed sleep: it returns as soon as the condition holds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        gevent.sleep(interval)


def split_address(address) -> tuple[str, int]:
    """``(host, port)`` from ``"host:port"``/``"[v6]:port"`` or a socket address; wildcards mean loopback."""
    if isinstance(address, str):
        host, _, port = address.rpartition(":")
        host, port_n = host.strip("[]"), int(port)
    else:
        host, port_n = address[0], address[1]
    return (host if host not in ("", "::", "0.0.0.0") else "127.0.0.1"), port_n


def connect(address, timeout: float = 10.0) -> socket.socket:
    """A connected TCP client socket (TCP_NODELAY) with ``timeout`` on every operation."""
    sock = socket.create_connection(split_address(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_lines(sock, n: int, timeout: float = 5.0) -> list[bytes]:
    """Read ``n`` lines whatever the segmentation, without their ``\\n`` (fewer at EOF)."""
    buf = b""
    sock.settimeout(timeout)
    while buf.count(b"\n") < n:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return buf.split(b"\n")[:n] if buf.count(b"\n") >= n else buf.split(b"\n")


def recv_lines(sock, count: int, timeout: float = 10.0) -> list[bytes]:
    """Exactly ``count`` lines, with their ``\\n``; ``AssertionError`` on EOF, timeout or more lines."""
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


def recv_until_eof(sock, timeout: float = 10.0) -> bytes:
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


def totals(dispatcher) -> dict:
    """An in-process proxy's stats as ``/stats`` shows them (totals, gauges, rates)."""
    return dispatcher.snapshot().as_dict()


def run_fooproxy(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """The installed ``fooproxy`` with ``args``, to completion: exit status and captured text output."""
    return subprocess.run(
        [*fooproxy_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tasks.proxy_env(),
        stdin=subprocess.DEVNULL,
    )


#: How gevent's monitor thread (GEVENT_MONITOR_THREAD_ENABLE, on in ``make test``) starts a report.
_MONITOR_REPORT = "appears to be blocked"


def hub_errors_of_ours(text: str) -> list[str]:
    """What the hub's exception stream says about fooproxy: every exception, and the blocks in our code.

    gevent's monitor reports the hub blocked for more than 0.1 s wherever it
    was: on a loaded 2-core machine that is also pytest importing a module or
    the process waiting for a core. A report counts only when its blocked stack
    (up to the dump of all threads) runs through fooproxy's own code. Anything
    in the stream that is not a monitor report counts as it is.
    """
    found = []
    for part in text.split("=" * 80):
        if _MONITOR_REPORT not in part:
            if part.strip():
                found.append(part)
            continue
        blocked = part.split("Blocked Stack", 1)[-1].split("*" * 80, 1)[0]
        if "/fooproxy/" in blocked:
            found.append(part)
    return found

"""Session behaviour seen from outside: upstream down, half-close, linger, bytes and counts."""

from __future__ import annotations

import signal
import socket
import struct
import time

import pytest

from harness import tasks
from harness.peers.answer import ERRDECODE, answer
from tests.e2e.helpers import connect, recv_lines, recv_until_eof

pytestmark = pytest.mark.e2e
CHECK_TRACEBACKS = True  # see conftest.procs


def wait_for_stats(proxy: tasks.Service, predicate, timeout: float = 5.0) -> dict:
    """Read stats until ``predicate(stats)`` holds; the last stats in the assertion message otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        stats = tasks.signal_stats(proxy)
        if predicate(stats):
            return stats
        assert time.monotonic() < deadline, "stats never satisfied the condition: %s\n%s" % (stats, proxy.tail())
        time.sleep(0.05)


def test_upstream_down_fails_the_client_promptly_then_recovers(procs, peers) -> None:
    upstream = tasks.local_address()  # nothing listens here yet
    proxy = procs.proxy(upstream, "-connect-timeout", "2")
    result = tasks.run_client(proxy.address, peers=peers, timeout=30)
    assert result.failed, result.describe()
    assert result.duration < 3, "client took %.2fs to learn the upstream is down" % result.duration
    assert proxy.alive(), proxy.tail()
    stats = tasks.signal_stats(proxy)
    assert stats["upstream_errors"] >= 1, stats
    assert stats["msg_req"] == 0 and stats["msg_invalid"] == 0, stats

    procs.server(peers, listen=upstream)
    result = tasks.run_client(proxy.address, peers=peers)
    assert result.ok, result.describe() + "\n" + proxy.tail()
    stats = tasks.signal_stats(proxy)
    assert not tasks.check_counts(stats, 1), stats


def test_half_close_with_a_server_that_never_closes(procs, py_peers) -> None:
    """REQ, REQ, shutdown(WR): both answers, then EOF from the proxy, well within -linger."""
    server = procs.server(py_peers)  # like the reference: never closes its side after EOF
    proxy = procs.proxy(server.address, "-linger", "5")
    with connect(proxy.address) as sock:
        sock.sendall(b"REQ 1 abc\nREQ 2 defg\n")
        sock.shutdown(socket.SHUT_WR)
        sent = time.monotonic()
        data = recv_until_eof(sock, timeout=10)
        took = time.monotonic() - sent
    assert data == answer(b"REQ", 1, b"abc") + answer(b"REQ", 2, b"defg")
    assert took < 2.5, "EOF after %.2fs: the proxy waited for the linger instead of the owed answers" % took
    stats = wait_for_stats(proxy, lambda s: s["connections_active"] == 0)
    assert stats["msg_req"] == 2 and stats["msg_ack"] + stats["msg_nak"] == 2, stats


def test_half_close_with_a_silent_upstream_ends_after_the_linger(procs) -> None:
    """The upstream accepts (kernel backlog) and never answers: EOF comes once -linger is over."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        proxy = procs.proxy("127.0.0.1:%d" % silent.getsockname()[1], "-linger", "1")
        with connect(proxy.address) as sock:
            sock.sendall(b"REQ 1 abc\n")
            sock.shutdown(socket.SHUT_WR)
            sent = time.monotonic()
            assert recv_until_eof(sock, timeout=10) == b""
            took = time.monotonic() - sent
        assert 0.5 <= took < 4, "EOF after %.2fs with -linger 1" % took
        stats = wait_for_stats(proxy, lambda s: s["connections_active"] == 0)
        assert stats["msg_req"] == 1 and stats["msg_ack"] + stats["msg_nak"] == 0, stats


def test_bytes_pass_unchanged_whatever_the_segmentation(procs, py_peers) -> None:
    server = procs.server(py_peers, "-split")
    proxy = procs.proxy(server.address)
    requests = [b"REQ %d data%d\n" % (i, i) for i in range(1, 11)]
    with connect(proxy.address) as sock:
        for byte in b"".join(requests):  # one byte per segment
            sock.sendall(bytes([byte]))
        got = recv_lines(sock, 10)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    assert got == [answer(b"REQ", i, b"data%d" % i) for i in range(1, 11)]
    stats = tasks.signal_stats(proxy)
    assert not tasks.check_counts(stats, 1, 10), stats


def test_undecodable_lines_pass_through_and_count_apart(procs, py_peers) -> None:
    server = procs.server(py_peers)
    proxy = procs.proxy(server.address)
    with connect(proxy.address) as sock:
        sock.sendall(b"hello there\nREQ 1 x\n")
        got = recv_lines(sock, 2)
    assert got == [ERRDECODE, answer(b"REQ", 1, b"x")]
    stats = wait_for_stats(proxy, lambda s: s["msg_invalid"] >= 1)
    assert stats["msg_invalid"] == 1, stats
    assert stats["msg_req"] == 1, stats
    # "NAK 0 ERRDECODE" is itself a well-formed NAK.
    assert stats["msg_ack"] + stats["msg_nak"] == 2, stats


def test_server_killed_mid_session_closes_the_client_promptly(procs, peers) -> None:
    server = procs.server(peers)
    proxy = procs.proxy(server.address)
    with connect(proxy.address) as sock:
        sock.sendall(b"REQ 1 x\n")
        assert recv_lines(sock, 1) == [answer(b"REQ", 1, b"x")]
        server.stop(sig=signal.SIGKILL)
        started = time.monotonic()
        try:
            assert recv_until_eof(sock, timeout=5) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 2
    assert proxy.alive(), proxy.tail()
    wait_for_stats(proxy, lambda s: s["connections_active"] == 0)


def test_clients_that_reset_mid_flight_leave_nothing_behind(peers, proxy: tasks.Service) -> None:
    requests = b"".join(b"REQ %d abc\n" % i for i in range(1, 501))
    for _ in range(20):
        sock = connect(proxy.address)
        sock.sendall(requests)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST, answers unread
    wait_for_stats(proxy, lambda s: s["connections_active"] == 0)
    assert proxy.alive(), proxy.tail()
    assert tasks.run_client(proxy.address, peers=peers).ok

"""Limits and timeouts: -max-conns, -connect-timeout, -idle-timeout (loopback only)."""

from __future__ import annotations

import time

import gevent
import pytest
from conftest import closed_by_proxy
from gevent.event import Event
from gevent.server import StreamServer

from fooproxy.config import Address
from fooproxy.databus import IdleSweep
from tests.helpers import connect, read_lines, totals, wait_until


def silent_for(c, seconds: float) -> bool:
    """Nothing (not even EOF) arrives on ``c`` for ``seconds``: proves a negative, bounded."""
    c.settimeout(seconds)
    try:
        c.recv(100)
    except TimeoutError:
        return True
    return False


# --- -max-conns --------------------------------------------------------------


def test_max_conns_holds_extra_clients_in_the_backlog(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, max_conns=2)
    a, b = connect(d.address), connect(d.address)
    for i, c in enumerate((a, b)):
        c.sendall(b"REQ %d a\n" % i)
        assert read_lines(c, 1) == [b"ACK %d ok" % i]
    third = connect(d.address)  # the kernel completes the handshake; the proxy does not accept
    third.sendall(b"REQ 3 c\n")
    assert silent_for(third, 0.3)
    assert totals(d)["connections_total"] == 2 and srv.connections == 2
    assert b"REQ 3" not in srv.received
    a.close()  # a slot frees: the third is accepted and served
    assert read_lines(third, 1) == [b"ACK 3 ok"]
    assert totals(d)["connections_total"] == 3
    b.sendall(b"REQ 4 d\n")  # the others are unaffected
    assert read_lines(b, 1) == [b"ACK 4 ok"]


# --- -connect-timeout ----------------------------------------------------------


@pytest.mark.parametrize("pool_size", [0, 2])
def test_connect_timeout_closes_the_client_and_keeps_serving(blackhole, proxy_for, pool_size):
    d = proxy_for(blackhole, connect_timeout=0.3, pool_size=pool_size)
    for n in (1, 2):
        t0 = time.monotonic()
        c = connect(d.address)
        c.sendall(b"REQ 1 a\n")
        assert closed_by_proxy(c)
        assert 0.25 <= time.monotonic() - t0 < 2
        assert wait_until(lambda n=n: totals(d)["upstream_errors"] == n)
        assert totals(d)["connections_active"] == 0 and totals(d)["pool_open"] == 0


@pytest.mark.parametrize("pool_size", [0, 2])
def test_drain_closes_clients_still_waiting_for_their_upstream(blackhole, proxy_for, pool_size):
    d = proxy_for(blackhole, connect_timeout=30, pool_size=pool_size, grace=0.2)
    clients = [connect(d.address) for _ in range(3)]
    assert wait_until(lambda: totals(d)["connections_active"] == 3)
    # Unpooled: three dials on watchers; pooled: two handlers dialling, one queued.
    assert (len(d.proxy.connecting), len(d.proxy.handlers)) == ((3, 0) if pool_size == 0 else (0, 3))
    t0 = time.monotonic()
    d.shutdown()  # the fixture then checks that no dial, handler or session is left
    assert time.monotonic() - t0 < 5
    for c in clients:
        assert closed_by_proxy(c)
    assert totals(d)["connections_active"] == 0
    assert totals(d)["upstream_errors"] == 0  # shut down, not "unreachable"


# --- -idle-timeout -------------------------------------------------------------


def test_idle_timeout_zero_disables_it(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, idle_timeout=0)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    assert silent_for(c, 0.5)
    c.sendall(b"REQ 2 b\n")
    assert read_lines(c, 1) == [b"ACK 2 ok"]


def test_idle_timeout_counts_client_to_server_traffic(mini_server, proxy_for):
    srv = mini_server()
    srv.release.clear()  # the server reads but never answers: traffic one way only
    d = proxy_for(srv.address, idle_timeout=0.25)
    c = connect(d.address)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 0.8:  # over three idle periods, a line every 0.08 s
        c.sendall(b"REQ %d a\n" % i)
        i += 1
        assert silent_for(c, 0.08)  # paces the client, and nothing (no EOF) came back
    srv.release.set()
    assert read_lines(c, i) == [b"ACK %d ok" % k for k in range(i)]
    assert totals(d)["connections_active"] == 1


def test_sessions_sharing_one_idle_check_end_each_on_its_own_silence(mini_server, proxy_for):
    """One repeating check serves every session (IdleSweep): the silent one ends on time, the busy
    one stays, and once no session is left the check stops (an idle proxy has no timer firing)."""
    srv = mini_server()
    d = proxy_for(srv.address, idle_timeout=0.25)
    busy, quiet = connect(d.address), connect(d.address)
    for c in (busy, quiet):
        c.sendall(b"REQ 0 a\n")
        assert read_lines(c, 1) == [b"ACK 0 ok"]
    quiet_since = time.monotonic()
    sweeps = [s for s in IdleSweep._by_loop.values() if s.sessions]
    assert len(sweeps) == 1 and len(sweeps[0].sessions) == 2 and sweeps[0].timer.active

    def talk() -> list[bytes]:
        got = []
        for i in range(1, 9):  # 0.64 s of traffic on one, silence on the other
            busy.sendall(b"REQ %d a\n" % i)
            got += read_lines(busy, 1)
            gevent.sleep(0.08)  # the pace of the busy client's lines, not a wait for an event
        return got

    talker = gevent.spawn(talk)
    assert closed_by_proxy(quiet, timeout=2)
    assert 0.25 <= time.monotonic() - quiet_since < 0.25 * 1.25 + 0.2  # its own timeout, not the busy one's
    assert talker.get(timeout=5) == [b"ACK %d ok" % i for i in range(1, 9)]
    busy.sendall(b"REQ 9 a\n")
    assert read_lines(busy, 1) == [b"ACK 9 ok"]  # still open: its traffic counted
    busy.close()
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    assert not sweeps[0].sessions and not sweeps[0].timer.active


def test_idle_timeout_counts_server_to_client_traffic(proxy_for):
    """A server that talks on its own (a line every 0.08 s) keeps a silent client's session."""
    stop = Event()

    def talker(sock, _addr) -> None:
        k = 0
        while not stop.wait(0.08):
            try:
                sock.sendall(b"ACK %d tick\n" % k)
            except OSError:
                return
            k += 1

    server = StreamServer(("127.0.0.1", 0), talker)
    server.start()
    try:
        d = proxy_for(Address("127.0.0.1", server.server_port), idle_timeout=0.25)
        c = connect(d.address)
        lines = read_lines(c, 10)  # about 0.8 s, over three idle periods
        assert lines == [b"ACK %d tick" % k for k in range(10)]
        stop.set()  # now neither side says anything
        assert closed_by_proxy(c)
        assert wait_until(lambda: totals(d)["connections_active"] == 0)
    finally:
        stop.set()
        server.stop(timeout=1)


def test_idle_timeout_closes_a_quiet_session_on_time(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, idle_timeout=0.3)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    t0 = time.monotonic()
    assert closed_by_proxy(c)
    assert 0.2 <= time.monotonic() - t0 < 2
    assert wait_until(lambda: totals(d)["connections_active"] == 0)

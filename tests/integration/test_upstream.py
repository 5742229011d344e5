"""Upstream connects: ``Connector`` (how it connects, what a failure says), ``HubConnect`` (on watchers)."""

from __future__ import annotations

import errno
import socket as _stdsocket
import time

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import Event

from fooproxy.config import Address
from fooproxy.pool import UpstreamPool
from fooproxy.upstream import UNREACHABLE, Connector, HubConnect, UpstreamError
from tests.helpers import read_lines, wait_until


def refused_address() -> Address:
    """A loopback port with nothing listening (bound, then released)."""
    probe = _stdsocket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return Address("127.0.0.1", port)


def test_connector_times_out_on_a_blackhole(blackhole):
    conn = Connector(blackhole, 0.3)
    t0 = time.monotonic()
    with pytest.raises(UpstreamError, match=r"timed out after 0.3s"):
        conn.acquire()
    assert 0.25 <= time.monotonic() - t0 < 2


# --- HubConnect: the connect without a greenlet ---------------------------------------


class Reports:
    """Collects ``HubConnect`` reports (made in the hub) and waits for the first."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.arrived = Event()

    def __call__(self, sock, exc) -> None:
        self.calls.append((sock, exc))
        self.arrived.set()

    def one(self, timeout: float = 5.0) -> tuple:
        assert self.arrived.wait(timeout), "HubConnect never reported"
        gevent.sleep(0.05)  # a second report would come right after the first
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


def _targets(address: Address) -> list[tuple]:
    return [(_stdsocket.AF_INET, (address.host, address.port))]


def test_dial_connects_and_the_socket_works(mini_server):
    srv = mini_server()
    got = Reports()
    HubConnect(_targets(srv.address), 2.0, got)
    raw, exc = got.one()
    assert exc is None and raw.getsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY)
    assert raw.gettimeout() == 0.0  # the bare OS socket, non-blocking: it never waits in the hub
    sock = gsocket.socket(raw.family, raw.type, fileno=raw.detach())  # cooperative, for the exchange
    sock.sendall(b"REQ 1 a\n")
    assert read_lines(sock, 1) == [b"ACK 1 ok"]
    sock.close()


def test_dial_reports_a_refused_connect_once():
    probe = _stdsocket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    got = Reports()
    HubConnect([(_stdsocket.AF_INET, ("127.0.0.1", port))], 2.0, got)
    sock, exc = got.one()
    assert sock is None and exc.errno == errno.ECONNREFUSED


def test_dial_times_out_then_tries_the_next_target(blackhole, mini_server):
    srv = mini_server()
    got = Reports()
    t0 = time.monotonic()
    HubConnect(_targets(blackhole) + _targets(srv.address), 0.3, got)
    sock, exc = got.one()
    assert exc is None and 0.25 <= time.monotonic() - t0 < 2
    assert sock.getpeername()[1] == srv.address.port
    sock.close()


def test_dial_cancel_reports_nothing_connected(blackhole):
    got = Reports()
    dial = HubConnect(_targets(blackhole), 30, got)
    assert not dial.finished
    dial.cancel()
    assert got.one() == (None, None) and dial.finished and dial.sock is None


# --- Connector: how it connects, and what a failure says ------------------------


def test_a_refused_connect_keeps_later_connects_in_the_hub():
    """A failure re-resolves in the background; it does not send clients to a greenlet meanwhile."""
    conn = Connector(refused_address(), 1.0)
    conn.prepare()
    try:
        for _ in range(3):
            got = Reports()
            dial = conn.connect_from_hub(got)
            assert dial.resolver is None  # connected from the hub: no lookup, no greenlet
            sock, exc = got.one()
            assert sock is None and isinstance(exc, UpstreamError)
            assert exc.reason == UNREACHABLE and "refused" in str(exc)
    finally:
        conn.close()


def test_a_moved_name_is_found_again_after_a_refused_connect(mini_server):
    conn = Connector(refused_address(), 1.0)
    conn.prepare()
    srv = mini_server()
    conn.address = srv.address  # "the name moved": only a new lookup finds it
    try:

        def connects() -> bool:
            got = Reports()
            conn.connect_from_hub(got)
            sock, _exc = got.one()
            if sock is not None:
                sock.close()
            return sock is not None

        assert wait_until(connects, timeout=5, interval=0.1)
    finally:
        conn.close()


def test_an_unresolved_name_is_looked_up_in_a_greenlet_then_dialled(mini_server):
    srv = mini_server()
    conn = Connector(Address("localhost", srv.address.port), 2.0)  # never prepared: not resolved yet
    got = Reports()
    dial = conn.connect_from_hub(got)
    assert dial.resolver is not None and not dial.finished
    raw, exc = got.one()
    assert exc is None
    sock = gsocket.socket(raw.family, raw.type, fileno=raw.detach())
    sock.sendall(b"REQ 1 a\n")
    assert read_lines(sock, 1) == [b"ACK 1 ok"]
    sock.close()
    assert dial.resolver is None and dial.finished


def test_cancelling_a_dial_during_its_lookup_reports_nothing_connected(mini_server):
    conn = Connector(Address("localhost", mini_server().address.port), 2.0)
    got = Reports()
    dial = conn.connect_from_hub(got)
    dial.cancel()
    assert got.one() == (None, None) and dial.finished and dial.resolver is None


def test_the_pool_refuses_dial_which_would_skip_its_slots():
    pool = UpstreamPool(refused_address(), 1.0, size=1, wait=0.05)
    with pytest.raises(TypeError, match="acquire"):
        pool.connect_from_hub(Reports())
    assert pool.open_count == 0
    pool.close()

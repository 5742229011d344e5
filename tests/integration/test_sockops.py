"""The per-client socket calls (``fooproxy.sockops``) and the connect fast path built on them.

Each ``sockops`` test runs twice: through the C calls (``fooproxy/_flow.c``,
skipped when the extension is not built) and through the socket-module
fallback, on real loopback sockets.
"""

from __future__ import annotations

import _socket
import os
import select
import socket as _stdsocket

import pytest
from gevent import socket as gsocket

from fooproxy import native, sockops
from fooproxy.balancer import Balancer
from fooproxy.config import Address, Config
from fooproxy.stats import Stats
from fooproxy.upstream import Connector
from tests.integration.test_upstream import refused_address


@pytest.fixture(params=["c", "python"])
def impl(request, monkeypatch):
    """Which implementation sockops uses for this test."""
    if request.param == "c":
        if native.EXT is None:
            pytest.skip("the C extension is not built (or FOOPROXY_PURE is set)")
        monkeypatch.setattr(sockops, "_C", native.EXT)
    else:
        monkeypatch.setattr(sockops, "_C", None)
    return request.param


def open_fds() -> set[int]:
    return set(int(n) for n in os.listdir("/proc/self/fd"))


def listener(family: int = _stdsocket.AF_INET, host: str = "127.0.0.1") -> _stdsocket.socket:
    lsock = _stdsocket.socket(family, _stdsocket.SOCK_STREAM)
    lsock.bind((host, 0))
    lsock.listen(8)
    lsock.setblocking(False)
    return lsock


@pytest.mark.parametrize("family,host", [(_stdsocket.AF_INET, "127.0.0.1"), (_stdsocket.AF_INET6, "::1")])
def test_accept_gives_a_non_blocking_socket_and_the_address_accept_would(impl, family, host):
    lsock = listener(family, host)
    peer = _stdsocket.socket(family, _stdsocket.SOCK_STREAM)
    try:
        peer.connect(lsock.getsockname())
        client, address = sockops.accept(lsock)
        try:
            assert address == peer.getsockname()  # (host, port) or IPv6's 4-tuple, as socket.accept says
            assert client.family == family and client.getblocking() is False
            with pytest.raises(BlockingIOError):
                client.recv(1)  # non-blocking for real: nothing sent yet
            peer.sendall(b"REQ 1 x\n")
            assert select.select([client], [], [], 5)[0] == [client]
            assert client.recv(64) == b"REQ 1 x\n"
        finally:
            client.close()
        assert sockops.accept(lsock) is None  # nobody else waiting: a value, not BlockingIOError
    finally:
        peer.close()
        lsock.close()


def test_connect_now_connects_to_a_loopback_listener_with_nodelay(impl):
    lsock = listener()
    try:
        sock = sockops.connect_now(_stdsocket.AF_INET, lsock.getsockname())
        assert sock is not None
        try:
            assert sock.getpeername() == lsock.getsockname()
            assert sock.getsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY)
            assert sock.getblocking() is False
            accepted, _ = lsock.accept()
            sock.send(b"REQ 1 x\n")
            accepted.settimeout(5)
            assert accepted.recv(64) == b"REQ 1 x\n"
            accepted.close()
        finally:
            sock.close()
    finally:
        lsock.close()


def test_connect_now_refused_or_hanging_leaves_nothing_open(impl, blackhole):
    before = open_fds()
    refused = refused_address()
    assert sockops.connect_now(_stdsocket.AF_INET, (refused.host, refused.port)) is None
    assert sockops.connect_now(_stdsocket.AF_INET, (blackhole.host, blackhole.port)) is None  # still in progress
    assert sockops.connect_now(_stdsocket.AF_INET, ("not-an-address", 1)) is None
    assert open_fds() == before


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_close_closes_a_bare_socket_and_a_gevent_one(impl):
    for sock in (_socket.socket(), _stdsocket.socket(), gsocket.socket()):  # the last through its own close
        fd = sock.fileno()
        sockops.close(sock)
        assert sock.fileno() == -1 and not is_open(fd), sock


# -- the fast path: Connector.connect_now, Balancer.connect_now ---------------------------


def test_connector_connect_now_times_the_connect_and_tries_only_loopback(mini_server):
    srv = mini_server()
    times: list[float] = []
    conn = Connector(srv.address, 2.0)
    conn.connect_timer = times.append
    conn.prepare()
    sock = conn.connect_now()
    assert sock is not None and sock.getpeername()[1] == srv.address.port
    assert len(times) == 1 and 0 <= times[0] < 2
    conn.release(sock, False)
    assert sock.fileno() == -1
    remote = Connector(Address("192.0.2.1", 9), 2.0)  # TEST-NET-1: a remote target is never tried at once
    remote._targets = [(_stdsocket.AF_INET, ("192.0.2.1", 9))]
    before = open_fds()
    assert remote.connect_now() is None
    assert open_fds() == before


def test_balancer_connect_now_leases_its_one_upstream_and_leaves_several_to_failover(mini_server):
    srv = mini_server()
    stats = Stats()
    one = Balancer(Config(listen=Address("127.0.0.1", 0), forward=srv.address, http=None), stats, checks=False)
    one.prepare()
    sock = one.connect_now()
    assert sock is not None
    upstream = one.upstreams[0]
    assert upstream.active == 1 and one.messages_cell(sock) == upstream.messages_cell
    assert sum(stats.snapshot().latency.connect) == 1  # the connect histogram counted it
    one.release(sock, False)
    assert upstream.active == 0 and sock.fileno() == -1
    other = mini_server()
    two = Balancer(
        Config(listen=Address("127.0.0.1", 0), forward=(srv.address, other.address), http=None), Stats(), checks=False
    )
    two.prepare()
    assert two.connect_now() is None  # the order and the failover are FailoverConnect's
    two.close()
    one.close()

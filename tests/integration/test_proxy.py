"""The proxy in-process in front of a small Foo server, through real sockets."""

from __future__ import annotations

import logging
import socket as _stdsocket

import gevent
import pytest
from gevent import socket

from fooproxy import databus
from fooproxy.config import Address
from tests.helpers import connect, read_lines, totals, wait_until


def test_exchange_is_forwarded_unchanged_and_counted(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address)
    c = connect(d.address)
    c.sendall(b"REQ 1 Hey\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    assert bytes(srv.received) == b"REQ 1 Hey\n"
    c.close()
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    t = totals(d)
    assert (t["msg_req"], t["msg_ack"], t["msg_nak"], t["msg_total"], t["msg_invalid"]) == (1, 1, 0, 2, 0)
    assert t["bytes_client_to_server"] == 10 and t["bytes_server_to_client"] == 9
    assert t["connections_total"] == 1


def test_pipelined_requests_are_not_serialised(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address)
    c = connect(d.address)
    n = 5000
    payload = b"".join(b"REQ %d data%d\n" % (i, i) for i in range(n))
    sender = gevent.spawn(c.sendall, payload)
    lines = read_lines(c, n)
    sender.get()
    assert lines == [b"ACK %d ok" % i for i in range(n)]
    assert totals(d)["msg_req"] == n and totals(d)["msg_ack"] == n


def test_byte_by_byte_client_and_split_server(mini_server, proxy_for):
    srv = mini_server(split=True)
    d = proxy_for(srv.address)
    c = connect(d.address)
    msg = b"REQ 1 a\nREQ 2 b\nREQ 3 c\n"
    for i in range(len(msg)):
        c.sendall(msg[i : i + 1])
        gevent.sleep(0)  # let each byte travel as its own segment
    assert read_lines(c, 3) == [b"ACK 1 ok", b"ACK 2 ok", b"ACK 3 ok"]
    assert bytes(srv.received) == msg
    t = totals(d)
    assert t["msg_req"] == 3 and t["msg_ack"] == 3 and t["msg_invalid"] == 0


def test_half_close_delivers_answers_then_eof_without_server_eof(mini_server, proxy_for):
    srv = mini_server()  # never closes its side, like the reference server
    d = proxy_for(srv.address, linger=60)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\nREQ 2 b\n")
    c.shutdown(_stdsocket.SHUT_WR)
    c.settimeout(5)  # far below the linger: EOF must come from the answers being delivered
    got = b""
    while True:
        data = c.recv(4096)
        if not data:
            break
        got += data
    assert got == b"ACK 1 ok\nACK 2 ok\n"
    assert wait_until(lambda: totals(d)["connections_active"] == 0)


def test_linger_bounds_a_session_whose_answers_never_come(mini_server, proxy_for):
    srv = mini_server()
    srv.release.clear()  # the server reads but does not answer
    d = proxy_for(srv.address, linger=0.3)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert wait_until(lambda: len(srv.received) == 8)
    c.shutdown(_stdsocket.SHUT_WR)
    c.settimeout(5)
    assert c.recv(100) == b""
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    srv.release.set()


def test_upstream_down_closes_client_and_keeps_serving(mini_server, proxy_for):
    probe = _stdsocket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    d = proxy_for(Address("127.0.0.1", port), connect_timeout=1)
    for _ in range(3):
        c = connect(d.address)
        c.settimeout(5)
        try:
            assert c.recv(10) == b""
        except ConnectionResetError:
            pass
        c.close()
    assert wait_until(lambda: totals(d)["upstream_errors"] == 3)
    assert totals(d)["connections_active"] == 0
    # The proxy is still there and serves once a server appears where the name
    # now points: a refused connect re-resolves it in the background.
    srv = mini_server()
    d.connector.upstreams[0].connector.address = srv.address

    def served() -> bool:
        c = connect(d.address)
        try:
            c.sendall(b"REQ 9 x\n")
            return read_lines(c, 1) == [b"ACK 9 ok"]
        except ConnectionResetError:  # still the old target: refused, closed by the proxy
            return False
        finally:
            c.close()

    assert wait_until(served, timeout=5, interval=0.1)


def test_upstream_closing_mid_session_ends_it(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    srv.sockets[0].close()
    c.settimeout(5)
    assert c.recv(100) == b""
    assert wait_until(lambda: totals(d)["connections_active"] == 0)


def test_client_reset_ends_session(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    c.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # RST
    assert wait_until(lambda: totals(d)["connections_active"] == 0)


def test_a_partial_answer_then_a_reset_is_delivered_then_reported_as_the_reset(proxy_for, caplog):
    """The server writes part of a line and resets the connection in one go. The proxy's read of
    the partial line reads once more for the rest (databus.Flow._read_more) and gets the reset:
    the client must still get the bytes first, and the session must end on the reset, which the
    next read would otherwise see only as an EOF ("upstream closed")."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        s, _ = listener.accept()
        assert s.recv(100) == b"REQ 1 a\n"
        # No yield in between: the data and the RST are both queued at the proxy's socket
        # before its next read (the test and the proxy share this hub).
        s.sendall(b"ACK 1 par")
        s.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()

    server = gevent.spawn(serve)
    d = proxy_for(Address("127.0.0.1", listener.getsockname()[1]))
    caplog.set_level(logging.INFO, logger="fooproxy.proxy")
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    c.settimeout(5)
    got = b""
    while chunk := c.recv(100):
        got += chunk
    server.get(timeout=5)
    listener.close()
    assert got == b"ACK 1 par"
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    closes = [r.getMessage() for r in caplog.records if ": closed (" in r.getMessage()]
    assert len(closes) == 1 and ": closed (server->client: ECONNRESET) after " in closes[0], closes
    assert totals(d)["bytes_server_to_client"] == 9
    c.close()


def test_garbage_lines_are_forwarded_and_counted_apart(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address)
    c = connect(d.address)
    junk = b"FOO 1\n\nxx\nREQ 1 x y\n\x00\xff\n"
    c.sendall(junk)
    assert len(read_lines(c, 5)) == 5
    assert bytes(srv.received) == junk
    t = totals(d)
    assert t["msg_invalid"] == 5 and t["msg_req"] == 0
    assert t["msg_nak"] + t["msg_ack"] == 5  # the server's answers are valid messages


def test_oversized_line_passes_unchanged_and_counts_invalid(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address)
    c = connect(d.address)
    big = b"REQ 1 " + b"x" * 300_000 + b"\n"
    sender = gevent.spawn(c.sendall, big + b"REQ 2 ok\n")
    assert read_lines(c, 2) == [b"ACK 1 ok", b"ACK 2 ok"]
    sender.get()
    assert bytes(srv.received) == big + b"REQ 2 ok\n"
    t = totals(d)
    assert t["msg_invalid"] == 1 and t["msg_req"] == 1


def test_many_concurrent_clients(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address)

    def one(k: int) -> list[bytes]:
        c = connect(d.address)
        c.sendall(b"".join(b"REQ %d c%d\n" % (i, k) for i in range(50)))
        lines = read_lines(c, 50)
        c.close()
        return lines

    jobs = [gevent.spawn(one, k) for k in range(100)]
    gevent.joinall(jobs, raise_error=True)
    assert all(j.value == [b"ACK %d ok" % i for i in range(50)] for j in jobs)
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    t = totals(d)
    assert t["msg_req"] == 5000 and t["connections_total"] == 100


def test_idle_timeout_closes_quiet_sessions(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, idle_timeout=0.2)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    c.settimeout(5)
    assert c.recv(10) == b""
    assert wait_until(lambda: totals(d)["connections_active"] == 0)


def test_drain_lets_open_sessions_finish(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, grace=5)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    stopper = gevent.spawn(d.shutdown)
    assert wait_until(lambda: d.draining)
    c.sendall(b"REQ 2 b\n")  # still served during the drain
    assert read_lines(c, 1) == [b"ACK 2 ok"]
    c.shutdown(_stdsocket.SHUT_WR)
    stopper.get(timeout=5)
    assert totals(d)["connections_active"] == 0


def test_drain_closes_sessions_after_grace(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, grace=0.2)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    d.shutdown()
    c.settimeout(5)
    assert c.recv(10) == b""
    assert totals(d)["connections_active"] == 0


@pytest.mark.parametrize(
    "ending, reason",
    [("client", databus.CLIENT_CLOSED), ("server", databus.UPSTREAM_CLOSED), ("idle", databus.IDLE)],
)
def test_the_close_line_names_how_the_session_ended(mini_server, proxy_for, caplog, ending, reason):
    srv = mini_server()
    d = proxy_for(srv.address, idle_timeout=0.2)
    caplog.set_level(logging.INFO, logger="fooproxy.proxy")
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    if ending == "client":
        c.close()
    elif ending == "server":
        srv.sockets[0].close()
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    closes = [r.getMessage() for r in caplog.records if ": closed (" in r.getMessage()]
    assert len(closes) == 1 and ": closed (%s) after " % reason in closes[0], closes
    assert "client->server 8 bytes 1 msgs, server->client 9 bytes 1 msgs" in closes[0]
    c.close()


def test_a_client_that_does_not_read_holds_back_the_server_not_the_proxy(mini_server, proxy_for):
    """Backpressure: with the client not reading, the proxy keeps at most one chunk and
    stops reading the server; once the client reads, every answer arrives in order."""
    srv = mini_server()
    d = proxy_for(srv.address, idle_timeout=0)
    n = 50_000  # ~600 KB of answers: far more than the small buffers below can hold
    c = socket.socket()
    c.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVBUF, 4096)
    c.settimeout(10)
    c.connect((d.address[0], d.address[1]))
    assert wait_until(lambda: d.proxy.sessions and srv.sockets)
    bus = next(iter(d.proxy.sessions))
    # Fixed small buffers (no autotuning) so that the stall comes after a few KB, not MBs.
    bus.client.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_SNDBUF, 8192)
    srv.sockets[0].setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_SNDBUF, 8192)
    writer = gevent.spawn(c.sendall, b"".join(b"REQ %d a\n" % i for i in range(n)))
    back = bus.s2c_flow
    assert wait_until(lambda: back.unsent is not None and not back.reader.active, timeout=10)
    gevent.sleep(0.2)  # let whatever can still move, move: the hold must persist
    assert back.unsent is not None and len(back.unsent) <= databus.BUFSIZE
    assert bus.bytes_s2c < 14 * n // 2  # the server's answers wait upstream, not in the proxy
    lines = read_lines(c, n, timeout=20)
    writer.get(timeout=10)
    assert lines == [b"ACK %d ok" % i for i in range(n)]
    assert wait_until(lambda: totals(d)["msg_ack"] == n and totals(d)["msg_req"] == n)
    c.close()


def test_accepted_sockets_inherit_tcp_nodelay_from_the_listener():
    """The kernel behaviour the proxy's accept counts on (Linux): TCP_NODELAY set on a
    listener is set on every socket it accepts, over IPv4 and IPv6 alike."""
    nodelay = (_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY)
    for family, host in ((_stdsocket.AF_INET, "127.0.0.1"), (_stdsocket.AF_INET6, "::1")):
        for on in (1, 0):
            with _stdsocket.socket(family, _stdsocket.SOCK_STREAM) as listener:
                listener.setsockopt(*nodelay, on)
                listener.bind((host, 0))
                listener.listen(4)
                with _stdsocket.create_connection(listener.getsockname()[:2], timeout=5):
                    accepted, _ = listener.accept()
                    with accepted:
                        assert bool(accepted.getsockopt(*nodelay)) == bool(on), (family, on)


def _sessions_have_nodelay(srv, d, clients: int = 3) -> None:
    nodelay = (_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY)
    for i in range(clients):
        c = connect(d.address)
        assert wait_until(lambda: d.proxy.sessions)
        bus = next(iter(d.proxy.sessions))
        assert bus.client.getsockopt(*nodelay) and bus.upstream.getsockopt(*nodelay), i
        c.sendall(b"REQ %d a\n" % i)
        assert read_lines(c, 1) == [b"ACK %d ok" % i]
        c.close()
        assert wait_until(lambda: not d.proxy.sessions)


def test_clients_get_tcp_nodelay_from_the_listener_without_a_setsockopt_each(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address)
    _sessions_have_nodelay(srv, d)
    assert not d.proxy._nodelay_per_client  # learned from the first client: inherited, never set again


def test_clients_get_tcp_nodelay_each_where_the_listener_does_not_pass_it_on(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address)
    d.proxy.socket.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 0)  # as a kernel that does not copy it
    _sessions_have_nodelay(srv, d)
    assert d.proxy._nodelay_per_client

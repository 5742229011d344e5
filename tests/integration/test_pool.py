"""The proxy with -pool-size: upstream reuse, bounds, health checks, expiry, drain."""

from __future__ import annotations

import select
import socket as _stdsocket
import struct
import time

import gevent
import gevent.pool
from conftest import closed_by_proxy

from fooproxy.pool import UpstreamPool
from tests.helpers import connect, read_lines, totals, wait_until


def pool_of(d) -> UpstreamPool:
    assert isinstance(d.connector, UpstreamPool)
    return d.connector


def exchange(address, seqs, tag: bytes = b"x") -> list[bytes]:
    """One client: send the REQs pipelined, read the answers, close."""
    c = connect(address)
    try:
        c.sendall(b"".join(b"REQ %d %s\n" % (i, tag) for i in seqs))
        return read_lines(c, len(seqs))
    finally:
        c.close()


def peer_closed(server_sock) -> bool:
    """The proxy closed its end of this server-side connection (FIN seen or socket done)."""
    if server_sock.fileno() < 0:
        return True  # the server already reacted to the EOF and closed its socket
    if not select.select([server_sock.fileno()], [], [], 0)[0]:
        return False
    try:
        return server_sock.recv(1, _stdsocket.MSG_PEEK) == b""
    except OSError:
        return True


def readable(sock) -> bool:
    return bool(select.select([sock.fileno()], [], [], 0)[0])


def idle_session_done(d) -> bool:
    return totals(d)["connections_active"] == 0 and pool_of(d).idle_count == pool_of(d).open_count


def test_thirty_clients_ten_at_a_time_through_four_connections(mini_server, proxy_for):
    srv = mini_server(split=True)
    d = proxy_for(srv.address, pool_size=4, pool_wait=10)
    peak = [0]

    def one(k: int) -> list[bytes]:
        lines = exchange(d.address, range(k * 10, k * 10 + 10), b"c%d" % k)
        peak[0] = max(peak[0], pool_of(d).open_count)
        return lines

    group = gevent.pool.Pool(10)
    jobs = [group.spawn(one, k) for k in range(30)]
    gevent.joinall(jobs, raise_error=True)
    for k, job in enumerate(jobs):
        assert job.value == [b"ACK %d ok" % i for i in range(k * 10, k * 10 + 10)]
    assert srv.connections <= 4
    assert peak[0] <= 4
    assert wait_until(lambda: idle_session_done(d))
    t = totals(d)
    assert t["msg_req"] == 300 and t["msg_ack"] == 300
    assert t["upstream_errors"] == 0 and t["connections_total"] == 30
    assert t["pool_open"] == srv.connections and t["pool_idle"] == srv.connections


def test_pool_state_is_in_the_snapshot(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2)
    assert (totals(d)["pool_idle"], totals(d)["pool_open"]) == (0, 0)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    assert (totals(d)["pool_idle"], totals(d)["pool_open"]) == (0, 1)  # in use
    c.close()
    assert wait_until(lambda: totals(d)["pool_idle"] == 1)
    assert totals(d)["pool_open"] == 1
    as_json = d.snapshot().as_dict()
    assert as_json["pool_idle"] == 1 and as_json["pool_open"] == 1
    d.shutdown()
    assert (totals(d)["pool_idle"], totals(d)["pool_open"]) == (0, 0)


def test_clean_connection_is_reused_by_the_next_client(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2)
    for k in range(5):
        assert exchange(d.address, [k]) == [b"ACK %d ok" % k]
        assert wait_until(lambda: idle_session_done(d))
    assert srv.connections == 1
    assert bytes(srv.received) == b"".join(b"REQ %d x\n" % k for k in range(5))


def test_answers_owed_at_eof_are_waited_for_then_the_connection_is_reused(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2, linger=30)
    srv.release.clear()  # the server reads but holds its answers
    c = connect(d.address)
    c.sendall(b"REQ 1 a\nREQ 2 b\n")
    assert wait_until(lambda: len(srv.received) == 16)
    c.shutdown(_stdsocket.SHUT_WR)  # EOF with two answers owed
    assert wait_until(lambda: d.proxy.sessions and next(iter(d.proxy.sessions)).client_eof)
    srv.release.set()
    c.settimeout(5)  # far below the linger
    got = b""
    while True:
        data = c.recv(100)
        if not data:
            break
        got += data
    assert got == b"ACK 1 ok\nACK 2 ok\n"
    assert wait_until(lambda: idle_session_done(d) and pool_of(d).idle_count == 1)
    assert exchange(d.address, [3]) == [b"ACK 3 ok"]
    assert srv.connections == 1  # the same upstream connection served both


def test_client_leaving_with_answers_owed_after_linger_does_not_return_its_connection(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2, linger=0.2)
    srv.release.clear()
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert wait_until(lambda: len(srv.received) == 8)
    c.close()  # gone, its answer still owed
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    assert pool_of(d).open_count == 0 and pool_of(d).idle_count == 0
    assert wait_until(lambda: peer_closed(srv.sockets[0]))
    srv.release.set()  # the late answer must not reach the next client
    assert exchange(d.address, [2]) == [b"ACK 2 ok"]
    assert srv.connections == 2


def test_client_reset_with_answers_owed_closes_its_upstream(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2, linger=30)
    srv.release.clear()
    c = connect(d.address)
    c.sendall(b"REQ 1 a\nREQ 2 b\n")
    assert wait_until(lambda: len(srv.received) == 16)
    c.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    assert pool_of(d).open_count == 0
    srv.release.set()
    assert exchange(d.address, [3]) == [b"ACK 3 ok"]
    assert srv.connections == 2


def test_half_line_at_eof_is_not_reused(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\nREQ 2 unfinish")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    c.close()  # the server keeps "REQ 2 unfinish" buffered: that connection is out of step
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    assert pool_of(d).open_count == 0
    assert exchange(d.address, [3]) == [b"ACK 3 ok"]
    assert srv.connections == 2


def _one_idle_connection(srv, d) -> None:
    assert exchange(d.address, [1]) == [b"ACK 1 ok"]
    assert wait_until(lambda: idle_session_done(d) and pool_of(d).idle_count == 1)


def test_server_closing_a_pooled_connection_gets_the_next_client_a_fresh_one(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2)
    _one_idle_connection(srv, d)
    idle_sock = pool_of(d)._idle[-1][0]
    srv.sockets[0].close()  # FIN to the idle pooled connection
    assert wait_until(lambda: readable(idle_sock))
    assert exchange(d.address, [2]) == [b"ACK 2 ok"]
    assert srv.connections == 2
    assert wait_until(lambda: idle_session_done(d))
    assert pool_of(d).open_count == 1


def test_server_resetting_a_pooled_connection(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2)
    _one_idle_connection(srv, d)
    idle_sock = pool_of(d)._idle[-1][0]
    s = srv.sockets[0]
    s.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    assert wait_until(lambda: readable(idle_sock))
    assert exchange(d.address, [2]) == [b"ACK 2 ok"]
    assert srv.connections == 2


def test_stray_bytes_on_a_pooled_connection_never_reach_a_client(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2)
    _one_idle_connection(srv, d)
    idle_sock = pool_of(d)._idle[-1][0]
    srv.sockets[0].sendall(b"ACK 99 stray\n")
    assert wait_until(lambda: readable(idle_sock))
    assert exchange(d.address, [2]) == [b"ACK 2 ok"]
    assert srv.connections == 2
    assert totals(d)["msg_ack"] == 2  # the stray line was never forwarded or counted


def test_exhausted_pool_closes_the_client_promptly_and_keeps_serving(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=1, pool_wait=0.2)
    holder = connect(d.address)
    holder.sendall(b"REQ 1 a\n")
    assert read_lines(holder, 1) == [b"ACK 1 ok"]
    t0 = time.monotonic()
    late = connect(d.address)
    late.sendall(b"REQ 2 b\n")
    assert closed_by_proxy(late)
    assert 0.15 <= time.monotonic() - t0 < 2
    assert wait_until(lambda: totals(d)["upstream_errors"] == 1)
    assert srv.connections == 1 and b"REQ 2" not in srv.received
    holder.sendall(b"REQ 3 c\n")  # the session holding the connection is untouched
    assert read_lines(holder, 1) == [b"ACK 3 ok"]
    holder.close()
    assert wait_until(lambda: idle_session_done(d))
    assert exchange(d.address, [4]) == [b"ACK 4 ok"]
    assert srv.connections == 1


def test_waiting_client_gets_the_connection_another_one_releases(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=1, pool_wait=10)
    first = connect(d.address)
    first.sendall(b"REQ 1 a\n")
    assert read_lines(first, 1) == [b"ACK 1 ok"]
    second = connect(d.address)
    second.sendall(b"REQ 2 b\n")
    assert wait_until(lambda: pool_of(d).waiting == 1)
    first.close()
    assert read_lines(second, 1) == [b"ACK 2 ok"]
    assert srv.connections == 1 and totals(d)["upstream_errors"] == 0


def test_idle_pooled_connections_expire(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2, pool_idle=0.2)
    _one_idle_connection(srv, d)
    assert wait_until(lambda: totals(d)["pool_open"] == 0)
    assert totals(d)["pool_idle"] == 0
    assert wait_until(lambda: peer_closed(srv.sockets[0]))
    assert exchange(d.address, [2]) == [b"ACK 2 ok"]
    assert srv.connections == 2


def test_idle_timeout_session_does_not_return_its_connection(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=2, idle_timeout=0.2)
    c = connect(d.address)
    c.sendall(b"REQ 1 a\n")
    assert read_lines(c, 1) == [b"ACK 1 ok"]
    assert closed_by_proxy(c)
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    assert pool_of(d).open_count == 0


def test_upstream_down_frees_pool_slots(mini_server, proxy_for):
    probe = _stdsocket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    from fooproxy.config import Address

    d = proxy_for(Address("127.0.0.1", port), pool_size=1, pool_wait=5)
    for _ in range(3):  # each fails at once, none waits for a slot the last one held
        t0 = time.monotonic()
        assert closed_by_proxy(connect(d.address))
        assert time.monotonic() - t0 < 2
    assert wait_until(lambda: totals(d)["upstream_errors"] == 3)
    assert totals(d)["pool_open"] == 0


def test_drain_closes_pooled_idle_connections(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=3, grace=5)
    jobs = [gevent.spawn(exchange, d.address, [k]) for k in range(3)]
    gevent.joinall(jobs, raise_error=True)
    assert wait_until(lambda: idle_session_done(d))
    n = pool_of(d).idle_count
    assert n >= 1
    busy = connect(d.address)  # a session still open when the drain starts
    busy.sendall(b"REQ 9 z\n")
    assert read_lines(busy, 1) == [b"ACK 9 ok"]
    stopper = gevent.spawn(d.shutdown)
    assert wait_until(lambda: d.draining)
    busy.close()  # ends cleanly during the drain: back to the pool, then closed with it
    stopper.get(timeout=5)
    assert pool_of(d).open_count == 0 and pool_of(d).idle_count == 0
    assert (totals(d)["pool_open"], totals(d)["pool_idle"]) == (0, 0)
    assert wait_until(lambda: all(peer_closed(s) for s in srv.sockets))


def test_drain_kills_clients_waiting_for_a_connection(mini_server, proxy_for):
    srv = mini_server()
    d = proxy_for(srv.address, pool_size=1, pool_wait=30, grace=0.2)
    holder = connect(d.address)
    holder.sendall(b"REQ 1 a\n")
    assert read_lines(holder, 1) == [b"ACK 1 ok"]
    waiter = connect(d.address)
    assert wait_until(lambda: pool_of(d).waiting == 1)
    d.shutdown()
    assert closed_by_proxy(waiter) and closed_by_proxy(holder)
    assert pool_of(d).waiting == 0 and pool_of(d).open_count == 0

"""UpstreamPool, all in one place: on its own against a bare loopback listener
(reuse, bounds, health checks, expiry, FIFO waiters), then through the proxy
with -pool-size (reuse, bounds, drain). Gevent sockets, port 0.
"""

from __future__ import annotations

import select
import socket as _stdsocket
import struct
import time

import gevent
import gevent.pool
import pytest
from conftest import closed_by_proxy
from gevent import socket
from gevent.event import Event
from gevent.server import StreamServer
from hypothesis import given, settings
from hypothesis import strategies as st

from fooproxy.config import Address
from fooproxy.pool import PoolExhausted, UpstreamPool, healthy
from fooproxy.upstream import UpstreamError
from tests.helpers import connect, read_lines, totals, wait_until


class Holder:
    """Accepts connections and keeps them open (server side) until stopped."""

    def __init__(self) -> None:
        self.sockets: list = []
        self._stop = Event()
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.server.server_port)

    def _handle(self, sock, _addr) -> None:
        self.sockets.append(sock)
        self._stop.wait()

    def wait_for(self, n: int) -> None:
        assert wait_until(lambda: len(self.sockets) >= n), "only %d of %d connections" % (len(self.sockets), n)

    def stop(self) -> None:
        self._stop.set()
        self.server.stop(timeout=1)


@pytest.fixture
def holder():
    h = Holder()
    yield h
    h.stop()


@pytest.fixture
def pools():
    made: list[UpstreamPool] = []

    def make(address: Address, **kw) -> UpstreamPool:
        kw.setdefault("size", 2)
        kw.setdefault("wait", 1.0)
        p = UpstreamPool(address, 1.0, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_reuses_newest_idle_first(holder, pools):
    pool = pools(holder.address)
    a, b = pool.acquire(), pool.acquire()
    assert pool.open_count == 2 and pool.idle_count == 0
    pool.release(a, True)
    pool.release(b, True)
    assert pool.idle_count == 2
    assert pool.acquire() is b  # LIFO: the warmest connection
    assert pool.acquire() is a
    holder.wait_for(2)
    assert len(holder.sockets) == 2


def test_release_not_reusable_closes_and_frees_the_slot(holder, pools):
    pool = pools(holder.address, size=1)
    a = pool.acquire()
    pool.release(a, False)
    assert a.fileno() == -1
    assert pool.open_count == 0 and pool.idle_count == 0
    b = pool.acquire()
    assert b is not a and pool.open_count == 1


def test_full_pool_waits_then_raises(holder, pools):
    pool = pools(holder.address, size=2, wait=0.1)
    pool.acquire(), pool.acquire()
    t0 = time.monotonic()
    with pytest.raises(PoolExhausted, match=r"no upstream connection free within 0.1s \(pool of 2 busy\)"):
        pool.acquire()
    assert 0.09 <= time.monotonic() - t0 < 2
    assert pool.open_count == 2 and pool.waiting == 0


def test_zero_wait_fails_at_once(holder, pools):
    pool = pools(holder.address, size=1, wait=0)
    pool.acquire()
    with pytest.raises(PoolExhausted):
        pool.acquire()


def test_waiters_are_served_in_arrival_order_with_the_released_connection(holder, pools):
    pool = pools(holder.address, size=1, wait=5)
    first = pool.acquire()
    order: list[int] = []

    def client(k: int) -> None:
        sock = pool.acquire()
        order.append(k)
        assert sock is first  # handed over, not redialled
        gevent.sleep(0.001)
        pool.release(sock, True)

    jobs = []
    for k in range(4):
        jobs.append(gevent.spawn(client, k))
        gevent.sleep(0)  # queue them in this order
    assert wait_until(lambda: pool.waiting == 4)
    # A newcomer must not overtake the queue even when a connection is idle for an instant.
    pool.release(first, True)
    gevent.joinall(jobs, raise_error=True)
    assert order == [0, 1, 2, 3]
    assert len(holder.sockets) == 1 and pool.open_count == 1 and pool.idle_count == 1


def test_freed_slot_goes_to_the_waiter_which_dials(holder, pools):
    pool = pools(holder.address, size=1, wait=5)
    a = pool.acquire()
    waiter = gevent.spawn(pool.acquire)
    assert wait_until(lambda: pool.waiting == 1)
    pool.release(a, False)
    b = waiter.get(timeout=5)
    assert b is not a and pool.open_count == 1
    holder.wait_for(2)


def test_idle_connection_closed_by_server_is_never_handed_out(holder, pools):
    pool = pools(holder.address, size=2)
    a = pool.acquire()
    pool.release(a, True)
    holder.wait_for(1)
    holder.sockets[0].close()  # FIN reaches the idle socket
    assert wait_until(lambda: readable(a))
    b = pool.acquire()
    assert b is not a and a.fileno() == -1
    assert healthy(b)
    assert pool.open_count == 1


def test_health_check_sees_eof_reset_and_stray_bytes(holder):
    socks = [socket.create_connection(("127.0.0.1", holder.address.port)) for _ in range(4)]
    holder.wait_for(4)
    quiet, eof, reset, stray = socks
    quiet.settimeout(7.0)
    assert healthy(quiet)
    assert quiet.gettimeout() == 7.0  # the caller's timeout is restored
    by_client = {s.getsockname(): s for s in socks}
    server = {by_client[s.getpeername()]: s for s in holder.sockets}
    server[eof].close()
    rst = server[reset]
    rst.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    rst.close()
    server[stray].sendall(b"ACK 9 late\n")
    assert wait_until(lambda: readable(eof) and readable(reset) and readable(stray))
    assert not healthy(eof)
    assert not healthy(reset)
    assert not healthy(stray)
    assert healthy(quiet)
    for s in socks:
        s.close()
    assert not healthy(quiet)  # a closed socket is not healthy either


def test_lazy_expiry_at_acquire(holder, pools):
    now = [1000.0]
    pool = pools(holder.address, idle=60, clock=lambda: now[0])
    a = pool.acquire()
    pool.release(a, True)
    now[0] += 59.9
    assert pool.acquire() is a
    pool.release(a, True)
    now[0] += 60
    b = pool.acquire()
    assert b is not a and a.fileno() == -1
    assert pool.open_count == 1 and pool.idle_count == 0


def test_reaper_expires_idle_connections_and_stops(holder, pools):
    seen: list[tuple[int, int]] = []
    pool = pools(holder.address, idle=0.1, on_change=lambda i, o: seen.append((i, o)))
    a = pool.acquire()
    pool.release(a, True)
    assert pool.idle_count == 1
    assert wait_until(lambda: pool.idle_count == 0)
    assert a.fileno() == -1 and pool.open_count == 0
    assert wait_until(lambda: not pool._reaper.active)  # nothing idle: no more ticks
    assert seen == [(0, 1), (1, 1), (0, 0)]


def test_reaper_drops_connections_the_server_closed(holder, pools):
    now = [0.0]
    pool = pools(holder.address, idle=0.1, clock=lambda: now[0])  # the fake clock never expires them
    a = pool.acquire()
    pool.release(a, True)
    holder.wait_for(1)
    holder.sockets[0].close()
    assert wait_until(lambda: pool.idle_count == 0)
    assert a.fileno() == -1 and pool.open_count == 0


def test_close_closes_idle_fails_waiters_and_later_releases(holder, pools):
    pool = pools(holder.address, size=2, wait=5)
    a, b = pool.acquire(), pool.acquire()
    pool.release(a, True)
    c = pool.acquire()  # a again
    waiter = gevent.spawn(pool.acquire)
    assert wait_until(lambda: pool.waiting == 1)
    pool.release(c, True)  # handed to the waiter
    waiter.get(timeout=5)
    waiter2 = gevent.spawn(pool.acquire)
    assert wait_until(lambda: pool.waiting == 1)
    pool.close()
    with pytest.raises(UpstreamError, match="closed") as info:
        waiter2.get(timeout=5)
    assert not isinstance(info.value, PoolExhausted)
    pool.release(b, True)  # in use at close: closed on release
    pool.release(c, True)
    assert b.fileno() == -1 and c.fileno() == -1
    assert pool.open_count == 0 and pool.idle_count == 0
    with pytest.raises(UpstreamError):
        pool.acquire()


def test_failed_dial_frees_its_slot():
    probe = _stdsocket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there
    pool = UpstreamPool(Address("127.0.0.1", port), 1.0, size=1, wait=0)
    try:
        for _ in range(3):
            with pytest.raises(UpstreamError, match="cannot connect"):
                pool.acquire()
            assert pool.open_count == 0
    finally:
        pool.close()


def test_killed_waiter_leaves_no_trace(holder, pools):
    pool = pools(holder.address, size=1, wait=5)
    a = pool.acquire()
    waiter = gevent.spawn(pool.acquire)
    assert wait_until(lambda: pool.waiting == 1)
    waiter.kill()
    assert pool.waiting == 0
    pool.release(a, True)
    assert pool.idle_count == 1 and pool.open_count == 1


def test_waiter_killed_after_handover_gives_the_connection_back(holder, pools):
    pool = pools(holder.address, size=1, wait=5)
    a = pool.acquire()
    waiter = gevent.spawn(pool.acquire)
    assert wait_until(lambda: pool.waiting == 1)
    # The kill is scheduled first, so it lands after the handover but before the waiter runs.
    waiter.kill(block=False)
    pool.release(a, True)
    waiter.join(timeout=5)
    assert isinstance(waiter.value, gevent.GreenletExit)  # killed, not served
    assert pool.idle_count == 1 and pool.open_count == 1
    assert pool.acquire() is a


def test_waiter_killed_after_slot_handover_frees_it(holder, pools):
    pool = pools(holder.address, size=1, wait=5)
    a = pool.acquire()
    waiter = gevent.spawn(pool.acquire)
    assert wait_until(lambda: pool.waiting == 1)
    waiter.kill(block=False)
    pool.release(a, False)  # the slot is handed over, then the kill lands
    waiter.join(timeout=5)
    assert isinstance(waiter.value, gevent.GreenletExit)  # killed, not served
    assert pool.open_count == 0 and pool.waiting == 0


OPS = st.lists(st.sampled_from(["acquire", "keep", "drop", "server_close"]), max_size=25)


@settings(max_examples=40, deadline=None)
@given(ops=OPS)
def test_counts_stay_consistent(ops):
    """Whatever happens, open = idle + in use <= size, and nothing dead is handed out."""
    h = Holder()
    pool = UpstreamPool(h.address, 1.0, size=3, wait=0)
    used: list = []
    try:
        for op in ops:
            if op == "acquire":
                try:
                    sock = pool.acquire()
                except PoolExhausted:
                    assert len(used) == 3
                    continue
                assert healthy(sock)
                used.append(sock)
            elif op in ("keep", "drop") and used:
                pool.release(used.pop(0), op == "keep")
            elif op == "server_close" and h.sockets:
                h.sockets.pop(0).close()  # may hit an idle or an in-use connection
                gevent.sleep(0.001)
            assert pool.open_count == pool.idle_count + len(used) <= 3
    finally:
        pool.close()
        for s in used:
            s.close()
        h.stop()


# --- through the proxy: -pool-size ----------------------------------------------


def pool_of(d) -> UpstreamPool:
    """The pool of the proxy's one upstream (the Balancer keeps a pool per upstream)."""
    (upstream,) = d.connector.upstreams
    assert isinstance(upstream.connector, UpstreamPool)
    return upstream.connector


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


def test_closing_the_pool_stops_a_re_resolve_in_progress():
    """A refused connect starts a background lookup; the pool's close must end it, like the Connector's."""
    probe = _stdsocket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there
    pool = UpstreamPool(Address("127.0.0.1", port), 1.0, size=1, wait=0.05)
    with pytest.raises(UpstreamError, match="refused"):
        pool.acquire()
    refresh = pool._refresh
    assert refresh is not None and not refresh.dead  # scheduled, not run yet
    pool.close()
    assert pool._refresh is None and refresh.dead

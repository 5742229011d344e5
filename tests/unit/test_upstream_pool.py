"""UpstreamPool on its own, against a bare loopback listener (gevent sockets, port 0)."""

from __future__ import annotations

import socket as _stdsocket
import struct
import time

import gevent
import pytest
from gevent import socket
from gevent.event import Event
from gevent.server import StreamServer
from hypothesis import given, settings
from hypothesis import strategies as st

from fooproxy.config import Address
from fooproxy.pool import PoolExhausted, UpstreamPool, healthy
from fooproxy.upstream import UpstreamError
from tests.helpers import wait_until


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


def readable(sock) -> bool:
    """The kernel has something for ``sock`` (data or EOF); checked without gevent."""
    import select

    return bool(select.select([sock.fileno()], [], [], 0)[0])


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

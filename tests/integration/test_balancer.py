"""Several upstreams, in process: policies, failover, passive detection, panic, reload, per-upstream stats.

Real sockets on loopback: in-test Foo servers (``MiniServer``), the Dispatcher
on port 0, gevent clients. A "dead" upstream is a port nobody listens on
(connects are refused at once).
"""

from __future__ import annotations

import socket as _stdsocket

import pytest
from gevent.server import StreamServer

from fooproxy.balancer import Balancer
from fooproxy.config import Address, Config
from fooproxy.health import Health
from fooproxy.stats import Snapshot, Stats
from tests.helpers import connect, read_lines, totals, wait_until
from tests.integration.conftest import MiniServer, closed_by_proxy


def dead_port() -> Address:
    """A loopback port that refuses connections (bound once, then closed)."""
    s = _stdsocket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return Address("127.0.0.1", port)


def server_on(address: Address) -> MiniServer:
    """A MiniServer on a given port (an upstream that comes back where it was)."""
    srv = MiniServer()
    srv.server = StreamServer((address.host, address.port), srv.handle)
    return srv.start()


def session(proxy_address, seq: int = 1) -> list[bytes]:
    """One short session: a REQ, its answer, close ([] if the proxy closed the client)."""
    c = connect(proxy_address)
    try:
        c.sendall(b"REQ %d x\n" % seq)
        return [line for line in read_lines(c, 1) if line]
    except ConnectionResetError:
        return []
    finally:
        c.close()


def upstreams(d) -> dict:
    return totals(d).get("upstreams", {})


def sessions_seen(d, *servers: MiniServer) -> tuple[int, ...]:
    """The connections each server got from sessions: minus those of the health checks."""
    checks = {u.name: (u.checker.checks if u.checker else 0) for u in d.connector.upstreams}
    return tuple(s.connections - checks.get(str(s.address), 0) for s in servers)


def quiet_checks(d) -> None:
    """Wait for the first health check of each upstream (the next is an hour away)."""
    assert wait_until(lambda: all(u.checker is None or u.checker.checks for u in d.connector.upstreams))


def test_roundrobin_spreads_sessions_evenly(mini_server, proxy_for):
    servers = [mini_server() for _ in range(3)]
    d = proxy_for(tuple(s.address for s in servers), health_interval=3600)
    quiet_checks(d)
    for i in range(30):
        assert session(d.address, i) == [b"ACK %d ok" % i]
    assert wait_until(lambda: totals(d)["connections_active"] == 0)
    assert sessions_seen(d, *servers) == (10, 10, 10)
    rows = upstreams(d)
    assert [rows[str(s.address)]["sessions_total"] for s in servers] == [10, 10, 10]
    assert [rows[str(s.address)]["messages"] for s in servers] == [20, 20, 20]  # REQ + ACK each
    assert all(row["up"] and row["sessions_active"] == 0 for row in rows.values())


def test_leastconn_sends_new_sessions_to_the_least_busy(mini_server, proxy_for):
    a, b = mini_server(), mini_server()
    d = proxy_for((a.address, b.address), balance="leastconn", health_interval=3600)
    quiet_checks(d)
    held = [connect(d.address) for _ in range(4)]
    for i, c in enumerate(held):
        c.sendall(b"REQ %d x\n" % i)
        assert read_lines(c, 1) == [b"ACK %d ok" % i]
    assert sessions_seen(d, a, b) == (2, 2)
    on_a = [c for c in held if _upstream_port(d, c) == a.address.port]
    for c in on_a:  # a is now idle, b still has two
        c.close()
    assert wait_until(lambda: upstreams(d)[str(a.address)]["sessions_active"] == 0)
    for _ in range(2):
        held.append(connect(d.address))
        held[-1].sendall(b"REQ 9 x\n")
        assert read_lines(held[-1], 1) == [b"ACK 9 ok"]
    assert sessions_seen(d, a, b) == (4, 2)
    for c in held:
        c.close()


def _upstream_port(d, client) -> int:
    """Which upstream port the proxy session of ``client`` is on."""
    mine = client.getsockname()
    for bus in d.proxy.sessions:
        if bus.client.getpeername()[:2] == mine[:2]:
            return bus.upstream.getpeername()[1]
    raise AssertionError("no session for %r" % (mine,))


def test_first_is_failover_in_the_order_given(mini_server, proxy_for):
    a, b = mini_server(), mini_server()
    d = proxy_for((a.address, b.address), balance="first", health_interval=0.2)
    for i in range(5):
        assert session(d.address, i) == [b"ACK %d ok" % i]
    assert upstreams(d)[str(a.address)]["sessions_total"] == 5
    assert upstreams(d)[str(b.address)]["sessions_total"] == 0
    port = a.address
    a.stop()
    for i in range(5):  # a refuses now: each client is retried on b, none sees a failure
        assert session(d.address, i) == [b"ACK %d ok" % i]
    assert upstreams(d)[str(b.address)]["sessions_total"] == 5
    assert totals(d)["upstream_errors"] == 0
    assert upstreams(d)[str(port)]["up"] is False  # passive detection: 2 refused connects
    back = server_on(port)
    try:
        # The next health check that passes (two upstreams: each is checked every
        # -health-interval) puts it back in rotation, and `first` prefers it again.
        assert wait_until(lambda: upstreams(d)[str(port)]["up"], timeout=10)
        assert session(d.address, 7) == [b"ACK 7 ok"]
        assert upstreams(d)[str(port)]["sessions_total"] == 6
        assert upstreams(d)[str(b.address)]["sessions_total"] == 5
    finally:
        back.stop()


@pytest.mark.parametrize("retries", [1, 0])
def test_a_refused_connect_is_retried_on_the_next_upstream(mini_server, proxy_for, retries):
    """With ``-connect-retries 0`` (the broken variant) the clients sent to the dead upstream fail."""
    good, dead = mini_server(), dead_port()
    d = proxy_for((dead, good.address), connect_retries=retries, max_fails=1000, health_interval=3600)
    quiet_checks(d)
    answers = [session(d.address, i) for i in range(10)]
    ok = sum(a == [b"ACK %d ok" % i] for i, a in enumerate(answers))
    if retries:
        assert ok == 10 and totals(d)["upstream_errors"] == 0
        assert sessions_seen(d, good) == (10,)
    else:
        assert ok == 5 and totals(d)["upstream_errors"] == 5


def test_passive_detection_takes_a_refusing_upstream_out(mini_server, proxy_for):
    good, dead = mini_server(), dead_port()
    d = proxy_for((dead, good.address), max_fails=2, health_interval=3600)
    quiet_checks(d)
    for i in range(12):
        assert session(d.address, i) == [b"ACK %d ok" % i]
    # Two failed connects took it out; after that no client tries it any more.
    assert sessions_seen(d, good) == (12,)
    assert upstreams(d)[str(dead)]["up"] is False
    assert upstreams(d)[str(dead)]["sessions_total"] == 0
    (out,) = [u for u in d.connector.upstreams if u.name == str(dead)]
    assert out.fails == 2 and out.state == "down"


def test_all_down_clients_closed_at_once_then_a_returning_one_is_used(proxy_for):
    a, b = dead_port(), dead_port()
    d = proxy_for((a, b), health_interval=3600)  # no check will notice: only "panic" can
    for _ in range(4):
        c = connect(d.address)
        assert closed_by_proxy(c, timeout=2)
        c.close()
    assert wait_until(lambda: totals(d)["upstream_errors"] == 4)
    assert not any(row["up"] for row in upstreams(d).values())
    ok, detail = Health(upstreams=d.connector)()
    assert not ok and "no upstream up" in detail["reason"]
    back = server_on(b)
    try:
        assert session(d.address, 5) == [b"ACK 5 ok"]  # tried although marked down: used at once
        assert upstreams(d)[str(b)]["up"] is True  # a connect that succeeds puts it back
        assert totals(d)["upstream_errors"] == 4
    finally:
        back.stop()


def test_a_session_stays_on_its_upstream(mini_server, proxy_for):
    a, b = mini_server(), mini_server()
    d = proxy_for((a.address, b.address), health_interval=3600)
    quiet_checks(d)
    c = connect(d.address)
    for i in range(20):
        c.sendall(b"REQ %d x\n" % i)
        assert read_lines(c, 1) == [b"ACK %d ok" % i]
    c.close()
    assert sum(sessions_seen(d, a, b)) == 1


def test_a_pool_per_upstream(mini_server, proxy_for):
    a, b = mini_server(), mini_server()
    d = proxy_for((a.address, b.address), pool_size=2, health_interval=3600)
    quiet_checks(d)
    for i in range(8):
        assert session(d.address, i) == [b"ACK %d ok" % i]
    # Each upstream's pool reuses its connection: one per server, two open in all.
    assert sessions_seen(d, a, b) == (1, 1)
    assert wait_until(lambda: (totals(d)["pool_open"], totals(d)["pool_idle"]) == (2, 2))
    assert upstreams(d)[str(a.address)]["sessions_total"] == 4


def test_reload_adds_and_removes_upstreams_open_sessions_finish(mini_server, proxy_for):
    a, b, c = mini_server(), mini_server(), mini_server()
    d = proxy_for((a.address, b.address), health_interval=3600)
    quiet_checks(d)
    held = [connect(d.address) for _ in range(2)]
    for i, s in enumerate(held):
        s.sendall(b"REQ %d x\n" % i)
        assert read_lines(s, 1) == [b"ACK %d ok" % i]
    assert sessions_seen(d, a, b) == (1, 1)
    notes = d.connector.update(Config(listen=d.config.listen, forward=(b.address, c.address), health_interval=3600))
    assert any("%s removed" % a.address in n for n in notes), notes
    rows = upstreams(d)
    assert rows[str(a.address)]["removed"] and rows[str(a.address)]["sessions_active"] == 1
    for i in range(6):
        assert session(d.address, 10 + i) == [b"ACK %d ok" % (10 + i)]
    rows = upstreams(d)
    assert rows[str(a.address)]["sessions_total"] == 1
    assert rows[str(b.address)]["sessions_total"] + rows[str(c.address)]["sessions_total"] == 7
    for i, s in enumerate(held):  # the session on a still works, and so does the one on b
        s.sendall(b"REQ %d y\n" % (20 + i))
        assert read_lines(s, 1) == [b"ACK %d ok" % (20 + i)]
        s.close()
    assert wait_until(lambda: str(a.address) not in upstreams(d))  # gone once its last session ended
    assert set(upstreams(d)) == {str(b.address), str(c.address)}


def test_per_upstream_counts_merge_across_blocks_by_address():
    """What the master of ``-workers`` does: each worker's block, summed by address."""
    one, two = Stats(), Stats()
    cfg = Config(forward=(Address("127.0.0.1", 1), Address("127.0.0.1", 2)))
    for stats, order in ((one, cfg.forward), (two, cfg.forward[::-1])):  # entries in another order
        Balancer(Config(forward=order), stats, checks=False)
    e1, e2 = one.upstream_entry("127.0.0.1:1"), two.upstream_entry("127.0.0.1:1")
    assert (e1, e2) == (0, 1)
    one.add_upstream(e1, "sessions_total", 3)
    two.add_upstream(e2, "sessions_total", 4)
    two.record(True, 10, (2, 1, 0, 5), None, b"", two.messages_cell(e2))  # invalid lines are not messages
    snap = Snapshot.from_blocks([one.block, two.block], 0.0, 0.0)
    row = snap.as_dict()["upstreams"]["127.0.0.1:1"]
    assert row == {"up": True, "sessions_active": 0, "sessions_total": 7, "messages": 3}
    assert snap.totals["msg_req"] == 2  # the plain counters still count


def test_an_upstream_removed_then_added_again_shares_its_entry(mini_server, proxy_for):
    a, b = mini_server(), mini_server()
    d = proxy_for((a.address, b.address), balance="first", health_interval=3600)
    held = connect(d.address)
    held.sendall(b"REQ 1 x\n")
    assert read_lines(held, 1) == [b"ACK 1 ok"]  # on a (first)
    d.connector.update(Config(listen=d.config.listen, forward=(b.address,), health_interval=3600, balance="first"))
    assert upstreams(d)[str(a.address)]["removed"]
    d.connector.update(Config(listen=d.config.listen, forward=(a.address, b.address), health_interval=3600,
                              balance="first"))  # fmt: skip
    assert session(d.address, 2) == [b"ACK 2 ok"]  # on the new a
    assert wait_until(lambda: upstreams(d)[str(a.address)]["sessions_active"] == 1)  # that one has ended
    row = upstreams(d)[str(a.address)]
    assert row == {"up": True, "sessions_active": 1, "sessions_total": 2, "messages": 4}
    held.close()  # the old a's session ends: the entry it shares stays up
    assert wait_until(lambda: upstreams(d)[str(a.address)]["sessions_active"] == 0)
    assert upstreams(d)[str(a.address)]["up"] is True

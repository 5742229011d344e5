"""A bug of ours that ends sessions: counted in ``errors_internal``, and /health says so while it lasts.

The bug is planted: a Stats whose ``record`` raises on every chunk that
carries a line (nothing a peer can do reaches it; that is what makes it a bug
of ours). Each session it hits must end, its client must be closed and not
left hanging, the count must show in /stats and /metrics, and /health must
turn ``degraded`` (still 200: the proxy serves) while the count rises.
"""

from __future__ import annotations

import http.client
import json
import logging

import gevent
from prometheus_client.parser import text_string_to_metric_families

from fooproxy.config import Address, Config
from fooproxy.dispatcher import Dispatcher
from fooproxy.health import InternalErrors
from fooproxy.stats import Stats
from tests.helpers import connect, recv_until_eof, wait_until


class BuggyStats(Stats):
    """Raises in the hot path while ``broken`` (a planted bug, not a peer's doing)."""

    broken = True

    def record(self, to_server, nbytes, counts, *timing) -> None:
        if self.broken and any(counts):
            raise RuntimeError("planted bug")
        super().record(to_server, nbytes, counts, *timing)


def fetch(port: int, path: str) -> tuple[int, bytes]:
    def run():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    return gevent.get_hub().threadpool.apply(run)


def test_sessions_ended_by_a_bug_are_counted_and_degrade_health(mini_server, caplog):
    srv = mini_server()
    stats = BuggyStats()
    cfg = Config(listen=Address("127.0.0.1", 0), forward=srv.address, http=Address("127.0.0.1", 0),
                 recovery_path=None, grace=0.5, health_interval=0.2)  # fmt: skip
    d = Dispatcher(cfg, stats)
    d.start()
    try:
        port = d.services.http.address.port
        status, body = fetch(port, "/health")
        assert status == 200 and json.loads(body)["status"] == "ok", body
        with caplog.at_level(logging.ERROR, logger="fooproxy"):
            for seq in range(3):
                with connect(d.address, timeout=5) as c:
                    c.sendall(b"REQ %d x\n" % seq)
                    assert recv_until_eof(c, timeout=5) == b""  # closed by the proxy, not left hanging
        assert wait_until(lambda: stats.get("errors_internal") == 3 and stats.get("connections_active") == 0)
        assert sum("session failed" in r.getMessage() for r in caplog.records) == 3
        status, body = fetch(port, "/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "degraded", health
        assert health["internal_errors"].startswith("rising: 3 "), health
        status, body = fetch(port, "/stats")
        assert json.loads(body)["errors_internal"] == 3
        status, body = fetch(port, "/metrics")
        [family] = [f for f in text_string_to_metric_families(body.decode()) if f.name == "fooproxy_errors_internal"]
        assert family.samples[0].value == 3
        # The bug is gone: sessions work again (the verdict stays degraded for the window, tested below).
        stats.broken = False
        with connect(d.address, timeout=5) as c:
            c.sendall(b"REQ 9 x\n")
            assert c.recv(100) == b"ACK 9 ok\n"
        assert stats.get("errors_internal") == 3
    finally:
        d.shutdown()


def test_the_verdict_is_rising_only_within_the_window_after_an_increase():
    now = [100.0]
    count = [7]  # restored from a file: history, not a rise
    watch = InternalErrors(lambda: count[0], window=60, clock=lambda: now[0])
    assert watch.rising() == (False, 0)
    count[0] = 9
    now[0] += 1
    assert watch.rising() == (True, 2)
    now[0] += 59.5
    assert watch.rising() == (True, 2)
    now[0] += 1
    assert watch.rising()[0] is False
    count[0] = 10
    assert watch.rising() == (True, 1)  # a new rise, counted afresh

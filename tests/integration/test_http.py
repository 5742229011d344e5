"""The HTTP endpoint on a real port: /health, /stats, /metrics, errors, drain and stop.

Requests run in gevent's threadpool (``http.client`` is blocking stdlib code:
called from the test greenlet it would freeze the hub the server runs on), or
over gevent sockets when the test needs the raw connection.
"""

from __future__ import annotations

import http.client
import json
import logging

import gevent
import pytest
from gevent import socket
from prometheus_client.parser import text_string_to_metric_families

from fooproxy.config import Address
from fooproxy.http import HttpServer, StartupError, make_app
from fooproxy.protocol import Counts
from fooproxy.stats import Stats


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Fixture:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.stats = Stats(clock=self.clock)
        self.health = (True, {"upstream": "reachable"})
        self.extra = {"upstream_up": 1.0}
        app = make_app(self.stats.snapshot, self.get_health, get_extra=lambda: self.extra)
        self.server = HttpServer(Address("127.0.0.1", 0), app)

    def get_health(self):
        if isinstance(self.health, Exception):
            raise self.health
        return self.health

    def fetch(self, path: str, method: str = "GET", headers: dict | None = None):
        """``(status, headers, body)`` of one request, run off the hub."""
        port = self.server.address.port

        def run():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request(method, path, headers=headers or {})
                resp = conn.getresponse()
                return resp.status, resp.msg, resp.read()
            finally:
                conn.close()

        return gevent.get_hub().threadpool.apply(run)


@pytest.fixture
def srv():
    f = Fixture()
    f.server.start()
    yield f
    f.server.stop(timeout=0.5)


def feed(stats: Stats, clock: FakeClock) -> None:
    stats.connection_opened()
    stats.connection_opened()
    stats.connection_closed()
    stats.set("pool_idle", 2)
    stats.set("pool_open", 5)
    stats.upstream_error()
    clock.t = 1000.0
    stats.record(True, 100, Counts(req=20))  # 10 s window only
    clock.t = 1009.5
    stats.record(True, 50, Counts(req=10))  # both windows
    stats.record(False, 300, Counts(ack=25, nak=5))
    stats.record(True, 7, Counts(invalid=3))
    stats.answered(0.0052, 20, 0)  # in (5 ms, 6.3 ms]
    stats.answered(0.0520, 0, 5)  # in (50 ms, 63 ms]
    stats.upstream_connected(0.0003)
    clock.t = 1009.9


def test_binds_port_zero_and_reports_bound_address(srv):
    assert srv.server.address.host == "127.0.0.1" and srv.server.address.port > 0


@pytest.mark.parametrize("path", ["/health", "/status", "/heartbeat"])
def test_health_ok(srv, path):
    status, headers, body = srv.fetch(path)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    assert json.loads(body) == {"status": "ok", "upstream": "reachable"}


def test_health_unavailable_is_503_with_reason(srv):
    srv.health = (False, {"reason": "upstream 127.0.0.1:8001 unreachable", "upstream": "unreachable"})
    status, _, body = srv.fetch("/health")
    assert status == 503
    doc = json.loads(body)
    assert doc["status"] == "unavailable" and doc["reason"] == "upstream 127.0.0.1:8001 unreachable"

    srv.health = (False, {})  # a reason is always present
    status, _, body = srv.fetch("/health")
    assert status == 503 and json.loads(body)["reason"]


def test_health_degraded_stays_200(srv):
    srv.health = (True, {"status": "degraded", "persistence": "failing: disk full"})
    status, _, body = srv.fetch("/health")
    assert status == 200 and json.loads(body)["status"] == "degraded"


def test_stats_is_the_sigusr2_json(srv):
    feed(srv.stats, srv.clock)
    status, headers, body = srv.fetch("/stats")
    assert status == 200 and headers["Content-Type"] == "application/json"
    # Byte for byte what SIGUSR2 prints (the fake clock has not moved).
    assert body == json.dumps(srv.stats.snapshot().as_dict()).encode()
    doc = json.loads(body)
    assert (doc["msg_total"], doc["msg_req"], doc["msg_ack"], doc["msg_nak"]) == (60, 30, 25, 5)
    assert doc["request_rate_1s"] == 10.0 and doc["request_rate_10s"] == 3.0
    assert doc["response_rate_1s"] == 30.0 and doc["response_rate_10s"] == 3.0


def metric_values(body: bytes) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_values(srv):
    feed(srv.stats, srv.clock)
    status, headers, body = srv.fetch("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert int(headers["Content-Length"]) == len(body)
    v = metric_values(body)
    for typ, n in (("req", 30), ("ack", 25), ("nak", 5), ("invalid", 3)):
        assert v[("fooproxy_messages_total", (("type", typ),))] == n
    assert v[("fooproxy_request_rate", (("window", "1s"),))] == 10.0
    assert v[("fooproxy_request_rate", (("window", "10s"),))] == 3.0
    assert v[("fooproxy_response_rate", (("window", "1s"),))] == 30.0
    assert v[("fooproxy_response_rate", (("window", "10s"),))] == 3.0
    assert v[("fooproxy_connections_active", ())] == 1
    assert v[("fooproxy_connections_total", ())] == 2
    assert v[("fooproxy_bytes_total", (("direction", "client_to_server"),))] == 157
    assert v[("fooproxy_bytes_total", (("direction", "server_to_client"),))] == 300
    assert v[("fooproxy_upstream_errors_total", ())] == 1
    assert v[("fooproxy_pool_idle_connections", ())] == 2
    assert v[("fooproxy_pool_open_connections", ())] == 5
    assert v[("fooproxy_upstream_up", ())] == 1.0
    ack, nak = (("result", "ack"),), (("result", "nak"),)
    assert v[("fooproxy_request_duration_seconds_bucket", (("le", "0.005"), *ack))] == 0
    assert v[("fooproxy_request_duration_seconds_bucket", (("le", "0.0063"), *ack))] == 20
    assert v[("fooproxy_request_duration_seconds_bucket", (("le", "+Inf"), *ack))] == 20
    assert v[("fooproxy_request_duration_seconds_count", ack)] == 20
    assert v[("fooproxy_request_duration_seconds_sum", ack)] == pytest.approx(20 * 0.0052)
    assert v[("fooproxy_request_duration_seconds_bucket", (("le", "0.05"), *nak))] == 0
    assert v[("fooproxy_request_duration_seconds_bucket", (("le", "0.063"), *nak))] == 5
    assert v[("fooproxy_upstream_connect_duration_seconds_count", ())] == 1
    assert v[("fooproxy_requests_unanswered_total", ())] == 0
    assert ("fooproxy_uptime_seconds", ()) not in v  # process_start_time_seconds instead
    assert v[("process_start_time_seconds", ())] > 0
    build = [labels for name, labels in v if name == "fooproxy_build_info"]
    assert len(build) == 1 and {k for k, _ in build[0]} == {"version", "python", "gevent", "hot_path"}
    # Ours and the process collector's: a private registry, no GC/platform defaults.
    assert all(name.startswith(("fooproxy_", "process_")) for name, _ in v)


def test_metrics_openmetrics_on_request(srv):
    status, headers, body = srv.fetch("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_not_found_and_method_not_allowed(srv):
    status, _, body = srv.fetch("/nope")
    assert status == 404 and body
    status, _, _ = srv.fetch("/health/")
    assert status == 404
    status, headers, _ = srv.fetch("/stats", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, _ = srv.fetch("/metrics", method="DELETE")
    assert status == 405


@pytest.mark.parametrize("path", ["/health", "/stats", "/metrics"])
def test_head_gives_headers_only(srv, path):
    _, get_headers, get_body = srv.fetch(path)
    status, headers, body = srv.fetch(path, method="HEAD")
    assert status == 200 and body == b""
    assert get_headers["Content-Length"] == str(len(get_body))
    if path == "/metrics":  # process_* (CPU seconds, memory) move between two requests: only the form is fixed
        assert int(headers["Content-Length"]) > 0
    else:
        assert headers["Content-Length"] == get_headers["Content-Length"]
    assert headers["Content-Type"] == get_headers["Content-Type"]


def test_query_string_is_ignored(srv):
    status, _, _ = srv.fetch("/health?verbose=1")
    assert status == 200


def test_a_failing_callback_gives_500_and_the_server_keeps_going(srv):
    srv.health = RuntimeError("boom")
    status, _, _ = srv.fetch("/health")
    assert status == 500
    srv.health = (True, {})
    assert srv.fetch("/health")[0] == 200


def test_busy_port_gives_a_clear_error(srv):
    taken = srv.server.address
    other = HttpServer(taken, make_app(Stats().snapshot, lambda: (True, {})))
    with pytest.raises(StartupError) as info:
        other.start()
    assert str(info.value) == "cannot serve HTTP on 127.0.0.1:%d: address already in use" % taken.port
    other.stop()  # harmless on a server that never started


def test_unknown_host_gives_a_clear_error():
    server = HttpServer(Address("no-such-host.invalid", 8088), make_app(Stats().snapshot, lambda: (True, {})))
    with pytest.raises(StartupError) as info:
        server.start()
    assert "no-such-host.invalid:8088" in str(info.value)


# -- raw connections: keep-alive, drain, stop -----------------------------------
def raw_request(sock, path: str = "/health") -> tuple[bytes, bytes]:
    """Send one HTTP/1.1 request on ``sock``; return (head, body)."""
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, "connection closed before the response"
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.server.address.port), timeout=5)


def test_keep_alive_then_drain_closes_idle_connection(srv):
    sock = connect(srv)
    try:
        head, _ = raw_request(sock)
        assert b"200 OK" in head and b"Connection: close" not in head
        head, _ = raw_request(sock)  # the connection is kept alive
        assert b"200 OK" in head
        srv.server.drain()
        assert sock.recv(1) == b""  # idle keep-alive connection ended by the drain
    finally:
        sock.close()

    sock = connect(srv)  # new requests are still served while draining...
    try:
        head, _ = raw_request(sock)
        assert b"200 OK" in head and b"Connection: close" in head  # ...but not kept alive
        assert sock.recv(1) == b""
    finally:
        sock.close()


def test_stop_does_not_wait_for_idle_connections(srv):
    idle = connect(srv)
    raw_request(idle)  # now an idle keep-alive connection
    silent = connect(srv)  # connected, never sends a request
    try:
        # Wait until the server has accepted it (a connection still in the
        # listen backlog is reset by the kernel when the listener closes).
        with gevent.Timeout(5):
            while not srv.server._server.fresh_waiting:
                gevent.sleep(0.005)
        with gevent.Timeout(0.4):  # well under stop's timeout below
            srv.server.stop(timeout=5)
        assert idle.recv(1) == b""
        assert silent.recv(1) == b""
    finally:
        idle.close()
        silent.close()
    with pytest.raises(OSError):
        connect(srv).close()  # the listener is closed


def test_idle_timeout_frees_the_slot():
    app = make_app(Stats().snapshot, lambda: (True, {}))
    server = HttpServer(Address("127.0.0.1", 0), app, idle_timeout=0.05)
    server.start()
    try:
        sock = socket.create_connection(("127.0.0.1", server.address.port), timeout=5)
        try:
            assert sock.recv(1) == b""  # the server hung up on a client that said nothing
        finally:
            sock.close()
    finally:
        server.stop()


def test_head_deadline_is_total_and_quiet_for_silent_connections(caplog):
    app = make_app(Stats().snapshot, lambda: (True, {}))
    server = HttpServer(Address("127.0.0.1", 0), app, header_timeout=0.3)
    server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="fooproxy.http"):
            silent = socket.create_connection(("127.0.0.1", server.address.port), timeout=5)
            slow = socket.create_connection(("127.0.0.1", server.address.port), timeout=5)
            try:
                slow.sendall(b"GET /health HTTP/1.1\r\n")
                with gevent.Timeout(3):
                    for _ in range(100):  # a byte every 0.05 s never lets a per-byte timeout fire
                        try:
                            slow.sendall(b"x")
                        except OSError:
                            break
                        gevent.sleep(0.05)
                    assert silent.recv(1) == b""
            finally:
                silent.close()
                slow.close()
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and "not complete within 0.3s" in messages[0], messages
    finally:
        server.stop()

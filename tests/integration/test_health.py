"""UpstreamChecker against real sockets, and the Health verdict built on it."""

from __future__ import annotations

import logging

import gevent
import pytest
from gevent import socket
from gevent.server import StreamServer

from fooproxy.config import Address
from fooproxy.health import Health, UpstreamChecker
from tests.helpers import wait_until


@pytest.fixture
def upstream():
    """A listening server that accepts and closes, counting connections."""
    seen = []
    server = StreamServer(("127.0.0.1", 0), lambda sock, addr: seen.append(addr))
    server.start()
    server.seen = seen
    yield server
    server.stop(timeout=0.5)


def closed_port() -> Address:
    """A port with nothing listening (bound then released, so refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return Address("127.0.0.1", port)


@pytest.fixture
def checkers():
    made: list[UpstreamChecker] = []

    def make(*args, **kw) -> UpstreamChecker:
        c = UpstreamChecker(*args, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def test_listening_upstream_is_ok(upstream, checkers):
    checker = checkers(Address("127.0.0.1", upstream.server_port), interval=0.01)
    assert checker.status() == (True, "upstream 127.0.0.1:%d not checked yet" % upstream.server_port)
    checker.start()
    assert wait_until(lambda: checker.checks >= 3)
    ok, reason = checker.status()
    assert ok and "reachable" in reason
    assert wait_until(lambda: len(upstream.seen) >= 3)  # each check is a real connection
    assert checker.detail()["upstream"] == "reachable"


def test_closed_port_unhealthy_after_two_failures(checkers, caplog):
    addr = closed_port()
    # A long interval: the test drives the checks itself, so the count is exact.
    checker = checkers(addr, interval=60)
    with caplog.at_level(logging.INFO, logger="fooproxy.health"):
        assert checker.check_once() is False
        ok, _ = checker.status()
        assert ok, "one failed check is not enough to flap /health"
        assert checker.check_once() is False
        ok, reason = checker.status()
    assert not ok
    assert str(addr) in reason and "refused" in reason and "2 consecutive" in reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the transition is logged, not every check

    detail = checker.detail()
    assert detail["upstream"] == "unreachable" and detail["consecutive_failures"] == 2


def test_closed_port_via_the_loop(checkers):
    checker = checkers(closed_port(), interval=0.01)
    checker.start()
    assert wait_until(lambda: not checker.status()[0])
    assert checker.consecutive_failures >= 2


def test_recovers_when_upstream_comes_back(checkers, caplog):
    addr = closed_port()
    checker = checkers(addr, interval=60, failures=1)
    assert not checker.check_once() and not checker.status()[0]
    server = StreamServer(("127.0.0.1", addr.port), lambda s, a: None)
    server.start()
    try:
        with caplog.at_level(logging.INFO, logger="fooproxy.health"):
            assert checker.check_once()
        assert checker.status()[0] and checker.consecutive_failures == 0
        assert "reachable again" in caplog.text
    finally:
        server.stop(timeout=0.5)


def test_timeout_against_a_silent_address(checkers):
    # 192.0.2.0/24 (TEST-NET-1) is never routed: the SYN goes nowhere, or the
    # route is missing; either way the check fails fast and does not hang.
    checker = checkers(Address("192.0.2.1", 9), interval=60, timeout=0.2, failures=1)
    with gevent.Timeout(3):
        assert checker.check_once() is False
    assert not checker.status()[0]


def test_stop_interrupts_a_check_in_progress(checkers):
    checker = checkers(Address("192.0.2.1", 9), interval=60, timeout=30)
    checker.start()
    with gevent.Timeout(3):
        checker.stop()


class FakeSaver:
    def __init__(self, healthy: bool = True, last_error: str | None = None) -> None:
        self.healthy = healthy
        self.last_error = last_error


def test_health_verdicts(upstream, checkers):
    good = checkers(Address("127.0.0.1", upstream.server_port), interval=60)
    good.check_once()
    ok, detail = Health(good, FakeSaver())()
    assert ok and detail["status"] == "ok" and detail["persistence"] == "ok" and detail["draining"] is False

    ok, detail = Health(good, None)()
    assert ok and detail["persistence"] == "disabled"

    ok, detail = Health(good, FakeSaver(False, "cannot write x: No space left on device"))()
    assert ok and detail["status"] == "degraded"
    assert detail["persistence"] == "failing: cannot write x: No space left on device"

    draining = Health(good, FakeSaver(), is_draining=lambda: True)
    ok, detail = draining()
    assert not ok and detail["reason"].startswith("draining") and detail["draining"] is True
    assert draining.gauges() == {"draining": 1.0, "upstream_up": 1.0, "persistence_ok": 1.0}

    bad = checkers(closed_port(), interval=60)
    bad.check_once()
    bad.check_once()
    ok, detail = Health(bad, FakeSaver())()
    assert not ok and detail["status"] == "unavailable" and "unreachable" in detail["reason"]
    assert Health(bad)()[1]["upstream"] == "unreachable"

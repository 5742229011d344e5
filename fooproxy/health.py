"""Health: an upstream reachability checker, and the /health verdict.

``UpstreamChecker`` dials the Foo server every ``interval`` seconds (connect,
close at once) and calls it unreachable only after ``failures`` checks in a
row failed, so one dropped SYN does not flap /health. ``Health`` combines the
checker, the recovery saver and the drain flag into the ``(ok, detail)`` pair
that ``http.make_app`` serves, plus gauges for ``/metrics``.

/health verdicts (HTTP status, ``status`` field):

- 200 ``ok``: upstream reachable (or not checked yet), persistence fine.
- 200 ``degraded``: the proxy works but the recovery file cannot be written
  (``"persistence": "failing: <reason>"``), or sessions are failing on
  internal errors (``errors_internal`` rose within the last
  ``INTERNAL_ERRORS_WINDOW`` seconds; ``"internal_errors": "rising: ..."``).
  Not a 503: traffic is mostly unaffected, and a load balancer should not pull
  a working proxy for it; an operator must look.
- 503 ``unavailable`` with ``reason``: upstream unreachable, or draining.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent
import gevent.event
from gevent import socket as gsocket

from fooproxy.config import Address

_log = logging.getLogger("fooproxy.health")


class UpstreamChecker:
    """Periodically checks that the upstream accepts TCP connections.

    The reference Foo server logs ``connected``/``disconnected`` for each
    check; that noise is the price of a real end-to-end probe.
    """

    def __init__(
        self,
        address: Address,
        interval: float = 2.0,
        timeout: float | None = None,
        failures: int = 2,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_check: Callable[[bool, float], None] | None = None,
    ) -> None:
        if interval <= 0 or failures < 1:
            raise ValueError("interval must be > 0 and failures >= 1")
        self.address = address
        self.interval = interval
        # A check must end before the next is due, or checks would pile up.
        self.timeout = min(interval, 5.0) if timeout is None else timeout
        self.failures = failures
        self.log = logger or _log
        self.clock = clock
        #: Checks done so far (tests and /health use it to tell "not yet checked").
        self.checks = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.last_check: float | None = None  # clock() when the last check ended
        #: Called after each check with ``(passed, clock() when it began)`` (the balancer's hook).
        self.on_check = on_check
        self._stop = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Spawn the check loop; the first check runs at once."""
        if self._greenlet is None:
            self._stop.clear()
            self._greenlet = gevent.spawn(self._run)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop checking; a check in progress is abandoned (its socket closed)."""
        self._stop.set()
        g, self._greenlet = self._greenlet, None
        if g is not None:
            g.kill(block=True, timeout=timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            if self._stop.wait(self.interval):
                break

    # -- checking ----------------------------------------------------------
    def check_once(self) -> bool:
        """Dial the upstream once, record and return whether it answered."""
        was_ok = self.ok
        began = self.clock()
        try:
            self._try_connect()
        except OSError as exc:  # refused, unreachable, timeout, DNS failure
            self.consecutive_failures += 1
            self.last_error = _describe(exc)
            result = False
        else:
            self.consecutive_failures = 0
            self.last_error = None
            result = True
        self.checks += 1
        self.last_check = self.clock()
        # Log transitions only: one line when it goes down, one when it is back.
        if was_ok and not self.ok:
            self.log.warning("%s", self.status()[1])
        elif not was_ok and self.ok:
            self.log.info("upstream %s reachable again", self.address)
        if self.on_check is not None:
            self.on_check(result, began)
        return result

    def _try_connect(self) -> None:
        host, port = self.address.connect_host, self.address.port
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            # A name: let create_connection resolve it (gevent's resolver, off the hub).
            gsocket.create_connection((host, port), timeout=self.timeout).close()
            return
        # A numeric host: connect directly, no getaddrinfo round trip.
        sock = gsocket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect((host, port))
        finally:
            sock.close()

    @property
    def ok(self) -> bool:
        return self.consecutive_failures < self.failures

    def status(self) -> tuple[bool, str]:
        """``(ok, reason)``: unhealthy once the last ``failures`` checks all failed."""
        if self.ok:
            if self.checks == 0:
                return True, "upstream %s not checked yet" % self.address
            return True, "upstream %s reachable" % self.address
        return False, "upstream %s unreachable: %s (%d consecutive checks failed)" % (
            self.address,
            self.last_error,
            self.consecutive_failures,
        )

    def detail(self) -> dict[str, Any]:
        """Fields for the /health body."""
        state = "unknown" if self.checks == 0 else ("reachable" if self.ok else "unreachable")
        out: dict[str, Any] = {"upstream": state, "upstream_address": str(self.address)}
        if self.last_check is not None:
            out["last_check_age_s"] = round(max(0.0, self.clock() - self.last_check), 3)
        if self.consecutive_failures:
            out["consecutive_failures"] = self.consecutive_failures
            out["last_error"] = self.last_error
        return out


def _describe(exc: OSError) -> str:
    if isinstance(exc, socket.timeout):
        return "connect timed out"
    text = exc.strerror or str(exc) or exc.__class__.__name__
    return text[:1].lower() + text[1:]


class UpstreamView(Protocol):
    """What ``Health`` reads about the upstreams: the Balancer, or a ``CheckerGroup``."""

    def upstream_states(self) -> list[dict[str, Any]]:
        """One dict per upstream: ``address``, ``up`` (bool), ``state`` and details."""
        ...


class CheckerGroup:
    """One ``UpstreamChecker`` per address, for a process that has no Balancer (the master of ``-workers``)."""

    def __init__(self, addresses: tuple[Address, ...], interval: float, timeout: float,
                 logger: logging.Logger | None = None) -> None:  # fmt: skip
        self.checkers = [UpstreamChecker(a, interval, timeout=timeout, logger=logger) for a in addresses]

    def start(self) -> None:
        for checker in self.checkers:
            checker.start()

    def stop(self) -> None:
        for checker in self.checkers:
            checker.stop()

    def upstream_states(self) -> list[dict[str, Any]]:
        return [checker_state(c) for c in self.checkers]


def checker_state(checker: UpstreamChecker) -> dict[str, Any]:
    """An upstream's entry of /health from its checker alone."""
    detail = checker.detail()
    out: dict[str, Any] = {"address": str(checker.address), "up": checker.ok}
    out["state"] = "up" if checker.ok else "down"
    out["checked"] = detail.pop("upstream")
    detail.pop("upstream_address", None)
    out.update(detail)
    return out


class PersistenceStatus(Protocol):
    """What ``Health`` reads from ``recovery.Saver``."""

    healthy: bool
    last_error: str | None


#: /health stays ``degraded`` this many seconds after it last saw ``errors_internal`` rise.
INTERNAL_ERRORS_WINDOW = 60.0


class InternalErrors:
    """Whether ``errors_internal`` is rising: the count now against what earlier verdicts saw.

    The first reading is the baseline (counts restored from the recovery file
    are history, not a rise). After that, any increase marks the moment, and
    the verdict is "rising" until ``window`` seconds have passed without one.
    """

    def __init__(self, read: Callable[[], int], window: float = INTERNAL_ERRORS_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.read = read
        self.window = window
        self.clock = clock
        self.seen: int | None = None
        self.rose_at: float | None = None
        self.rose_by = 0

    def rising(self) -> tuple[bool, int]:
        """``(rising now, errors in the rise)``."""
        count, now = self.read(), self.clock()
        if self.seen is not None and count > self.seen:
            if self.rose_at is None or now - self.rose_at >= self.window:
                self.rose_by = 0
            self.rose_by += count - self.seen
            self.rose_at = now
        self.seen = count
        return self.rose_at is not None and now - self.rose_at < self.window, self.rose_by


class Health:
    """The /health verdict: ``Health(...)()`` returns ``(ok, detail)``.

    Any part may be absent: no checker means the upstream is not probed, no
    saver means persistence is disabled, no ``is_draining`` means never draining,
    no ``internal_errors`` means they are not watched.
    """

    def __init__(
        self,
        checker: UpstreamChecker | None = None,
        saver: PersistenceStatus | None = None,
        is_draining: Callable[[], bool] | None = None,
        internal_errors: Callable[[], int] | None = None,
        upstreams: UpstreamView | None = None,
    ) -> None:
        self.checker = checker
        #: Several upstreams (replaces ``checker``): healthy while at least one is up.
        self.upstreams = upstreams
        self.saver = saver
        self.is_draining = is_draining or (lambda: False)
        self.internal = InternalErrors(internal_errors) if internal_errors is not None else None

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {}
        reasons = []
        if self.checker is not None:
            up, why = self.checker.status()
            detail.update(self.checker.detail())
            if not up:
                reasons.append(why)
        if self.upstreams is not None:
            states = self.upstreams.upstream_states()
            up_now = [s for s in states if s["up"]]
            detail["upstream"] = "reachable" if up_now or not states else "unreachable"
            detail["upstreams_up"] = "%d/%d" % (len(up_now), len(states))
            detail["upstreams"] = {s["address"]: {k: v for k, v in s.items() if k != "address"} for s in states}
            if states and not up_now:
                why = ("%s unreachable: %s" % (s["address"], s.get("last_error") or s["state"]) for s in states)
                reasons.append("no upstream up: " + "; ".join(why))
        if self.saver is None:
            detail["persistence"] = "disabled"
        elif self.saver.healthy:
            detail["persistence"] = "ok"
        else:
            detail["persistence"] = "failing: %s" % self.saver.last_error
        draining = bool(self.is_draining())
        detail["draining"] = draining
        if draining:
            reasons.insert(0, "draining: shutting down")
        if reasons:
            detail["status"] = "unavailable"
            detail["reason"] = "; ".join(reasons)
            return False, detail
        degraded = self.saver is not None and not self.saver.healthy
        if self.internal is not None:
            rising, count = self.internal.rising()
            if rising:
                detail["internal_errors"] = "rising: %d session(s) ended on an internal error in the last %gs" % (
                    count,
                    self.internal.window,
                )
                degraded = True
        detail["status"] = "degraded" if degraded else "ok"
        return True, detail

    def gauges(self) -> dict[str, float]:
        """Extra /metrics gauges (``fooproxy_upstream_up`` etc.), for ``make_registry``."""
        out: dict[str, float] = {"draining": float(bool(self.is_draining()))}
        if self.checker is not None:
            out["upstream_up"] = float(self.checker.ok)
        # With ``upstreams``, /metrics has fooproxy_upstream_up{upstream=...} from the stats instead.
        if self.saver is not None:
            out["persistence_ok"] = float(self.saver.healthy)
        return out

"""Balancer: several upstreams behind one ``Connector``, picked per session, with failover.

``Balancer`` is what the Proxy connects through (it has the ``Connector``
interface). It owns one ``Upstream`` per ``-forward`` address, each with its
own connector (a pool per upstream with ``-pool-size``), its own health
checker, and its state:

* **up** (in rotation) unless its health checks failed (the checker's rule:
  ``failures`` checks in a row) or passive detection took it out: ``-max-fails``
  connect failures of clients within ``-health-interval``. A passive mark is
  cleared by the next health check that passes (one that began after the
  mark), or by a client's connect that succeeds.
* **down**: skipped by new sessions while another one is up. If every upstream
  is down ("panic"), sessions still try them in policy order, so a server that
  comes back is used at once, before its next check.

A new session picks by ``-balance``: ``roundrobin`` (a cursor that moves one
step per session), ``leastconn`` (fewest sessions now; ties in round-robin
order) or ``first`` (the first up in the order given: failover). When its
connect fails, it is tried on the next upstream (healthy first, then any not
tried yet), up to ``-connect-retries`` more times; only when none is left is
it given up (the Proxy then counts ``upstream_errors``). A pool that is
exhausted is not a failed upstream: no retry, no mark.

A session stays on its upstream: the connection it got is recorded with its
``Lease`` (the upstream and the connector it came from) until the session
releases it. The Balancer writes each upstream's entry of the stats block
(``up``, ``sessions_active``, ``sessions_total``; ``messages`` are counted by
the session's ``record``, see ``Stats.messages_cell``): one writer per block.

``update(config)`` is a reload: upstreams that stay keep their state and
sessions, new ones join, removed ones leave the rotation (their sessions
finish normally; their connector closes after the last one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from gevent.socket import socket

from fooproxy.config import Address, Config
from fooproxy.health import UpstreamChecker
from fooproxy.pool import PoolExhausted, UpstreamPool
from fooproxy.ratelimit import RepeatFilter
from fooproxy.stats import DOWN, REMOVED, UP, Stats
from fooproxy.upstream import Connector, HubConnect, UpstreamError

log = logging.getLogger("fooproxy.balancer")

#: Settings of an upstream's connector: a change gives it a new connector (open sessions keep the old one).
CONNECTOR_SETTINGS = ("connect_timeout", "pool_size", "pool_wait", "pool_idle")
#: Settings of its health checker.
CHECKER_SETTINGS = ("health_interval", "connect_timeout")


def connector_of(address: Address, config: Config, on_change: Callable[[int, int], None] | None) -> Connector:
    """One upstream's connector: a pool (reporting ``on_change(idle, open)``) or one connection per client."""
    if config.pool_size <= 0:
        return Connector(address, config.connect_timeout)
    return UpstreamPool(address, config.connect_timeout, config.pool_size, config.pool_wait, config.pool_idle,
                        on_change=on_change)  # fmt: skip


class Upstream:
    """One upstream server: its connector, checker, state and session counts (see the module doc)."""

    def __init__(self, address: Address, balancer: Balancer) -> None:
        self.address = address
        self.name = str(address)
        self.balancer = balancer
        self.connector: Connector = balancer.new_connector(self)
        self.checker: UpstreamChecker | None = None
        self.active = 0  # sessions on it now
        self.total = 0  # sessions it was given
        self.fails = 0  # connect failures in the current window
        self.window_start = 0.0
        self.passive_since: float | None = None  # when passive detection took it out, None: not
        self.last_error: str | None = None
        self.removed = False
        stats = balancer.stats
        self.entry = stats.upstream_entry(self.name)
        #: Where this upstream's sessions count their messages (``Stats.record``'s ``messages_cell``).
        self.messages_cell = stats.messages_cell(self.entry)

    # -- state ----------------------------------------------------------------
    @property
    def up(self) -> bool:
        """In rotation: its checks pass (or are not run) and passive detection has not taken it out."""
        if self.removed or self.passive_since is not None:
            return False
        return self.checker is None or self.checker.ok

    @property
    def state(self) -> str:
        return "removed" if self.removed else ("up" if self.up else "down")

    def publish(self) -> None:
        """Write the ``up`` cell of this upstream's stats entry."""
        if self.removed and any(u.name == self.name for u in self.balancer.upstreams):
            return  # removed, then added again by a later reload: the entry is the new one's now
        self.balancer.stats.set_upstream(self.entry, "up", REMOVED if self.removed else (UP if self.up else DOWN))

    # -- events ---------------------------------------------------------------
    def connected(self) -> None:
        self.fails = 0
        if self.passive_since is not None:
            self.passive_since = None
            log.info("upstream %s is back in rotation (a client connected)", self.name)
            self.publish()  # the only change of ``up`` a connect makes (the checker publishes its own)
        self.active += 1
        self.total += 1
        self.balancer.stats.upstream_session(self.entry, True)

    def released(self) -> None:
        self.active -= 1
        self.balancer.stats.upstream_session(self.entry, False)

    def failed(self, exc: UpstreamError, now: float) -> None:
        """A client's connect failed: passive detection (``-max-fails`` within ``-health-interval``)."""
        self.last_error = str(exc)
        limit, window = self.balancer.config.max_fails, self.balancer.config.health_interval
        if limit <= 0 or self.passive_since is not None:
            return
        if self.fails == 0 or now - self.window_start > window:
            self.window_start, self.fails = now, 0
        self.fails += 1
        if self.fails >= limit:
            self.passive_since = now
            log.warning("upstream %s out of rotation: %d connect failures within %gs (%s)",
                        self.name, self.fails, window, exc)  # fmt: skip
            self.publish()

    def checked(self, passed: bool, began: float) -> None:
        """Its health checker's hook after each check."""
        if passed:
            self.last_error = None
            if self.passive_since is not None and began >= self.passive_since:
                self.passive_since = None
                self.fails = 0
                log.info("upstream %s is back in rotation (its health check passed)", self.name)
        elif self.checker is not None:
            self.last_error = self.checker.last_error
        self.publish()

    def describe(self) -> dict[str, Any]:
        """Its entry of /health."""
        out: dict[str, Any] = {"address": self.name, "up": self.up, "state": self.state,
                               "sessions_active": self.active}  # fmt: skip
        if self.passive_since is not None:
            window = self.balancer.config.health_interval
            out["out_of_rotation"] = "%d connect failures within %gs" % (self.fails, window)
        if self.checker is not None:
            out["checked"] = self.checker.detail()["upstream"]
            if self.checker.consecutive_failures:
                out["consecutive_failures"] = self.checker.consecutive_failures
        if self.last_error and not self.up:
            out["last_error"] = self.last_error
        return out


class Lease:
    """A session's hold on an upstream: where its connection came from, and where it goes back."""

    __slots__ = ("upstream", "connector")

    def __init__(self, upstream: Upstream, connector: Connector) -> None:
        self.upstream = upstream
        self.connector = connector


class Balancer:
    """Several upstreams behind the ``Connector`` interface (see the module doc)."""

    def __init__(self, config: Config, stats: Stats, *, checks: bool | None = None) -> None:
        self.config = config
        self._set_kind()
        self.stats = stats
        #: Health checks per upstream: with several upstreams, or when /health needs them (``-http``).
        self.checks = (len(config.forward) > 1 or config.http is not None) if checks is None else checks
        self.warnings = RepeatFilter(log)
        self._pool_counts: dict[int, tuple[int, int]] = {}  # id(pool) -> (idle, open), summed into the gauges
        self._leases: dict[socket, Lease] = {}
        self._cursor = 0
        self._started = False
        self._closed = False
        self.upstreams: list[Upstream] = [Upstream(a, self) for a in config.forward]
        for upstream in self.upstreams:
            upstream.publish()

    # -- Connector interface ------------------------------------------------------
    def _set_kind(self) -> None:
        # Plain attributes, not properties: the Proxy reads ``reuses`` per session.
        self.connects_from_hub = self.config.pool_size <= 0
        self.reuses = self.config.pool_size > 0

    def prepare(self) -> None:
        """Resolve every upstream now and start the health checks (the Proxy calls this at start)."""
        for upstream in list(self.upstreams):  # (a resolve may yield)
            upstream.connector.prepare()
        if not self._started:
            self._started = True
            for upstream in self.upstreams:
                self._start_checker(upstream)

    def acquire(self) -> socket:
        """A connection to a picked upstream, failing over (in a greenlet: a pool may wait)."""
        tried: list[Upstream] = []
        errors: list[UpstreamError] = []
        while True:
            upstream = self._pick(tried)
            if upstream is None:
                raise self._given_up(errors)
            tried.append(upstream)
            connector = upstream.connector
            try:
                sock = connector.acquire()
            except PoolExhausted:
                raise  # busy, not broken: neither a retry nor a mark
            except UpstreamError as exc:
                self._failed(upstream, exc, errors)
                continue
            return self._lease(sock, upstream, connector)

    def connect_from_hub(self, done: Callable[[socket | None, UpstreamError | None], None]) -> FailoverConnect:
        """Like ``acquire`` on watchers, from the accept callback (see ``FailoverConnect``)."""
        return FailoverConnect(self, done)

    def connect_now(self) -> socket | None:
        """``connect_from_hub``'s fast path, for one upstream: a leased socket connected at once, else None.

        With one upstream ``_pick`` always gives it (up or not: panic), so
        when its connector connects at once (``Connector.connect_now``) nothing
        is left to fail over. None: nothing was tried or recorded, take
        ``connect_from_hub``. Several upstreams always take it (their order
        and failover live in ``FailoverConnect``).
        """
        upstreams = self.upstreams
        if len(upstreams) != 1:
            return None
        upstream = upstreams[0]
        connector = upstream.connector
        sock = connector.connect_now()
        if sock is None:
            return None
        self._cursor += 1  # as _pick: one step per session
        return self._lease(sock, upstream, connector)

    def messages_cell(self, sock: socket) -> int:
        """Where the session on ``sock`` counts its upstream's messages (``Stats.record``)."""
        lease = self._leases.get(sock)
        return lease.upstream.messages_cell if lease is not None else 0

    def release(self, sock: socket, reusable: bool) -> None:
        """The session on ``sock`` ended: back to the connector it came from."""
        lease = self._leases.pop(sock, None)
        if lease is None:
            sock.close()
            return
        lease.upstream.released()
        lease.connector.release(sock, reusable)

    def retire(self) -> None:
        """Replaced as a whole: stop checking, let each connector close after its last session."""
        self._stop_checkers(self.upstreams)
        for upstream in self.upstreams:
            upstream.connector.retire()

    def close(self) -> None:
        """At shutdown, after the sessions: stop the checks, close every connector."""
        self._closed = True
        self._stop_checkers(self.upstreams)
        for upstream in self.upstreams:
            upstream.connector.close()

    # -- picking ------------------------------------------------------------------
    def _pick(self, tried: list[Upstream]) -> Upstream | None:
        """The next upstream for a session that has tried ``tried``: healthy first, then any untried."""
        if len(tried) > self.config.connect_retries:
            return None
        if not tried:
            self._cursor += 1  # one step per session, not per retry
        upstreams = self.upstreams
        if len(upstreams) == 1:  # the common case: the one upstream, up or not (panic), without the sorting
            only = upstreams[0]
            return only if only not in tried else None
        for upstream in self._order():  # healthy ones first; the others only when no healthy one is left
            if upstream not in tried:
                return upstream
        return None

    def _order(self) -> list[Upstream]:
        """The upstreams in rotation in policy order, then the others (panic) in the same order."""
        healthy = [u for u in self.upstreams if u.up]
        others = [u for u in self.upstreams if not u.up]
        return self._by_policy(healthy) + self._by_policy(others)

    def _by_policy(self, ups: list[Upstream]) -> list[Upstream]:
        if self.config.balance == "first" or len(ups) < 2:
            return ups
        start = self._cursor % len(ups)  # round robin over these: a down one's share is spread evenly
        rotated = ups[start:] + ups[:start]
        if self.config.balance == "leastconn":
            rotated.sort(key=lambda u: u.active)  # stable: ties stay in round-robin order
        return rotated

    def _failed(self, upstream: Upstream, exc: UpstreamError, errors: list[UpstreamError]) -> None:
        errors.append(exc)
        upstream.failed(exc, time.monotonic())
        self.warnings.warn(upstream.name, "%s (trying another upstream if one is left)" % exc)

    def _given_up(self, errors: list[UpstreamError]) -> UpstreamError:
        if len(errors) == 1:
            return errors[0]
        if not errors:
            return UpstreamError("no upstream configured")
        return UpstreamError("no upstream left: " + "; ".join(str(e) for e in errors))

    def _lease(self, sock: socket, upstream: Upstream, connector: Connector) -> socket:
        upstream.connected()
        self._leases[sock] = Lease(upstream, connector)
        return sock

    # -- connectors, checkers -------------------------------------------------------
    def new_connector(self, upstream: Upstream) -> Connector:
        key_holder: list[int] = []

        def pool_gauges(idle: int, open_: int) -> None:
            self._pool_counts[key_holder[0]] = (idle, open_)
            self._publish_pool()

        connector = connector_of(upstream.address, self.config, pool_gauges)
        connector.connect_timer = self.stats.upstream_connected  # fooproxy_upstream_connect_duration_seconds
        key_holder.append(id(connector))
        return connector

    def _retire_connector(self, connector: Connector) -> None:
        self._pool_counts.pop(id(connector), None)  # the retired pool no longer reports
        connector.retire()
        self._publish_pool()

    def _publish_pool(self) -> None:
        self.stats.set("pool_idle", sum(c[0] for c in self._pool_counts.values()))
        self.stats.set("pool_open", sum(c[1] for c in self._pool_counts.values()))

    def _start_checker(self, upstream: Upstream) -> None:
        if not self.checks or upstream.checker is not None:
            return
        cfg = self.config
        upstream.checker = UpstreamChecker(
            upstream.address,
            cfg.health_interval,
            timeout=min(cfg.connect_timeout, cfg.health_interval),
            logger=logging.getLogger("fooproxy"),
            on_check=upstream.checked,
        )
        upstream.checker.start()

    @staticmethod
    def _stop_checkers(upstreams: list[Upstream]) -> None:
        for upstream in upstreams:
            checker, upstream.checker = upstream.checker, None
            if checker is not None:
                checker.stop()

    # -- reload ---------------------------------------------------------------------
    def update(self, new: Config) -> list[str]:
        """A reload: apply ``new``'s upstreams and settings in place; notes for the reload line.

        Nothing here yields to the hub: the new connectors (a pool or not, as
        ``connects_from_hub`` now says) are in place at once. The caller tells
        the Proxy, then calls ``prepare()`` (which resolves the new addresses,
        and may yield).
        """
        old = self.config
        self.config = new
        self._set_kind()
        if not self.checks and (len(new.forward) > 1 or new.http is not None):
            self.checks = True
        kept = {u.name: u for u in self.upstreams}
        upstreams: list[Upstream] = []
        for address in new.forward:
            upstream = kept.pop(str(address), None)
            if upstream is None:
                upstream = Upstream(address, self)
            else:
                if any(getattr(old, f) != getattr(new, f) for f in CONNECTOR_SETTINGS):
                    previous, upstream.connector = upstream.connector, self.new_connector(upstream)
                    self._retire_connector(previous)  # its open sessions release to it (their Lease)
                if any(getattr(old, f) != getattr(new, f) for f in CHECKER_SETTINGS):
                    self._stop_checkers([upstream])
            upstreams.append(upstream)
        self.upstreams = upstreams
        notes = []
        for gone in kept.values():  # removed: out of rotation, sessions finish, connector closes after them
            gone.removed = True
            self._stop_checkers([gone])
            self._retire_connector(gone.connector)
            gone.publish()
            if gone.active:
                notes.append("upstream %s removed: its %d open session(s) finish on it" % (gone.name, gone.active))
        for upstream in upstreams:
            upstream.publish()
            if self._started:
                self._start_checker(upstream)
        if not new.pool_size:
            self._pool_counts.clear()
            self._publish_pool()
        return notes

    # -- /health ------------------------------------------------------------------------
    def upstream_states(self) -> list[dict[str, Any]]:
        return [u.describe() for u in self.upstreams]


class FailoverConnect:
    """One client's upstream connect from the hub, across upstreams (``HubConnect`` per attempt).

    Calls ``done(sock, None)``, ``done(None, error)`` once no upstream is left,
    or ``done(None, None)`` when cancelled, exactly once (possibly before the
    constructor returns). The Proxy keeps it in ``connecting`` and may
    ``cancel()`` it at the drain.
    """

    __slots__ = ("balancer", "done", "tried", "errors", "inner", "upstream", "connector")

    def __init__(self, balancer: Balancer, done: Callable) -> None:
        self.balancer = balancer
        self.done: Callable | None = done
        self.tried: list[Upstream] = []
        self.errors: list[UpstreamError] = []
        self.inner: HubConnect | None = None
        self.upstream: Upstream | None = None
        self.connector: Connector | None = None
        self._next()

    @property
    def finished(self) -> bool:
        return self.done is None

    def cancel(self) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.cancel()  # reports (None, None) to _reported, which reports the cancel
        self._report(None, None)

    def _next(self) -> None:
        balancer = self.balancer
        while self.done is not None:
            upstream = balancer._pick(self.tried)
            if upstream is None:
                self._report(None, balancer._given_up(self.errors))
                return
            self.tried.append(upstream)
            self.upstream, self.connector = upstream, upstream.connector
            try:
                inner = upstream.connector.connect_from_hub(self._reported)
            except UpstreamError as exc:
                balancer._failed(upstream, exc, self.errors)
                continue
            if not inner.finished:
                self.inner = inner
            return

    def _reported(self, sock: socket | None, exc: UpstreamError | None) -> None:
        self.inner = None
        if self.done is None:  # cancelled meanwhile
            if sock is not None:
                sock.close()
            return
        upstream, connector = self.upstream, self.connector
        assert upstream is not None and connector is not None
        if sock is not None:
            done, self.done = self.done, None  # _report, inlined on the path every session takes
            done(self.balancer._lease(sock, upstream, connector), None)
        elif exc is not None:
            self.balancer._failed(upstream, exc, self.errors)
            self._next()
        else:
            self._report(None, None)

    def _report(self, sock: socket | None, exc: UpstreamError | None) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(sock, exc)

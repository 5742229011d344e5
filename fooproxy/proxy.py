"""Proxy: the gevent StreamServer that accepts clients and runs a DataBus each."""

from __future__ import annotations

import logging
import socket as _stdsocket
import time

from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.socket import socket

from fooproxy.config import Config
from fooproxy.databus import DataBus
from fooproxy.pool import PoolExhausted
from fooproxy.stats import Stats
from fooproxy.upstream import Connector, UpstreamError

log = logging.getLogger("fooproxy.proxy")

UNREACHABLE = "upstream unreachable"
POOL_BUSY = "no pooled upstream connection free"


class RepeatFilter:
    """Say a recurring error once, then how often it recurred, at most every ``period`` s."""

    def __init__(self, logger: logging.Logger, period: float = 10.0) -> None:
        self.logger = logger
        self.period = period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        again = self._suppressed.pop(key, 0)
        self._last[key] = now
        self.logger.warning("%s%s", message, " (and %d more times)" % again if again else "")


class Proxy(StreamServer):
    """Accepts clients on a pre-bound listener and forwards each to the upstream.

    Per-connection state lives on the DataBus, never here. ``spawn`` is a
    bounded pool: beyond ``max_conns`` clients, new ones wait in the backlog.
    """

    def __init__(
        self,
        listener: socket,
        config: Config,
        stats: Stats,
        connector: Connector,
        max_accept: int | None = None,
    ) -> None:
        super().__init__(listener, spawn=Pool(config.max_conns))
        if max_accept:
            self.max_accept = max_accept
        self.config = config
        self.stats = stats
        self.connector = connector
        self.upstream_errors = RepeatFilter(log)
        self.sessions: set[DataBus] = set()

    def handle(self, client: socket, address: tuple) -> None:
        """Serve one client to the end; closes both sockets whatever happens."""
        stats, config = self.stats, self.config
        stats.connection_opened()
        started = time.monotonic()
        peer = _peer(address)
        bus = upstream = None
        how = UNREACHABLE
        try:
            try:
                client.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            except OSError:
                pass  # the client is already gone: the first recv will say so
            try:
                upstream = self.connector.acquire()
            except UpstreamError as exc:
                stats.upstream_error()  # pool exhaustion too: either way the client got no upstream
                if isinstance(exc, PoolExhausted):
                    how = POOL_BUSY
                # Keyed by kind, so a burst of one does not hide the first report of the other.
                self.upstream_errors.warn(type(exc).__name__, "%s: %s" % (peer, exc))
                return
            bus = DataBus(
                client,
                upstream,
                stats,
                linger=config.linger,
                idle_timeout=config.idle_timeout,
                keep_upstream=self.connector.reuses,
            )
            self.sessions.add(bus)
            how = "shut down"  # if killed by the drain before run() returns
            how = bus.run()
        finally:
            if bus is not None:
                self.sessions.discard(bus)
                if upstream is not None:
                    self.connector.release(upstream, bus.clean and how == bus.ending)
            client.close()
            stats.connection_closed()
            if log.isEnabledFor(logging.INFO):
                _log_close(peer, how, time.monotonic() - started, bus)


def _peer(address: tuple) -> str:
    host, port = address[0], address[1]
    if host.startswith("::ffff:"):
        host = host[7:]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _log_close(peer: str, how: str, duration: float, bus: DataBus | None) -> None:
    if bus is None:
        log.info("%s: closed (%s) after %.3fs", peer, how, duration)
        return
    log.info(
        "%s: closed (%s) after %.3fs: client->server %d bytes %d msgs, server->client %d bytes %d msgs",
        peer,
        how,
        duration,
        bus.bytes_c2s,
        bus.lines_c2s,
        bus.bytes_s2c,
        bus.lines_s2c,
    )

"""Proxy: the gevent StreamServer that accepts clients and starts a DataBus each."""

from __future__ import annotations

import _socket
import logging
import socket as _stdsocket
import sys
import time
from functools import partial

from gevent.event import Event
from gevent.pool import Group
from gevent.server import StreamServer
from gevent.socket import socket

from fooproxy import sockops
from fooproxy.balancer import Balancer
from fooproxy.config import Config
from fooproxy.databus import INTERNAL, SHUT_DOWN, DataBus
from fooproxy.listeners import AcceptPause
from fooproxy.ratelimit import RepeatFilter
from fooproxy.stats import Stats
from fooproxy.upstream import Connector, HubConnect, UpstreamError

log = logging.getLogger("fooproxy.proxy")


def connector_for(config: Config, stats: Stats) -> Balancer:
    """The Connector of a config: a Balancer over its upstreams (a pool each with ``-pool-size``)."""
    return Balancer(config, stats)


class Proxy(StreamServer):
    """The Go tool's Proxy: here the gevent StreamServer that accepts clients on a
    pre-bound listener and gives each an upstream connection and a DataBus.

    The connector says how it connects (``connects_from_hub``): without a
    pool, the upstream is connected from the accept callback (at once when
    the server is on loopback: ``connect_now``; else on watchers, a
    ``HubConnect``) and the session runs on watchers (``DataBus``): no
    greenlet per client. With a pool (which may queue a client), a short-lived
    handler greenlet gets the upstream and exits once the session has started.
    Session state lives on the DataBus; what the close line needs (address,
    accept time) lives in the session's end callback. ``open_count`` counts
    clients from accept to close: at ``max_conns`` the server stops accepting
    and new clients wait in the kernel's backlog until one leaves.
    """

    def __init__(
        self,
        listener: socket,
        config: Config,
        stats: Stats,
        connector: Connector,
        max_accept: int | None = None,
    ) -> None:
        self.handlers = Group()
        # A bare spawn function (not a Pool): the limit is ours, over whole sessions.
        super().__init__(listener, spawn=self.handlers.spawn)
        if max_accept:
            self.max_accept = max_accept
        self.config = config
        self.stats = stats
        self.connector = connector
        #: Rate-limited warnings about clients that got no upstream (the stat is ``upstream_errors``).
        self.upstream_warnings = RepeatFilter(log)
        #: accept() out of descriptors: one warning per period, a short pause, no traceback.
        self.accept_pause = AcceptPause(self, log)
        self.sessions: set[DataBus] = set()
        #: Upstream connects in progress (from the hub), by client.
        self.connecting: dict[socket, HubConnect] = {}
        self.open_count = 0
        self._all_closed = Event()  # cleared by wait_closed, not per client (see there)
        self._all_closed.set()
        # TCP_NODELAY once, on the listener: Linux copies it into every socket
        # accept() returns (tested: tests/integration/test_proxy.py), which saves a
        # setsockopt per client. Whether this kernel does is asked of the first
        # client (``_nodelay``); where it does not, each client gets its own.
        self._nodelay_per_client = True
        try:
            listener.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            self._listener_nodelay = True
        except OSError:
            self._listener_nodelay = False
        # Decided once: the connector's kind does not change while we serve.
        self._from_hub = connector.connects_from_hub
        connector.prepare()

    # -- admission (BaseServer hooks) ----------------------------------------
    def full(self) -> bool:
        return self.open_count >= self.config.max_conns

    def start_accepting(self) -> None:
        """Watch the listener with our own accept callback, ``_accept_ready`` (not gevent's ``_do_read``)."""
        if self._watcher is None:
            self._watcher = self.loop.io(self.socket.fileno(), 1)
            self._watcher.start(self._accept_ready)

    def stop_accepting(self) -> None:
        super().stop_accepting()
        self.accept_pause.cancel()

    def _accept_ready(self) -> None:
        """The listener's io callback, in the hub: accept up to ``max_accept`` clients and start each.

        This replaces gevent's ``_do_read`` -> ``do_read`` -> ``do_handle`` chain,
        with the same admission, error handling and back-off, for what it cost per
        client: gevent wraps each accepted fd in a gevent socket (a Python
        ``__init__``, and later a Python close path), and goes through three more
        Python frames. A session only needs the fd (its libev watchers and
        non-blocking recv/send), so the client is the bare C socket
        (``_socket.socket``, made by ``sockops.accept``); ``_close_client`` closes it.
        """
        listener = self.socket  # non-blocking (gevent unwraps it at start)
        accepted = False
        for _ in range(self.max_accept):
            if self.open_count >= self.config.max_conns:  # full(): the backlog holds the next ones
                self.stop_accepting()
                break
            try:
                accepted_client = sockops.accept(listener)  # a bare, non-blocking socket, or None
            except InterruptedError:
                break  # a signal: the listener stays readable
            except OSError as exc:
                if not self.accept_pause.handles(exc):  # out of descriptors: pause, no traceback
                    self._accept_failed(self, read=True)
                break
            if accepted_client is None:
                break  # nobody else waiting
            client, address = accepted_client
            accepted = True
            self.open_count += 1
            try:
                if self._nodelay_per_client:
                    self._nodelay(client)
                if self._from_hub:
                    self._handle_in_hub(client, address)  # no greenlet at all: the common, unpooled case
                else:
                    StreamServer.do_handle(self, client, address)  # the pool may queue us: a handler greenlet
            except Exception:
                self._close_client(client)
                self._accept_failed((address, self), read=False)
                break
        if accepted:
            self.delay = self.min_delay  # as gevent: a successful accept ends the back-off

    def _accept_failed(self, context: object, read: bool) -> None:
        """gevent's handling of an unexpected accept (``read``) or start error: report, then back off or close."""
        exc = sys.exc_info()[1]
        self.loop.handle_error(context, *sys.exc_info())
        if read and self.is_fatal_error(exc):
            self.close()
            sys.stderr.write("ERROR: %s failed with %s\n" % (self, str(exc) or repr(exc)))
            return
        if self.delay >= 0:
            self.stop_accepting()
            self._timer = self.loop.timer(self.delay)
            self._timer.start(self._start_accepting_if_started)
            self.delay = min(self.max_delay, self.delay * 2)

    def _nodelay(self, client: _socket.socket) -> None:
        """TCP_NODELAY for a client while we do not know that it comes from the listener."""
        try:
            if self._listener_nodelay and client.getsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY):
                self._nodelay_per_client = False  # inherited (Linux): never again
                return
            self._listener_nodelay = False  # not inherited here: set it on each client, without asking
            client.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        except OSError:
            pass  # the client is already gone: the first read will say so

    def do_handle(self, client: socket, address: tuple) -> None:
        """gevent's hook (our accept callback does this itself): connect from here, or spawn ``handle``."""
        self.open_count += 1
        try:
            if self._from_hub:
                self._handle_in_hub(client, address)
            else:
                super().do_handle(client, address)
        except BaseException:
            self._close_client(client)
            raise

    def do_close(self, *args) -> None:
        """Called when ``handle`` returns: the session, not the handler, closes the client."""

    # -- per client --------------------------------------------------------------
    # A client is known by its address tuple until a line is logged: the "host:port"
    # string (``_peer``) is made only for the close line or a warning, not per client.
    def handle(self, client: socket, address: tuple) -> None:
        """Get an upstream for one client, in a greenlet, and start its session."""
        self.stats.connection_opened()
        started = time.monotonic()
        connector = self.connector  # a reload may replace it meanwhile: this session stays with this one
        try:
            upstream = connector.acquire()
        except UpstreamError as exc:
            self._no_upstream(client, address, started, exc)
            return
        except BaseException:  # killed by the drain while waiting
            self._close_client(client, address, SHUT_DOWN, started)
            raise
        self._begin(client, address, started, upstream, connector)

    def _handle_in_hub(self, client: socket, address: tuple) -> None:
        """Start the client's upstream connect from the accept callback; the session starts when it reports."""
        self.stats.connection_opened()
        started = time.monotonic()
        connector = self.connector  # a reload may replace it meanwhile: this session stays with this one
        upstream = connector.connect_now()  # connected at once (a server on this machine): no report to wait for
        if upstream is not None:
            self._begin(client, address, started, upstream, connector)
            return
        # The report goes to a bound method with the client's facts bound (a C-level
        # partial), not to a closure: one Python frame less per client.
        done = partial(self._upstream_reported, client, address, started, connector)
        try:
            connect = connector.connect_from_hub(done)
        except Exception:  # not a connect failure (those are reported): a bug, said once here
            log.exception("%s: cannot start the upstream connect", _peer(address))
            self._close_client(client, address, INTERNAL, started)
            return
        if not connect.finished:  # it may have reported already (a connect on this machine usually has)
            self.connecting[client] = connect

    def _upstream_reported(self, client: socket, address: tuple, started: float, connector: Connector,
                           upstream: socket | None, exc: UpstreamError | None) -> None:  # fmt: skip
        """``_handle_in_hub``'s connect reported, in the hub: start the session, or close the client."""
        self.connecting.pop(client, None)
        try:
            if upstream is not None:
                self._begin(client, address, started, upstream, connector)
            elif exc is not None:
                self._no_upstream(client, address, started, exc)
            else:  # cancelled by the drain
                self._close_client(client, address, SHUT_DOWN, started)
        except Exception:  # a bug: in the hub nobody else would close this client
            log.exception("%s: starting the session failed", _peer(address))
            if upstream is not None:
                upstream.close()
            self._close_client(client, address, INTERNAL, started)

    def _no_upstream(self, client: socket, address: tuple, started: float, exc: UpstreamError) -> None:
        self.stats.upstream_error()  # pool exhaustion too: either way the client got no upstream
        # Keyed by reason, so a burst of one does not hide the first report of the other.
        self.upstream_warnings.warn(exc.reason, "%s: %s" % (_peer(address), exc))
        self._close_client(client, address, exc.reason, started)

    def _begin(self, client: socket, address: tuple, started: float, upstream: socket, connector: Connector) -> None:
        config = self.config
        try:
            bus = DataBus(
                client,
                upstream,
                self.stats,
                linger=config.linger,
                idle_timeout=config.idle_timeout,
                keep_upstream=connector.reuses,
                messages_cell=connector.messages_cell(upstream),
                latency=config.latency,
            )
        except (OSError, ValueError) as exc:  # a socket closed under us (no fd to watch)
            connector.release(upstream, False)
            self._close_client(client, address, "error: %s" % exc, started)
            return
        self.sessions.add(bus)
        # The client's address, accept time and connector stay here, bound into the end
        # callback (a partial, not a lambda: no extra Python frame when it is called).
        bus.start(partial(self._session_ended, address, started, connector))

    def _session_ended(self, address: tuple, started: float, connector: Connector, bus: DataBus) -> None:
        """DataBus end callback, in the hub: release the upstream (to its own connector), close the client."""
        self.sessions.discard(bus)
        try:
            connector.release(bus.upstream, connector.reuses and bus.clean)  # clean: only a pool asks
        except Exception:  # a bug of ours: the client is still closed and counted below
            log.exception("%s: releasing the upstream failed", _peer(address))
            bus.upstream.close()
            bus.ending = INTERNAL
        self._close_client(bus.client, address, bus.ending, started, bus)

    def _close_client(self, client: socket, address: tuple | None = None, how: str | None = None,
                      started: float = 0.0, bus: DataBus | None = None) -> None:  # fmt: skip
        """Close one client and do its accounting: gauge, close line, open count, resume accepting.

        ``address`` None: a client not counted as opened yet (closed on the way in).
        """
        sockops.close(client)
        if how == INTERNAL:
            self.stats.internal_error()
        if address is not None:
            self.stats.connection_closed()
            if log.isEnabledFor(logging.INFO):
                _log_close(_peer(address), how or "?", time.monotonic() - started, bus)
        self.open_count -= 1
        if self.open_count <= 0:
            self._all_closed.set()
        elif self.open_count == self.config.max_conns - 1 and self.started:
            self.start_accepting()  # a place is free again (a no-op if still accepting)

    # -- reload --------------------------------------------------------------------
    def reconfigure(self, config: Config, connector: Connector | None = None) -> None:
        """A reload: new sessions get ``config``'s limits and timeouts, and ``connector`` if given.

        Open sessions keep their upstream connection and the connector they
        got it from (released to it when they end); the old connector is
        retired: it closes once its last session has.
        """
        old = self.connector
        self.config = config
        if connector is not None and connector is not old:
            connector.prepare()
            self.connector = connector
            old.retire()
        self._from_hub = self.connector.connects_from_hub  # a Balancer updated in place may now pool
        if self.started and not self.full():
            self.start_accepting()  # a higher -max-conns: take the clients waiting in the backlog

    # -- drain ---------------------------------------------------------------------
    def drain(self, grace: float) -> None:
        """Stop accepting; let open sessions finish within ``grace``, then end them."""
        self.close()  # stops accepting and closes the listener
        open_now = len(self.sessions)
        if open_now:
            log.info("draining %d open session(s) for up to %gs", open_now, grace)
        if not self.wait_closed(grace):
            log.warning("grace period over: closing %d session(s)", self.open_count)
            self.close_sessions()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until every client is closed; False if ``timeout`` ran out first."""
        if self.open_count <= 0:
            return True
        # Cleared here, by a waiter, not at each accept (a call per client); the
        # close that brings the count to 0 sets it.
        self._all_closed.clear()
        return self._all_closed.wait(timeout)

    def close_sessions(self) -> None:
        """End every session and handler now (the grace period is over)."""
        self.handlers.kill(timeout=1)
        for connect in list(self.connecting.values()):
            connect.cancel()
        for bus in list(self.sessions):
            bus.abort()


def _peer(address: tuple) -> str:
    host, port = address[0], address[1]
    if host.startswith("::ffff:"):
        host = host[7:]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _log_close(peer: str, how: str, duration: float, bus: DataBus | None) -> None:
    # One dict, logging's mapping form: the text line's arguments and -log-format json's fields (fooproxy.jsonlog).
    if bus is None:
        log.info("%(peer)s: closed (%(ended)s) after %(duration_s).3fs",
                 {"peer": peer, "duration_s": round(duration, 6), "ended": how})  # fmt: skip
        return
    timer = bus.timer
    log.info(
        "%(peer)s: closed (%(ended)s) after %(duration_s).3fs: client->server %(bytes_c2s)d bytes %(msgs_c2s)d msgs,"
        " server->client %(bytes_s2c)d bytes %(msgs_s2c)d msgs",
        {
            "peer": peer,
            "duration_s": round(duration, 6),
            "ended": how,
            "bytes_c2s": bus.bytes_c2s,
            "bytes_s2c": bus.bytes_s2c,
            "msgs_c2s": bus.lines_c2s,
            "msgs_s2c": bus.lines_s2c,
            "latency_max_ms": round(timer.max_s * 1e3, 3) if timer is not None else None,
        },
    )

"""Dispatcher: one fooproxy process serving clients itself (no ``-workers``).

The Go tool's Dispatcher wired the proxy and its services; here it composes a
``Proxy`` (with its ``Connector``) and the shared ``Services`` (HTTP, recovery,
health checker, SIGUSR2, stop signals). A worker composes the same two
(``worker.py``); the master of ``-workers N`` composes the Services with a
Supervisor instead (``supervisor.py``).
"""

from __future__ import annotations

import dataclasses

import gevent

from fooproxy.config import Config
from fooproxy.configfile import ConfigSource
from fooproxy.listeners import bind
from fooproxy.proxy import Proxy, connector_for
from fooproxy.reload import Reloader, changes, keep_restart_only, read_config
from fooproxy.services import Services, bound, exit_now, stop_signals
from fooproxy.stats import Snapshot, Stats

#: Settings the Balancer applies in place (``Balancer.update``): upstreams, their connectors and checks.
BALANCER_FIELDS = ("forward", "balance", "connect_retries", "max_fails", "connect_timeout",
                   "pool_size", "pool_wait", "pool_idle", "health_interval", "http")  # fmt: skip


class Dispatcher:
    """The Go tool's Dispatcher: here one proxy process (no ``-workers``), a Proxy
    plus the Services, run until a stop signal."""

    def __init__(self, config: Config, stats: Stats | None = None, source: ConfigSource | None = None) -> None:
        self.config = config
        #: The command line and ``-config`` file the config came from (None: built in code, as tests do).
        self.source = source
        self.stats = stats or Stats()
        self.connector = connector_for(config, self.stats)
        self.services = Services(config, self.stats, upstreams=self.connector)
        self.proxy: Proxy | None = None
        self.services.reloader = Reloader(self.reload)

    def snapshot(self) -> Snapshot:
        """The stats as SIGUSR2 and /stats show them."""
        return self.services.snapshot()

    @property
    def address(self) -> tuple:
        """The bound listen address (useful with port 0)."""
        assert self.proxy is not None
        return self.proxy.address

    @property
    def draining(self) -> bool:
        return self.services.draining

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Bind and start serving; raises StartupError with a one-line reason."""
        services = self.services
        signals = stop_signals(self.request_stop, services.print_stats, reload=services.reloader.request)
        where = services.start(self._serve, signals)
        services.announce(where)

    def _serve(self) -> str:
        listener = bind(self.config.listen)
        self.proxy = Proxy(listener, self.config, self.stats, self.connector)
        self.proxy.start()
        return bound(self.proxy.socket)

    def run(self) -> int:
        """Start, serve until a stop signal, drain; return the exit status."""
        self.start()
        return self.services.wait(self.shutdown)

    def request_stop(self, *_signal_args) -> None:
        """First TERM/INT: drain in a new greenlet. Second: exit at once."""
        if self.services.draining:
            exit_now("second stop signal: exiting now")
        gevent.spawn(self.shutdown)

    def shutdown(self) -> None:
        """Stop accepting, let sessions finish within the grace period, then stop. Idempotent."""
        self.services.shutdown(self._drain)

    def reload(self) -> str:
        """SIGHUP (through the Reloader): re-read the config file and apply it in place.

        Raises ``ConfigError`` when the new settings do not validate: then
        nothing has changed. Returns what changed, for the reload line.
        """
        if self.services.draining or self.proxy is None:
            return "not applied: shutting down"
        old = self.config
        new, notes = keep_restart_only(old, read_config(self.source, old))
        notes += self.services.reconfigure(new)
        new = dataclasses.replace(new, http=self.services.config.http, http_allow=self.services.config.http_allow)
        if any(getattr(old, name) != getattr(new, name) for name in BALANCER_FIELDS):
            notes += self.connector.update(new)  # upstreams added and removed in place; sessions stay
        self.proxy.reconfigure(new)  # in the same hub turn: the Proxy asks for connections the new way
        self.config = new
        self.connector.prepare()  # resolve new upstreams (may yield: everything is consistent now)
        return "; ".join(changes(old, new) + notes)

    def _drain(self) -> None:
        if self.proxy is not None:
            self.proxy.drain(self.config.grace)
        self.connector.close()  # after the sessions: closes pooled idle connections

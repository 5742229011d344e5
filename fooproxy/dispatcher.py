"""Dispatcher: one fooproxy process serving clients itself (no ``-workers``).

The Go tool's Dispatcher wired the proxy and its services; here it composes a
``Proxy`` (with its ``Connector``) and the shared ``Services`` (HTTP, recovery,
health checker, SIGUSR2, stop signals). A worker composes the same two
(``worker.py``); the master of ``-workers N`` composes the Services with a
Supervisor instead (``supervisor.py``).
"""

from __future__ import annotations

import gevent

from fooproxy.config import Config
from fooproxy.configfile import ConfigSource
from fooproxy.listeners import bind
from fooproxy.proxy import Proxy, connector_for
from fooproxy.services import Services, bound, exit_now, stop_signals
from fooproxy.stats import Snapshot, Stats


class Dispatcher:
    """The Go tool's Dispatcher: here one proxy process (no ``-workers``), a Proxy
    plus the Services, run until a stop signal."""

    def __init__(self, config: Config, stats: Stats | None = None, source: ConfigSource | None = None) -> None:
        self.config = config
        #: The command line and ``-config`` file the config came from (None: built in code, as tests do).
        self.source = source
        self.stats = stats or Stats()
        self.connector = connector_for(config, self.stats)
        self.services = Services(config, self.stats)
        self.proxy: Proxy | None = None

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
        where = services.start(self._serve, stop_signals(self.request_stop, services.print_stats))
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

    def _drain(self) -> None:
        if self.proxy is not None:
            self.proxy.drain(self.config.grace)
        self.connector.close()  # after the sessions: closes pooled idle connections

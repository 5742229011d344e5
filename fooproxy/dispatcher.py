"""Dispatcher: wires the proxy, stats, HTTP, recovery and signals from a Config."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from fooproxy import recovery
from fooproxy.config import Config
from fooproxy.health import Health, UpstreamChecker
from fooproxy.http import HttpServer, make_app
from fooproxy.listeners import bind
from fooproxy.pool import UpstreamPool
from fooproxy.proxy import Proxy
from fooproxy.stats import Snapshot, Stats
from fooproxy.upstream import Connector

log = logging.getLogger("fooproxy")


class StatsPrinter:
    """Writes one JSON line of stats to stdout per call, in order, off the hub.

    The write runs in the threadpool: a reader that stops reading our stdout
    pipe must not freeze the proxy. The lock keeps lines whole and in order.
    """

    def __init__(self, get_snapshot: Callable[[], Snapshot], stream=None) -> None:
        self.get_snapshot = get_snapshot
        self.stream = stream or sys.stdout
        self.closed = False
        self._lock = Semaphore()

    def __call__(self, *_signal_args) -> None:
        with self._lock:
            line = json.dumps(self.get_snapshot().as_dict()) + "\n"
            gevent.get_hub().threadpool.apply(self._write, (line,))

    def _write(self, line: str) -> None:
        if self.closed:
            return
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError) as exc:
            # The reader went away (`fooproxy | head -1`): keep proxying, say so once,
            # and point stdout at /dev/null so the flush at exit cannot fail either.
            self.closed = True
            log.warning("stdout is closed (%s): SIGUSR2 stats are no longer printed; use /stats", exc)
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


class Dispatcher:
    """Runs one proxy process until told to stop."""

    def __init__(
        self,
        config: Config,
        stats: Stats | None = None,
        snapshot_source: Callable[[], Snapshot] | None = None,
    ) -> None:
        self.config = config
        #: The block this process writes (a worker's slot; the master's "base" slot for restores).
        self.stats = stats or Stats()
        #: What SIGUSR2, HTTP and recovery read, if not ``stats`` alone (the master: all slots summed).
        self.snapshot_source = snapshot_source
        self.connector: Connector
        if config.pool_size > 0:
            self.connector = UpstreamPool(
                config.forward,
                config.connect_timeout,
                config.pool_size,
                config.pool_wait,
                config.pool_idle,
                on_change=self._pool_gauges,
            )
        else:
            self.connector = Connector(config.forward, config.connect_timeout)
        self.proxy: Proxy | None = None
        self.http: HttpServer | None = None
        self.saver: recovery.Saver | None = None
        self.recovery_lock: recovery.RecoveryLock | None = None
        self.checker: UpstreamChecker | None = None
        self.draining = False
        self._stopped = Event()
        self._signals: list = []
        self.print_stats = StatsPrinter(self.snapshot)

    def snapshot(self) -> Snapshot:
        """The stats as SIGUSR2 and /stats show them."""
        if self.snapshot_source is not None:
            return self.snapshot_source()
        return self.stats.snapshot()

    def _pool_gauges(self, idle: int, open_: int) -> None:
        self.stats.set("pool_idle", idle)
        self.stats.set("pool_open", open_)

    # -- lifecycle ----------------------------------------------------------
    def start(self, serve_proxy: bool = True) -> None:
        """Bind and start serving; raises StartupError with a one-line reason.

        Binds happen before anything is written, so a second instance that
        finds its ports busy leaves the first one's recovery file alone.
        """
        cfg = self.config
        if cfg.recovery_path:
            # Before anything reads or moves the file: a second instance stops here (exit 1).
            self.recovery_lock = recovery.lock(cfg.recovery_path, log)
            saved = recovery.load(cfg.recovery_path, log)  # blocking, but only at start
            if saved is not None:
                self.stats.restore(saved)
                log.info("restored stats from %s: %d messages", cfg.recovery_path, saved.as_dict()["msg_total"])
            self.saver = recovery.Saver(cfg.recovery_path, self.snapshot, logger=log)
        self.checker = UpstreamChecker(
            cfg.forward, cfg.health_interval, timeout=min(cfg.connect_timeout, cfg.health_interval), logger=log
        )
        health = Health(self.checker, self.saver, is_draining=lambda: self.draining)
        if cfg.http:
            app = make_app(self.snapshot, health, get_extra=health.gauges)
            self.http = HttpServer(cfg.http, app, logger=log, allow=cfg.http_allow)
            self.http.start()
        self._install_signals()
        where = self.serve() if serve_proxy else "(no proxy)"
        if cfg.http:
            self.checker.start()
        if self.saver is not None:
            self.saver.start()
        self.announce(where)

    def serve(self) -> str:
        """Bind and start accepting clients; return the address, for the log line.

        The hook a worker (shared port) and the master (no proxy: workers) override.
        """
        listener = bind(self.config.listen)
        self.proxy = Proxy(listener, self.config, self.stats, self.connector)
        self.proxy.start()
        return _bound(self.proxy.socket)

    def announce(self, where: str) -> None:
        """Log the readiness line (harnesses wait for "listening on")."""
        cfg = self.config
        log.info(
            "fooproxy %s listening on %s, forwarding to %s, http %s, recovery %s (pid %d)",
            _version(),
            where,
            cfg.forward,
            self.http.address if self.http else "off",
            cfg.recovery_path or "off",
            os.getpid(),
        )

    @property
    def address(self) -> tuple:
        """The bound listen address (useful with port 0)."""
        assert self.proxy is not None
        return self.proxy.address

    def run(self) -> int:
        """Start, serve until a stop signal, drain; return the exit status."""
        self.start()
        try:
            self._stopped.wait()
        except KeyboardInterrupt:  # SIGINT can still arrive this way (gevent #298)
            self.shutdown()
            self._stopped.wait()
        return 0

    def request_stop(self, *_signal_args) -> None:
        """First TERM/INT: drain in a new greenlet. Second: exit at once."""
        if self.draining:
            log.warning("second stop signal: exiting now")
            sys.stderr.flush()
            os._exit(1)
        gevent.spawn(self.shutdown)

    def shutdown(self) -> None:
        """Stop accepting, let sessions finish within the grace period, then stop. Idempotent."""
        if self.draining:
            return
        self.draining = True
        if self.http is not None:
            self.http.drain()
        self.drain()
        self.connector.close()  # after the sessions: closes pooled idle connections
        if self.checker is not None:
            self.checker.stop()
        if self.http is not None:
            self.http.stop(timeout=1)
        if self.saver is not None:
            self.saver.stop()
            self.saver.save_now()
        if self.recovery_lock is not None:
            self.recovery_lock.release()
        for handler in self._signals:
            handler.cancel()
        log.info("stopped")
        self._stopped.set()

    def drain(self) -> None:
        """Stop accepting; let open sessions finish within the grace period (the master: stop the workers)."""
        proxy = self.proxy
        if proxy is not None:
            proxy.close()  # stops accepting and closes the listener
            open_now = len(proxy.sessions)
            if open_now:
                log.info("draining %d open session(s) for up to %gs", open_now, self.config.grace)
            if not proxy.wait_closed(self.config.grace):
                log.warning("grace period over: closing %d session(s)", proxy.open)
                proxy.close_sessions()

    def _install_signals(self) -> None:
        # Installed before the server starts: SIGUSR2's default action kills.
        self._signals = [
            gevent.signal_handler(signal.SIGUSR2, self.print_stats),
            gevent.signal_handler(signal.SIGTERM, self.request_stop),
            gevent.signal_handler(signal.SIGINT, self.request_stop),
        ]


def _bound(sock) -> str:
    host, port = sock.getsockname()[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _version() -> str:
    from fooproxy import __version__

    return __version__

"""Services: what every kind of fooproxy process runs beside its own job.

A single process and a worker run a Proxy, the master of ``-workers N`` runs
the Supervisor; each of them composes one ``Services`` (it subclasses none of
them): the recovery file (restore at start, the ``Saver``), the HTTP server
(``/health``, ``/stats``, ``/metrics``, the live page and its one-second
samples, ``dashboard.LiveSamples``), the upstream health checker, the
SIGUSR2 stats printer, and the stop signals. ``Services`` also owns the
process's lifecycle: ``start``/``run`` wait for a stop, ``shutdown`` drains
the job, then stops the services in order. The job is two callables:
``serve()`` binds and starts it (returns the address for the log line) and
``drain()`` stops it within the grace period.

A service the config turns off (a worker has no HTTP and no recovery file:
its master serves those) is simply absent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from fooproxy import recovery, sdnotify
from fooproxy.config import Config
from fooproxy.dashboard import LiveSamples
from fooproxy.health import CheckerGroup, Health, UpstreamView
from fooproxy.http import HttpServer, make_app
from fooproxy.listeners import StartupError
from fooproxy.reload import Reloader
from fooproxy.stats import Snapshot, Stats

log = logging.getLogger("fooproxy")

#: A signal handler as ``gevent.signal_handler`` calls it.
Handler = Callable[..., None]


class StatsPrinter:
    """Writes one JSON line of stats to stdout per call, in order, off the hub.

    The write runs in the threadpool: a reader that stops reading our stdout
    pipe must not freeze the proxy. The lock keeps lines whole and in order.
    Started with stdout closed (``fooproxy ... >&-``), Python has no
    ``sys.stdout`` at all (None): the first SIGUSR2 says so once, and the
    proxy keeps serving.
    """

    def __init__(self, get_snapshot: Callable[[], Snapshot], stream=None) -> None:
        self.get_snapshot = get_snapshot
        self.stream = stream if stream is not None else sys.stdout
        self.closed = False
        self._lock = Semaphore()

    def __call__(self, *_signal_args) -> None:
        if self.stream is None:
            if not self.closed:
                self.closed = True
                log.warning("stdout is closed (started without one): SIGUSR2 stats are not printed; use /stats")
            return
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


def exit_now(message: str) -> None:
    """Leave at once, without draining (a second stop signal)."""
    log.warning("%s", message)
    sys.stderr.flush()
    os._exit(1)


class Services:
    """The shared services of one process and its start/stop sequence (see the module doc)."""

    def __init__(self, config: Config, stats: Stats, snapshot: Callable[[], Snapshot] | None = None,
                 upstreams: UpstreamView | None = None) -> None:  # fmt: skip
        self.config = config
        #: The upstreams' states for /health: the job's Balancer (which checks them), or None: the
        #: Services check them itself (``CheckerGroup``; the master of ``-workers``, which has no Balancer).
        self.upstreams = upstreams
        #: The block this process writes (restores go here).
        self.stats = stats
        #: What SIGUSR2, HTTP and recovery read (the master: every slot summed).
        self.snapshot = snapshot or stats.snapshot
        self.http: HttpServer | None = None
        self.saver: recovery.Saver | None = None
        self.recovery_lock: recovery.RecoveryLock | None = None
        self.checker: CheckerGroup | None = None
        self.health: Health | None = None
        #: The live page's samples, while HTTP is on (kept across an HTTP rebind: its history stays).
        self.live: LiveSamples | None = None
        #: Set by the job when it reloads on SIGHUP (``reload.Reloader``); stopped at shutdown.
        self.reloader: Reloader | None = None
        #: Whether to restore a saved snapshot (the master says no when its adopted table holds it already).
        self.keep_saved: Callable[[Snapshot], bool] = lambda _saved: True
        #: Run after the final save, with its success (the master removes its table file then).
        self.after_final_save: Callable[[bool], None] | None = None
        self.print_stats = StatsPrinter(self.shown_snapshot)
        self.draining = False
        self._stopped = Event()
        self._signals: list = []

    def shown_snapshot(self) -> Snapshot:
        """The snapshot SIGUSR2, ``/stats`` and ``/metrics`` show, once the recovery file holds as much.

        Blocks the calling greenlet (a signal's or a request's, never the hub) for one
        shared save, at most a second; see ``recovery.Saver.durable``.
        """
        snap = self.snapshot()
        if self.saver is not None:
            self.saver.durable()
        return snap

    # -- lifecycle ----------------------------------------------------------
    def start(self, serve: Callable[[], str], signals: dict[int, Handler]) -> str:
        """Restore, bind HTTP, install ``signals``, ``serve()`` the job, start the timers.

        Raises StartupError with a one-line reason. Binds happen before
        anything is written, so a second instance that finds its ports busy
        leaves the first one's recovery file alone. Returns what ``serve`` did.
        """
        cfg = self.config
        if cfg.recovery_path:
            # Before anything reads or moves the file: a second instance stops here (exit 1).
            if self.recovery_lock is None:  # the master takes it earlier (it guards its table file too)
                self.recovery_lock = recovery.lock(cfg.recovery_path, log)
            saved = recovery.load(cfg.recovery_path, log)  # blocking, but only at start
            if saved is not None and self.keep_saved(saved):
                self.stats.restore(saved)
                log.info("restored stats from %s: %d messages", cfg.recovery_path, saved.as_dict()["msg_total"])
            self.saver = recovery.Saver(cfg.recovery_path, self.snapshot, logger=log)
        if cfg.http:
            self.http = self._http_server(cfg)
            self.http.start()
        # Installed before the job starts: SIGUSR2's default action kills.
        self._signals = [gevent.signal_handler(signum, handler) for signum, handler in signals.items()]
        where = serve()
        if self.checker is not None:
            self.checker.start()
        if self.saver is not None:
            self.saver.start()
        if self.live is not None:
            self.live.start()
        return where

    def _http_server(self, cfg: Config) -> HttpServer:
        """The HTTP server for ``cfg`` (not started), with its health checker (not started either)."""
        assert cfg.http is not None
        if self.upstreams is None:
            self.checker = self._checker(cfg)
        self.health = Health(
            None,
            self.saver,
            upstreams=self.upstreams or self.checker,
            is_draining=lambda: self.draining,
            internal_errors=lambda: self.snapshot().totals.get("errors_internal", 0),
        )
        if self.live is None:
            self.live = LiveSamples(
                lambda: self.snapshot().as_dict(),
                lambda: self.health.gauges() if self.health is not None else {},
                info={"version": _version(), "workers": cfg.workers},
                logger=log,
            )
        app = make_app(self.shown_snapshot, self.health, get_extra=self.health.gauges, live=self.live)
        return HttpServer(cfg.http, app, logger=log, allow=cfg.http_allow)

    @staticmethod
    def _checker(cfg: Config) -> CheckerGroup:
        timeout = min(cfg.connect_timeout, cfg.health_interval)
        return CheckerGroup(cfg.forward, cfg.health_interval, timeout=timeout, logger=log)

    def use_upstreams(self, view: UpstreamView) -> None:
        """/health reads the upstreams from ``view`` from now on (a reload's Balancer)."""
        self.upstreams = view
        if self.health is not None:
            self.health.upstreams = view

    # -- reload -------------------------------------------------------------
    def reconfigure(self, new: Config) -> list[str]:
        """A reload: apply the services' part of ``new`` (log level, health checker, HTTP).

        HTTP on a new address is bound before the old server stops; if the
        bind fails, HTTP stays where it is and the returned note says why.
        Returns notes for the reload line.
        """
        old = self.config
        notes: list[str] = []
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
        if new.http != old.http:
            if not self._rebind_http(new, notes):
                new = dataclasses.replace(new, http=old.http, http_allow=old.http_allow)
        elif self.http is not None:
            self.http.allow = new.http_allow
            checked = ("forward", "health_interval", "connect_timeout")
            if any(getattr(old, f) != getattr(new, f) for f in checked):
                self._replace_checker(new)
        self.config = new
        return notes

    def _rebind_http(self, new: Config, notes: list[str]) -> bool:
        old_http, old_checker = self.http, self.checker
        if new.http is None:
            self.http = self.checker = self.health = None
        else:
            try:
                server = self._http_server(new)
                server.start()
            except (StartupError, OSError) as exc:
                self.http, self.checker = old_http, old_checker
                notes.append("http refused: %s (kept %s)" % (exc, old_http.address if old_http else "off"))
                return False
            self.http = server
            if self.checker is not None:
                self.checker.start()
            if self.live is not None:
                self.live.start()
        if old_checker is not None:
            old_checker.stop()
        if old_http is not None:
            old_http.drain()
            gevent.spawn(old_http.stop, timeout=1)
        return True

    def _replace_checker(self, new: Config) -> None:
        if self.upstreams is not None:
            return  # the Balancer checks its upstreams and applies the reload itself
        old, self.checker = self.checker, self._checker(new)
        assert self.health is not None
        self.health.upstreams = self.checker
        self.checker.start()
        if old is not None:
            old.stop()

    def wait(self, shutdown: Callable[[], None]) -> int:
        """Block until a shutdown has finished; the exit status."""
        try:
            self._stopped.wait()
        except KeyboardInterrupt:  # SIGINT can still arrive this way (gevent #298)
            shutdown()
            self._stopped.wait()
        return 0

    def shutdown(self, drain: Callable[[], None]) -> None:
        """Stop HTTP accepting, ``drain()`` the job, stop the services, save. Idempotent."""
        if self.draining:
            return
        self.draining = True
        sdnotify.notify("STOPPING=1")
        if self.reloader is not None:
            self.reloader.stop()
        if self.http is not None:
            self.http.drain()
        drain()
        if self.checker is not None:
            self.checker.stop()
        if self.live is not None:
            self.live.stop()  # the live pages' streams end here, so they do not hold up HTTP's stop
        if self.http is not None:
            self.http.stop(timeout=1)
        if self.saver is not None:
            self.saver.stop()
            saved = self.saver.save_now()
            if self.after_final_save is not None:
                self.after_final_save(saved)
        if self.recovery_lock is not None:
            self.recovery_lock.release()
        for handler in self._signals:
            handler.cancel()
        # A signal from here to the exit must not kill a process that is leaving cleanly.
        ignore_harmless_signals()
        log.info("stopped")
        self._stopped.set()

    def announce(self, where: str) -> None:
        """Log the readiness line (harnesses wait for "listening on")."""
        cfg = self.config
        log.info(
            "fooproxy %s listening on %s, forwarding to %s, http %s, recovery %s (pid %d)",
            _version(),
            where,
            ",".join(str(a) for a in cfg.forward) + (" (%s)" % cfg.balance if len(cfg.forward) > 1 else ""),
            self.http.address if self.http else "off",
            cfg.recovery_path or "off",
            os.getpid(),
        )
        # Type=notify: systemd starts what depends on us only now, with the port accepting.
        sdnotify.notify("READY=1\nMAINPID=%d" % os.getpid())


def stop_signals(
    request_stop: Handler, print_stats: Handler, reload: Callable[[], None] | None = None
) -> dict[int, Handler]:
    """The signals of a process that answers to the operator: TERM/INT stop, USR2 prints the stats,
    HUP reloads, USR1 is logged and ignored (see ``harmless_signals``)."""
    return {
        signal.SIGUSR2: print_stats,
        signal.SIGTERM: request_stop,
        signal.SIGINT: request_stop,
        **harmless_signals(reload),
    }


# -- SIGUSR1 and SIGHUP: never fatal ---------------------------------------------------
# Their default action terminates, without a drain or the final save (issue 16).
# ``__main__`` ignores them from the first statement on; these handlers replace
# that. ``no_reload`` is the SIGHUP hook until a real reload is wired in: the
# one place a reload implementation replaces.
SIGNALS_HELP = "SIGUSR2 prints the stats, SIGTERM/SIGINT stop (drain, save), SIGHUP reloads"


def no_reload() -> None:
    """The reload hook of a build without reload: SIGHUP changes nothing, and says so."""
    log.warning("reload is not supported in this build: nothing changed")


def harmless_signals(reload: Callable[[], None] | None = None) -> dict[int, Handler]:
    """SIGUSR1 (logged, ignored) and SIGHUP (logged, then ``reload()``; default ``no_reload``)."""
    hook = reload or no_reload

    def on_sigusr1(*_signal_args) -> None:
        log.warning("SIGUSR1 ignored (pid %d): %s", os.getpid(), SIGNALS_HELP)

    def on_sighup(*_signal_args) -> None:
        log.warning("SIGHUP: reload ... (pid %d)", os.getpid())
        hook()

    return {signal.SIGUSR1: on_sigusr1, signal.SIGHUP: on_sighup}


def ignore_harmless_signals() -> None:
    """Back to SIG_IGN for the signals that must never kill (gevent's cancel restores SIG_DFL)."""
    for signum in (signal.SIGUSR2, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def bound(sock) -> str:
    """``host:port`` (``[v6]:port``) a socket is bound to, for log lines."""
    host, port = sock.getsockname()[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _version() -> str:
    from fooproxy import __version__

    return __version__

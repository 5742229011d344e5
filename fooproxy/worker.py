"""Worker: one of the N processes of ``-workers N``; it serves clients on the shared port.

Started by the master (``supervisor.py``) by fork+exec as
``python -m fooproxy <the master's flags> --worker-id=SLOT``, with the shared
``SlotTable``'s descriptor and its position's listening socket passed
through. A worker composes a ``Proxy`` on that socket (one SO_REUSEPORT socket
per worker position, bound once by the master and kept across reloads, so
the kernel balances new connections across the positions and a rolling
reload never closes a listen queue; see ``supervisor.py``) with the shared
``Services``, minus HTTP and the recovery file (the master serves those over
the summed slots). It writes its stats into its slot's block and stamps its
slot's heartbeat every ``HEARTBEAT_INTERVAL``; the first stamp, right after it
starts accepting, tells the master it is ready. On SIGTERM it stops
accepting (the socket stays open in the master, for the worker that takes
its place) and drains its sessions within ``-grace``.

All of a worker's signal behaviour is here:

* before exec (``worker_preexec``, run by the master in the forked child):
  SIGINT and SIGUSR2 ignored, so a terminal's Ctrl-C, which reaches the whole
  process group, is handled once, by the master, and SIGUSR2 goes to the
  master, whose line has the totals of all workers; SIGUSR1 and SIGHUP
  ignored too until the worker's handlers log them (they must never kill); PR_SET_PDEATHSIG makes
  the kernel send SIGTERM when the master dies;
* SIGTERM means "drain" however often it comes: a SIGTERM to the whole
  process group (``kill -TERM -PGID``, systemd's default KillMode) reaches
  each worker twice, directly and forwarded by the master, and must not count
  as "second signal, exit now";
* SIGQUIT (from the master, after its second stop signal) exits at once;
* SIGABRT (from the master, when the heartbeat stopped) is left to
  ``faulthandler``: a traceback of every thread on stderr, then the abort.

Each heartbeat also checks ``getppid()``, in case the master died before the
death signal was set up.
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import logging
import os
import signal
import sys
import time

import gevent
from gevent import socket

from fooproxy.config import Config
from fooproxy.listeners import StartupError
from fooproxy.proxy import Proxy, connector_for
from fooproxy.services import Services, bound, harmless_signals
from fooproxy.stats import SlotTable, Stats

log = logging.getLogger("fooproxy.workers")

#: Internal: how the master tells a worker where the table is and who its master is.
SHM_FD_ENV = "FOOPROXY_WORKER_SHM_FD"
MASTER_PID_ENV = "FOOPROXY_MASTER_PID"
LISTEN_FD_ENV = "FOOPROXY_WORKER_LISTEN_FD"
HEARTBEAT_INTERVAL = 0.5  # seconds between a worker's heartbeat stamps
_PR_SET_PDEATHSIG = 1

try:
    # Loaded in the master, before any fork: the child only calls it.
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):
    _libc = _prctl = None


def worker_preexec() -> None:
    """In the forked child, before exec: the signal dispositions a worker starts with.

    SIG_IGN survives exec (a handler would not), so a Ctrl-C or a SIGUSR2 that
    arrives while the worker is still importing cannot kill it; and Python
    keeps an ignored SIGINT ignored (no KeyboardInterrupt).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGUSR2, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def worker_reload() -> None:
    """A worker's SIGHUP hook: reloading is the master's job (a worker's flags come from it)."""
    log.warning("a worker does not reload: send SIGHUP to the master")


class Worker:
    """One worker process: a Proxy on the shared port, stats in its slot, a heartbeat."""

    def __init__(self, config: Config, table: SlotTable, master_pid: int, listen_fd: int) -> None:
        assert config.worker_id is not None
        self.config = config
        self.slot = config.worker_id
        self.table = table
        self.master_pid = master_pid
        self.listen_fd = listen_fd
        self.stats = Stats(block=table.blocks[self.slot])
        self.connector = connector_for(config, self.stats)
        self.services = Services(config, self.stats)
        self.proxy: Proxy | None = None
        self._heartbeat: gevent.Greenlet | None = None

    def run(self) -> int:
        """Serve until SIGTERM (drain) or SIGQUIT (exit now); return the exit status."""
        # SIGUSR2 stays ignored (the master prints the totals); USR1 and HUP are logged.
        signals = {signal.SIGTERM: self.request_stop, signal.SIGQUIT: self.exit_now, **harmless_signals(worker_reload)}
        where = self.services.start(self._serve, signals)
        # Not "listening on": harnesses wait for the master's line, which comes
        # once all workers are ready.
        log.info("worker %d serving on %s (pid %d)", self.slot, where, os.getpid())
        return self.services.wait(self.shutdown)

    def _serve(self) -> str:
        cfg = self.config
        # The master's socket for this position, already listening (one per position: balanced).
        listener = socket.socket(fileno=self.listen_fd)
        self.proxy = Proxy(listener, cfg, self.stats, self.connector, max_accept=1)
        self.proxy.start()
        self.table.beat(self.slot, time.monotonic_ns())  # ready: the master may announce
        self._heartbeat = gevent.spawn(self._beat)
        return bound(listener)

    def request_stop(self, *_signal_args) -> None:
        """SIGTERM: drain. Repeats are no-ops (a group SIGTERM arrives twice, see the module doc)."""
        if not self.services.draining:
            gevent.spawn(self.shutdown)

    def shutdown(self) -> None:
        self.services.shutdown(self._drain)

    def _drain(self) -> None:
        if self.proxy is not None:
            self.proxy.drain(self.config.grace)
        self.connector.close()
        self.stats.flush()  # the last sessions' latencies, for the master's last reading

    def exit_now(self, *_signal_args) -> None:
        """SIGQUIT from the master (it got a second stop signal): exit without draining."""
        log.warning("worker %d: exiting now", self.slot)
        sys.stderr.flush()
        os._exit(1)

    def _beat(self) -> None:
        """Stamp the heartbeat; stop when the master is gone."""
        while True:
            gevent.sleep(HEARTBEAT_INTERVAL)
            self.stats.flush()  # the latency counts the master reads
            self.table.beat(self.slot, time.monotonic_ns())
            if os.getppid() != self.master_pid and not self.services.draining:
                log.warning("worker %d: master (pid %d) is gone; stopping", self.slot, self.master_pid)
                self.request_stop()


def run_worker(config: Config) -> int:
    """Entry point of ``fooproxy --worker-id N`` (started by a master, never by hand)."""
    try:
        fd = int(os.environ.pop(SHM_FD_ENV))
        master_pid = int(os.environ.pop(MASTER_PID_ENV))
        listen_fd = int(os.environ.pop(LISTEN_FD_ENV))
    except (KeyError, ValueError):
        raise StartupError("--worker-id is internal: run -workers N and the master starts the workers") from None
    assert config.worker_id is not None
    if os.getppid() != master_pid:
        raise StartupError("worker %d: the master (pid %d) is already gone" % (config.worker_id, master_pid))
    table = SlotTable.attach(fd)
    if config.worker_id >= table.workers:
        raise StartupError("--worker-id %d: the master has %d slots" % (config.worker_id, table.workers))
    # A stuck worker gets SIGABRT from the master before SIGKILL: leave a traceback of where it hung.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    # The master serves HTTP and saves the recovery file; a worker only proxies.
    cfg = dataclasses.replace(config, http=None, recovery_path=None)
    return Worker(cfg, table, master_pid, listen_fd).run()

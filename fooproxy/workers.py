"""Workers: ``-workers N`` runs one master and N worker processes on one port.

The master (``Master``, a ``Dispatcher`` that serves no proxy connections)
owns a shared-memory table of counter blocks (``SlotTable``): one slot per
worker and one "base" slot that only the master writes (the stats restored
from the recovery file). It probes once that no other process holds the
listen port, then starts each worker by fork+exec::

    python -m fooproxy <the master's own flags> --worker-id=N

with the table's descriptor passed through (``pass_fds``). Exec, not a bare
fork: the master runs a gevent hub (HTTP, timers, signal watchers), and a
forked copy of it would carry all of that into the child.

A worker (``WorkerDispatcher``) binds its *own* SO_REUSEPORT listener, so the
kernel balances new connections across workers; it runs the same proxy as a
single process, writes its stats into its slot (``Stats(block=slot)``) and
stamps ``heartbeat_ns`` there every ``HEARTBEAT_INTERVAL``. Its first stamp,
right after it starts accepting, tells the master it is ready. The master
announces "listening on" only once every worker is ready.

The master sums all slots (``Snapshot.from_blocks``) for SIGUSR2, HTTP and
recovery: exact totals, and 1 s / 10 s rates that are the sums of the
workers' rates (same system-wide monotonic clock, same buckets).

Failures:

* A worker that exits is logged and replaced in the same slot. The slot is
  not zeroed: the replacement continues from its counts, so nothing it
  forwarded is lost. Only the gauges of the dead process (open connections,
  pool, heartbeat) are reset, since those connections died with it.
* A worker whose heartbeat is older than ``-heartbeat-timeout`` (hub stuck or
  process stopped) is killed with SIGKILL and replaced.
* Workers exit when the master dies: PR_SET_PDEATHSIG sends them SIGTERM
  (they drain, as for any SIGTERM), and each also checks ``getppid()`` at
  every heartbeat, in case the master died before the worker was set up.

Signals: SIGTERM or SIGINT to the master sends SIGTERM to every worker; the
workers drain within ``-grace``, the master waits for them, saves the final
recovery snapshot and exits 0. A second TERM/INT makes the master send
SIGQUIT (exit at once) to the workers and exit 1.

In a worker, SIGTERM means "drain" however often it comes: a SIGTERM to the
whole process group (``kill -TERM -PGID``, systemd's default KillMode)
reaches each worker twice, directly and forwarded by the master, and must not
count as "second signal, exit now". SIGQUIT exits at once. Workers ignore
SIGINT, so a terminal's Ctrl-C, which reaches the whole process group, is
handled once, by the master. Workers also ignore SIGUSR2: ask the master,
whose line has the totals of all workers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
import os
import signal
import sys
import tempfile
import time

import gevent
import gevent.subprocess
from gevent.event import Event

from fooproxy.config import Config
from fooproxy.dispatcher import Dispatcher
from fooproxy.listeners import StartupError, bind, probe_free
from fooproxy.proxy import Proxy
from fooproxy.stats import BLOCK_BYTES, COUNTERS, GAUGES, Snapshot, Stats

log = logging.getLogger("fooproxy.workers")

#: Internal: how the master tells a worker where the table is and who its master is.
SHM_FD_ENV = "FOOPROXY_WORKER_SHM_FD"
MASTER_PID_ENV = "FOOPROXY_MASTER_PID"

HEARTBEAT_INTERVAL = 0.5  # seconds between a worker's heartbeat stamps
START_TIMEOUT = 30.0  # a worker must be accepting this soon after it was started
STOP_MARGIN = 5.0  # beyond -grace, how long the master waits for draining workers

_HEARTBEAT = COUNTERS.index("heartbeat_ns")
_GAUGE_CELLS = tuple(COUNTERS.index(name) for name in GAUGES)
_MESSAGE_CELLS = tuple(COUNTERS.index(name) for name in ("msg_req", "msg_ack", "msg_nak"))
_PR_SET_PDEATHSIG = 1


class SlotTable:
    """Counter blocks in one shared ``mmap``: slots ``0..workers-1`` for workers, then the base slot.

    One writer per slot: a worker writes its own, the master writes the base
    slot and, only while no worker owns a slot, that slot's gauges.
    """

    def __init__(self, fd: int, mapping: mmap.mmap) -> None:
        self.fd = fd
        self._mmap = mapping
        count = len(mapping) // BLOCK_BYTES
        if count < 2 or len(mapping) % BLOCK_BYTES:
            raise ValueError("not a worker table: %d bytes" % len(mapping))
        self.workers = count - 1
        view = memoryview(mapping)
        self.blocks = [view[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES].cast("q") for i in range(count)]
        view.release()

    @classmethod
    def create(cls, workers: int) -> SlotTable:
        """A zeroed table for ``workers`` workers, in an anonymous file (no name to clean up)."""
        size = (workers + 1) * BLOCK_BYTES
        try:
            fd = os.memfd_create("fooproxy-stats")
        except (AttributeError, OSError):  # not Linux, or an old kernel
            handle, path = tempfile.mkstemp(prefix="fooproxy-stats-")
            os.unlink(path)
            fd = handle
        os.ftruncate(fd, size)  # reads as zeros
        return cls(fd, mmap.mmap(fd, size))

    @classmethod
    def attach(cls, fd: int) -> SlotTable:
        """Map the table the master created (a worker, given the descriptor)."""
        return cls(fd, mmap.mmap(fd, os.fstat(fd).st_size))

    @property
    def base(self) -> memoryview:
        """The master's own block: restored history, written by no worker."""
        return self.blocks[-1]

    def heartbeat_ns(self, slot: int) -> int:
        """The last heartbeat stamped in ``slot`` (``time.monotonic_ns()``), 0 before the first."""
        return self.blocks[slot][_HEARTBEAT]

    def messages(self, slot: int) -> int:
        """REQ + ACK + NAK counted in ``slot`` (for log lines)."""
        block = self.blocks[slot]
        return sum(block[i] for i in _MESSAGE_CELLS)

    def reset_gauges(self, slot: int) -> None:
        """Zero the gauges of a slot whose worker is gone: its connections and pool died with it.

        Totals and window buckets stay: the replacement continues from them.
        Zeroing the heartbeat also marks the slot "not ready" until the
        replacement stamps its first one.
        """
        block = self.blocks[slot]
        for i in _GAUGE_CELLS:
            block[i] = 0

    def snapshot(self, started: float, now: float | None = None) -> Snapshot:
        """All slots summed, as of ``now`` (default: the system-wide monotonic clock)."""
        return Snapshot.from_blocks(self.blocks, time.monotonic() if now is None else now, started)

    def close(self) -> None:
        """Unmap and close (tests; a process simply exits)."""
        for block in self.blocks:
            block.release()
        self.blocks = []
        self._mmap.close()
        os.close(self.fd)


# -- master ---------------------------------------------------------------------------------
class _Slot:
    """One worker slot and the process currently serving it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.popen: gevent.subprocess.Popen | None = None
        self.started_ns = 0
        self.ready = False
        self.killed = False  # by the master, for a missed heartbeat
        self.quick_deaths = 0
        self.greenlet: gevent.Greenlet | None = None


class Master(Dispatcher):
    """Serves HTTP, recovery and SIGUSR2 over the summed slots; workers serve the proxy."""

    def __init__(
        self,
        config: Config,
        argv: list[str],
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.table = SlotTable.create(config.workers)
        super().__init__(config, Stats(block=self.table.base), snapshot_source=self._summed)
        #: The master's own flags, passed on to every worker.
        self.argv = list(argv)
        self.start_timeout = start_timeout
        self.slots = [_Slot(i) for i in range(config.workers)]
        self._stopping = Event()
        self._starting = True
        self._startup_error: str | None = None
        self._monitor: gevent.Greenlet | None = None

    def _summed(self) -> Snapshot:
        return self.table.snapshot(self.stats.started)

    def worker_pids(self) -> list[int]:
        """PIDs of the workers running now."""
        return [s.popen.pid for s in self.slots if s.popen is not None and s.popen.returncode is None]

    # -- Dispatcher hooks ---------------------------------------------------------------
    def serve(self) -> str:
        cfg = self.config
        if cfg.listen.port == 0:
            raise StartupError("-listen: with -workers, give a fixed port (each worker would get its own port 0)")
        # The workers bind with SO_REUSEPORT, which would silently share the port
        # with another fooproxy of the same user: refuse any holder once, here.
        probe_free(cfg.listen)
        for slot in self.slots:
            self._spawn(slot)
            slot.greenlet = gevent.spawn(self._supervise, slot)
        try:
            self._wait_ready()
        except BaseException:
            self._stop_workers(timeout=STOP_MARGIN)
            raise
        self._starting = False
        self._monitor = gevent.spawn(self._watch_heartbeats)
        return "%s (%d workers, pids %s)" % (cfg.listen, len(self.slots), " ".join(map(str, self.worker_pids())))

    def drain(self) -> None:
        """SIGTERM every worker; they drain within -grace. Then SIGKILL any left."""
        self._stop_workers(timeout=self.config.grace + STOP_MARGIN)

    def request_stop(self, *signal_args) -> None:
        if self.draining:  # second TERM/INT: the workers exit at once too
            for slot in self.slots:
                _kill(slot.popen, signal.SIGQUIT)
        super().request_stop(*signal_args)

    # -- workers ------------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> None:
        # Only the master touches a slot between two workers, so this write races no one.
        self.table.reset_gauges(slot.index)
        env = dict(os.environ)
        env[SHM_FD_ENV] = str(self.table.fd)
        env[MASTER_PID_ENV] = str(os.getpid())
        cmd = [sys.executable, "-m", "fooproxy", *self.argv, "--worker-id=%d" % slot.index]
        slot.ready = slot.killed = False
        slot.started_ns = time.monotonic_ns()
        slot.popen = gevent.subprocess.Popen(
            cmd, stdin=gevent.subprocess.DEVNULL, env=env, pass_fds=[self.table.fd], preexec_fn=_worker_preexec
        )
        log.debug("worker %d: started pid %d", slot.index, slot.popen.pid)

    def _supervise(self, slot: _Slot) -> None:
        """Wait for the slot's worker to exit; log and replace it, unless stopping."""
        while True:
            popen = slot.popen
            if popen is None:  # the last fork failed
                delay = 5.0
            else:
                rc = popen.wait()
                lived = (time.monotonic_ns() - slot.started_ns) / 1e9
                # Reaped: nothing writes the slot now. Its open connections died with it.
                self.table.reset_gauges(slot.index)
                if self._stopping.is_set():
                    log.debug("worker %d (pid %d) %s", slot.index, popen.pid, _exit_text(rc))
                    return
                if self._starting:
                    self._startup_error = "worker %d (pid %d) %s before it was ready" % (
                        slot.index,
                        popen.pid,
                        _exit_text(rc),
                    )
                    return
                log.error(
                    "worker %d (pid %d) %s%s after %.1fs; replacing it (its %d messages stay counted)",
                    slot.index,
                    popen.pid,
                    _exit_text(rc),
                    " (no heartbeat)" if slot.killed else "",
                    lived,
                    self.table.messages(slot.index),
                )
                # A worker that dies at once (say, the port was taken from under
                # us) must not turn into a fork loop: back off, up to 5 s.
                slot.quick_deaths = slot.quick_deaths + 1 if lived < 1.0 else 0
                delay = min(5.0, 0.1 * 2**slot.quick_deaths) if slot.quick_deaths else 0.0
            if self._stopping.wait(delay):
                return
            try:
                self._spawn(slot)
            except OSError as exc:  # out of memory, process limit: try again later
                log.error("worker %d: cannot start a replacement: %s", slot.index, exc)
                slot.popen = None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not all(self._check_ready(slot) for slot in self.slots):
            if self._startup_error is not None:
                raise StartupError(self._startup_error)
            if time.monotonic() > deadline:
                raise StartupError("workers not accepting within %gs" % self.start_timeout)
            gevent.sleep(0.01)

    def _check_ready(self, slot: _Slot) -> bool:
        if not slot.ready and slot.popen is not None and self.table.heartbeat_ns(slot.index):
            slot.ready = True
            if not self._starting:
                log.info("worker %d (pid %d) ready", slot.index, slot.popen.pid)
        return slot.ready

    def _watch_heartbeats(self) -> None:
        """Kill a worker that stopped stamping its heartbeat, or never started to."""
        while not self._stopping.wait(HEARTBEAT_INTERVAL):
            now = time.monotonic_ns()
            for slot in self.slots:
                popen = slot.popen
                if popen is None or popen.returncode is not None or slot.killed:
                    continue
                if self._check_ready(slot):
                    silent = (now - self.table.heartbeat_ns(slot.index)) / 1e9
                    if silent <= self.config.heartbeat_timeout:
                        continue
                    log.error("worker %d (pid %d): no heartbeat for %.1fs; killing it", slot.index, popen.pid, silent)
                elif (now - slot.started_ns) / 1e9 > self.start_timeout:
                    log.error("worker %d (pid %d): not accepting in time; killing it", slot.index, popen.pid)
                else:
                    continue
                slot.killed = True
                _kill(popen, signal.SIGKILL)

    def _stop_workers(self, timeout: float) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.kill()
        live = [s for s in self.slots if s.popen is not None and s.popen.returncode is None]
        if live:
            log.info("stopping %d worker(s)", len(live))
        for slot in live:
            _kill(slot.popen, signal.SIGTERM)
        waiting = [s.greenlet for s in self.slots if s.greenlet is not None]
        gevent.joinall(waiting, timeout=timeout)
        late = [s for s in self.slots if s.popen is not None and s.popen.returncode is None]
        for slot in late:
            log.warning("worker %d (pid %d) still running after %gs: killing it", slot.index, slot.popen.pid, timeout)
            _kill(slot.popen, signal.SIGKILL)
        gevent.joinall(waiting, timeout=STOP_MARGIN)


def _kill(popen: gevent.subprocess.Popen | None, sig: int) -> None:
    if popen is None:
        return
    try:
        popen.send_signal(sig)
    except ProcessLookupError:
        pass


def _exit_text(rc: int | None) -> str:
    if rc is None:
        return "is running"
    if rc < 0:
        try:
            return "was killed by %s" % signal.Signals(-rc).name
        except ValueError:
            return "was killed by signal %d" % -rc
    return "exited with status %d" % rc


try:
    # Loaded in the master, before any fork: the child only calls it.
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):
    _libc = _prctl = None


def _worker_preexec() -> None:
    """In the forked child, before exec: the signal dispositions the worker starts with.

    SIG_IGN survives exec (a handler would not), so a Ctrl-C or a SIGUSR2 that
    arrives while the worker is still importing cannot kill it; and Python
    keeps an ignored SIGINT ignored (no KeyboardInterrupt). PDEATHSIG makes
    the kernel send SIGTERM to the worker when the master dies.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# -- worker ---------------------------------------------------------------------------------
class WorkerDispatcher(Dispatcher):
    """One worker: the proxy on a shared SO_REUSEPORT port, stats in its slot, a heartbeat."""

    def __init__(self, config: Config, stats: Stats, master_pid: int) -> None:
        super().__init__(config, stats)
        self.master_pid = master_pid
        self._heartbeat: gevent.Greenlet | None = None

    def serve(self) -> str:
        cfg = self.config
        # Its own socket, bound after exec: an inherited one would not be balanced.
        # No probe: the siblings hold this port, and the master probed it once.
        listener = bind(cfg.listen, reuse_port=True, probe=False)
        self.proxy = Proxy(listener, cfg, self.stats, self.connector, max_accept=1)
        self.proxy.start()
        self.stats.set("heartbeat_ns", time.monotonic_ns())  # ready: the master may announce
        self._heartbeat = gevent.spawn(self._beat)
        host, port = listener.getsockname()[:2]
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)

    def announce(self, where: str) -> None:
        # Not "listening on": harnesses wait for the master's line, which comes
        # once all workers are ready.
        log.info("worker %d serving on %s (pid %d)", self.config.worker_id, where, os.getpid())

    def _install_signals(self) -> None:
        # SIGINT and SIGUSR2 stay ignored (set before exec): Ctrl-C is the
        # master's to handle, and only the master has the summed stats.
        self._signals = [
            gevent.signal_handler(signal.SIGTERM, self.request_stop),
            gevent.signal_handler(signal.SIGQUIT, self.exit_now),
        ]

    def request_stop(self, *_signal_args) -> None:
        """SIGTERM: drain. Repeats are no-ops (a group SIGTERM arrives twice, see the module doc)."""
        if not self.draining:
            gevent.spawn(self.shutdown)

    def exit_now(self, *_signal_args) -> None:
        """SIGQUIT from the master (it got a second stop signal): exit without draining."""
        log.warning("worker %d: exiting now", self.config.worker_id)
        sys.stderr.flush()
        os._exit(1)

    def _beat(self) -> None:
        """Stamp the heartbeat; stop when the master is gone."""
        while True:
            gevent.sleep(HEARTBEAT_INTERVAL)
            self.stats.set("heartbeat_ns", time.monotonic_ns())
            if os.getppid() != self.master_pid and not self.draining:
                log.warning("worker %d: master (pid %d) is gone; stopping", self.config.worker_id, self.master_pid)
                self.request_stop()


def run_worker(config: Config) -> int:
    """Entry point of ``fooproxy --worker-id N`` (started by a master, never by hand)."""
    try:
        fd = int(os.environ.pop(SHM_FD_ENV))
        master_pid = int(os.environ.pop(MASTER_PID_ENV))
    except (KeyError, ValueError):
        raise StartupError("--worker-id is internal: run -workers N and the master starts the workers") from None
    assert config.worker_id is not None
    if os.getppid() != master_pid:
        raise StartupError("worker %d: the master (pid %d) is already gone" % (config.worker_id, master_pid))
    table = SlotTable.attach(fd)
    if config.worker_id >= table.workers:
        raise StartupError("--worker-id %d: the master has %d slots" % (config.worker_id, table.workers))
    # The master serves HTTP and saves the recovery file; a worker only proxies.
    cfg = dataclasses.replace(config, http=None, recovery_path=None)
    return WorkerDispatcher(cfg, Stats(block=table.blocks[config.worker_id]), master_pid).run()


def run_master(config: Config, argv: list[str]) -> int:
    """Entry point of ``fooproxy -workers N`` with N > 1."""
    return Master(config, argv).run()

"""Supervisor: the master process of ``-workers N`` (N > 1); it serves no clients itself.

It composes the shared ``Services`` (HTTP, recovery, SIGUSR2, stop signals,
all over the summed slots) with the workers' ``SlotTable``: three slots per
worker position (the running generation's, the one a rolling reload starts
the next generation in, and one for a master restarted while two generations
of orphans still drain) and one "base" slot that only the master
writes (the stats restored from the recovery file). It probes once that no
other process holds the listen port, binds one SO_REUSEPORT listening socket
per worker position, then starts each worker by fork+exec (see
``worker.py``)::

    python -m fooproxy <the master's own flags> --worker-id=SLOT

with the table's descriptor and the position's socket passed through
(``pass_fds``). Exec, not a bare fork: the master runs a gevent hub (HTTP,
timers, signal watchers), and a forked copy of it would carry all of that
into the child. The master announces "listening on" only once every worker
has stamped its first heartbeat.

Why the master binds the sockets (engineering-notes #7 says each worker
binds its own): a SO_REUSEPORT socket that closes drops the connections
queued on it, and the kernel hashes new SYNs to the sockets of the group
that exist at that instant. With sockets owned by the workers, a rolling
reload would close the old workers' sockets with clients in their queues
(refused or reset). Here the sockets live as long as the master: a worker
that stops, dies or is replaced only stops accepting, and the next worker of
that position accepts from the same queue, so no connection attempt is ever
refused. Balancing is unchanged: there are still N sockets in the group, one
accepted by each worker (what gunicorn PR #2938 warns about is one socket
shared by all workers). The master never accepts on them.

SIGHUP is a rolling reload (``reload``, through the ``Reloader``: one at a
time, coalesced): re-read and validate the config (a bad one is rejected
whole, nothing changes), start a new generation of N workers with it (a
fresh ``python`` exec: upgraded code too) in the other slot of each
position, wait until every one of them is ready, then SIGTERM the old
generation, which stops accepting and drains within its ``-grace``; the
reload ends when the old generation has exited, so a slot is free again
before the next reload needs it. A new generation that does not get ready
is stopped and the old one keeps serving. The old slots are never zeroed,
so what the old workers counted stays in the sums exactly.

The master sums all slots (``Snapshot.from_blocks``) for SIGUSR2, HTTP and
recovery: exact totals, and 1 s / 10 s rates that are the sums of the
workers' rates (same system-wide monotonic clock, same buckets).

Failures:

* A worker that exits is logged and replaced in the same slot. The slot is
  not zeroed: the replacement continues from its counts, so nothing it
  forwarded is lost. Only the gauges of the dead process (open connections,
  pool) and its heartbeat are reset, since those connections died with it.
* A worker whose heartbeat is older than ``-heartbeat-timeout`` (hub stuck or
  process stopped) gets SIGABRT, which its ``faulthandler`` turns into a
  traceback on stderr (where it hung), as gunicorn does; if it is still
  there ``ABORT_GRACE`` seconds later (a stopped process), SIGKILL. Either
  way it is replaced.
* Workers exit when the master dies (see ``worker.py``): they drain within
  ``-grace`` first, as orphans, still counting into the table. With a
  recovery file the table is the file ``<recovery>.slots`` (under the same
  lock), so a restarted master adopts it (``SlotTable.open_saved``: same
  layout, same boot, sane values, not behind the recovery file, else a new
  table and a warning), marks the slots whose orphans still run (pid alive,
  heartbeat fresh), starts its own workers in other slots, and does not
  restore the recovery file on top (the table holds it all: no double count).
  A clean exit removes the table file after the final save.

Signals: SIGTERM or SIGINT to the master sends SIGTERM to every worker; the
workers drain within ``-grace``, the master waits for them, saves the final
recovery snapshot and exits 0. A second TERM/INT makes the master send
SIGQUIT (exit at once) to the workers and exit 1.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time

import gevent
import gevent.subprocess
from gevent.event import Event

from fooproxy import recovery
from fooproxy.config import Config, ConfigError
from fooproxy.configfile import ConfigSource
from fooproxy.listeners import StartupError, bind, probe_free
from fooproxy.reload import Reloader, changes, keep_restart_only, read_config
from fooproxy.services import Services, exit_now, stop_signals
from fooproxy.stats import GAUGES, SlotTable, Snapshot, Stats
from fooproxy.worker import HEARTBEAT_INTERVAL, LISTEN_FD_ENV, MASTER_PID_ENV, SHM_FD_ENV, worker_preexec

log = logging.getLogger("fooproxy.workers")

START_TIMEOUT = 30.0  # a worker must be accepting this soon after it was started
STOP_MARGIN = 5.0  # beyond -grace, how long the master waits for draining workers
ABORT_GRACE = 3.0  # after SIGABRT to a stuck worker, how long before SIGKILL

#: Worker slots per position: a reload's two generations, and one for a restart beside two orphaned ones.
SLOTS_PER_POSITION = 3
#: A previous master's worker whose heartbeat is older than this is gone (it stamps every 0.5 s).
ORPHAN_SILENCE = 3.0

#: Settings a rolling reload cannot change (the rest go to the new generation, or to the master's Services).
RESTART_ONLY = {
    "listen": "needs a restart (the master holds the listening sockets across reloads)",
    "workers": "needs a restart (the slot table is sized for it)",
    "recovery_path": "needs a restart (the file is locked by this instance)",
}


# -- master ---------------------------------------------------------------------------------
class _Slot:
    """One worker slot and the process currently serving it."""

    def __init__(self, index: int, position: int) -> None:
        self.index = index
        #: Which listening socket its worker accepts on (slots ``p`` and ``p + N`` share position ``p``).
        self.position = position
        #: A new generation's slot while the reload waits for it: a death is a failed reload, not a respawn.
        self.trial = False
        self.failure: str | None = None
        #: Its worker was told to drain (an old generation): when it exits, it is not replaced.
        self.retired = False
        self.popen: gevent.subprocess.Popen | None = None
        self.started_ns = 0
        self.ready = False
        self.aborted_ns = 0  # when the master sent SIGABRT for a missed heartbeat (0: not)
        self.killed = False  # by the master (SIGABRT, then maybe SIGKILL), for a missed heartbeat
        self.quick_deaths = 0
        #: The pid of a previous master's worker still writing this slot (0: none).
        self.orphan = 0
        self.greenlet: gevent.Greenlet | None = None


class Supervisor:
    """The master: Services over the summed slots, and start/replace/heartbeat/drain of the workers."""

    def __init__(
        self,
        config: Config,
        argv: list[str],
        start_timeout: float = START_TIMEOUT,
        source: ConfigSource | None = None,
    ) -> None:
        self.config = config
        self.source = source
        n = config.workers
        # The lock guards the recovery file and the table file beside it: taken before either is read.
        lock = recovery.lock(config.recovery_path, log) if config.recovery_path else None
        # Room for three generations: a reload's two, and a third for a master restarted while
        # the two it lost (kill -9 mid-reload) still drain as orphans. Slots are never zeroed.
        self.table, self.adopted = _table(config.recovery_path, SLOTS_PER_POSITION * n)
        self.stats = Stats(block=self.table.base)
        self.services = Services(config, self.stats, snapshot=self._summed)
        self.services.recovery_lock = lock
        self.services.reloader = Reloader(self.reload)
        self.services.keep_saved = self._keep_saved
        self.services.after_final_save = self._after_final_save
        #: The master's own flags, passed on to every worker.
        self.argv = list(argv)
        self.start_timeout = start_timeout
        self.slots = [_Slot(i, i % n) for i in range(SLOTS_PER_POSITION * n)]
        if self.adopted:
            self._find_orphans()
        #: The running generation: per position, its slot (chosen again in ``_serve``).
        self.current = self.slots[:n]
        #: Per position, the listening socket (bound in ``_serve``, kept until the master exits).
        self.listeners: list = []
        self.generation = 1
        self._stopping = Event()
        self._starting = True
        self._startup_error: str | None = None
        self._monitor: gevent.Greenlet | None = None

    def _summed(self) -> Snapshot:
        return self.table.snapshot(self.stats.started)

    # -- the table a killed master left (issue 16: orphaned workers) --------------------
    def _find_orphans(self) -> None:
        """Mark the slots whose workers outlived the previous master; reset the dead ones' gauges."""
        for slot in self.slots:
            if _orphan_alive(self.table, slot.index):
                slot.orphan = self.table.pid(slot.index)
            else:
                self.table.reset(slot.index)

    def _keep_saved(self, saved: Snapshot) -> bool:
        """Services' restore hook: an adopted table already holds the recovery file's counts (and more)."""
        if not self.adopted:
            return True
        table = self.table.snapshot(self.stats.started).totals
        behind = [k for k, v in saved.totals.items() if k not in GAUGES and table.get(k, 0) < v]
        if behind:  # the file moved on without this table (a single process ran since): the table is stale
            log.warning("%s: older than the recovery file (%s); not adopted", self.table.path, ", ".join(behind))
            self.table.zero()
            self.adopted = False
            for slot in self.slots:
                slot.orphan = 0
            return True
        return False

    def _log_adopted(self) -> None:
        orphans = [s.orphan for s in self.slots if s.orphan]
        log.info(
            "adopted the stats table of the previous master from %s: %d messages%s",
            self.table.path,
            self.table.snapshot(self.stats.started).as_dict()["msg_total"],
            "; orphaned workers still draining, counted as they finish: pids %s" % " ".join(map(str, orphans))
            if orphans
            else "",
        )

    def _after_final_save(self, saved: bool) -> None:
        """A clean exit: the recovery file has everything, so no table is left to adopt (unless orphans run)."""
        self._check_orphans()
        if saved and not any(s.orphan for s in self.slots):
            self.table.remove()

    def _check_orphans(self) -> None:
        for slot in self.slots:
            if slot.orphan and not _orphan_alive(self.table, slot.index):
                log.info(
                    "orphaned worker (pid %d, slot %d) has exited; its %d messages stay counted",
                    slot.orphan,
                    slot.index,
                    self.table.messages(slot.index),
                )
                self.table.reset(slot.index)
                slot.orphan = 0

    def worker_pids(self) -> list[int]:
        """PIDs of the workers running now."""
        return [s.popen.pid for s in self.current if s.popen is not None and s.popen.returncode is None]

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> int:
        """Start the workers, serve HTTP/SIGUSR2 until a stop signal, stop them; the exit status."""
        services = self.services
        signals = stop_signals(self.request_stop, services.print_stats, reload=services.reloader.request)
        services.announce(services.start(self._serve, signals))
        return services.wait(self.shutdown)

    def _serve(self) -> str:
        cfg = self.config
        if cfg.listen.port == 0:
            raise StartupError("-listen: with -workers, give a fixed port (each worker would get its own port 0)")
        # The workers bind with SO_REUSEPORT, which would silently share the port
        # with another fooproxy of the same user: refuse any holder once, here.
        probe_free(cfg.listen)
        # One socket per position, for the master's whole life (see the module doc).
        self.listeners = [bind(cfg.listen, reuse_port=True, probe=False) for _ in self.current]
        if self.adopted:
            self._log_adopted()
        # Per position, a slot no orphan of a previous master still writes.
        self.current = [self._free_slot(p, []) for p in range(len(self.current))]
        for slot in self.current:
            self._start(slot)
        try:
            self._wait_ready(self.current)
        except BaseException:
            self._stop_workers(timeout=STOP_MARGIN)
            raise
        self._starting = False
        self._monitor = gevent.spawn(self._watch_heartbeats)
        return "%s (%d workers, pids %s)" % (cfg.listen, len(self.current), " ".join(map(str, self.worker_pids())))

    def shutdown(self) -> None:
        """SIGTERM every worker; they drain within -grace. Then SIGKILL any left. Idempotent."""
        self.services.shutdown(lambda: self._stop_workers(timeout=self.config.grace + STOP_MARGIN))

    def request_stop(self, *_signal_args) -> None:
        """First TERM/INT: stop the workers (they drain). Second: they and the master exit at once."""
        if self.services.draining:
            for slot in self.slots:
                _kill(slot.popen, signal.SIGQUIT)
            exit_now("second stop signal: exiting now")
        gevent.spawn(self.shutdown)

    # -- rolling reload -----------------------------------------------------------------
    def reload(self) -> str:
        """SIGHUP (through the Reloader): a new generation of workers with the new config, then drain the old.

        Raises ``ConfigError`` when the new settings do not validate, or when
        the new generation does not get ready: then nothing has changed and
        the old generation serves on. Returns what changed, for the reload line.
        """
        if self.services.draining or self._starting:
            return "not applied: %s" % ("shutting down" if self.services.draining else "still starting")
        old = self.config
        new, notes = keep_restart_only(old, read_config(self.source, old), RESTART_ONLY)
        try:
            fresh = [self._free_slot(s.position, [s]) for s in self.current]
        except StartupError as exc:
            raise ConfigError(str(exc)) from None
        for slot in fresh:
            slot.trial = True
            slot.failure = None
            self._start(slot)
        try:
            self._wait_ready(fresh)
        except StartupError as exc:
            self._retire(fresh, self.start_timeout)
            raise ConfigError("new workers failed, the old ones serve on: %s" % exc) from None
        finally:
            for slot in fresh:
                slot.trial = False
        retired, self.current = self.current, fresh
        self.generation += 1
        notes += self.services.reconfigure(new)
        new = dataclasses.replace(new, http=self.services.config.http, http_allow=self.services.config.http_allow)
        self.config = new
        old_pids = " ".join(str(s.popen.pid) for s in retired if s.popen is not None)
        # The old generation stops accepting (the sockets stay, the new workers take the queue) and drains.
        self._retire(retired, max(old.grace, new.grace) + STOP_MARGIN)
        what = changes(old, new) + notes
        return "; ".join(
            [
                *what,
                "workers %s -> %s (generation %d)"
                % (old_pids, " ".join(map(str, self.worker_pids())), self.generation),
            ]
        )

    def _retire(self, slots: list[_Slot], timeout: float) -> None:
        """SIGTERM the workers of ``slots`` (they drain, then exit; none is replaced); SIGKILL after ``timeout``."""
        for slot in slots:
            slot.retired = True
            _kill(slot.popen, signal.SIGTERM)
        waiting = [s.greenlet for s in slots if s.greenlet is not None]
        gevent.joinall(waiting, timeout=timeout)
        for slot in slots:
            if slot.popen is not None and slot.popen.returncode is None:
                log.warning(
                    "worker %d (pid %d) still running after %gs: killing it", slot.index, slot.popen.pid, timeout
                )
                _kill(slot.popen, signal.SIGKILL)
        gevent.joinall(waiting, timeout=STOP_MARGIN)

    # -- workers ------------------------------------------------------------------------
    def _free_slot(self, position: int, taken: list[_Slot]) -> _Slot:
        """A slot of ``position`` that no running worker or orphan writes, and not in ``taken``."""
        for slot in self.slots:
            if slot.position != position or slot in taken or slot.orphan:
                continue
            if slot.popen is None or slot.popen.returncode is not None:
                return slot
        raise StartupError("no free slot for worker position %d (a generation is still draining)" % position)

    def _start(self, slot: _Slot) -> None:
        """Start a worker in ``slot`` and the greenlet that supervises it."""
        slot.retired = False
        self._spawn(slot)
        slot.greenlet = gevent.spawn(self._supervise, slot)

    def _spawn(self, slot: _Slot) -> None:
        # Only the master touches a slot between two workers, so this write races no one.
        self.table.reset(slot.index)
        listener = self.listeners[slot.position]
        env = dict(os.environ)
        env[SHM_FD_ENV] = str(self.table.fd)
        env[LISTEN_FD_ENV] = str(listener.fileno())
        env[MASTER_PID_ENV] = str(os.getpid())
        env.pop("NOTIFY_SOCKET", None)  # readiness is the master's to tell (systemd's NotifyAccess=main)
        cmd = [sys.executable, "-m", "fooproxy", *self.argv, "--worker-id=%d" % slot.index]
        slot.ready = slot.killed = False
        slot.aborted_ns = 0
        slot.started_ns = time.monotonic_ns()
        slot.popen = gevent.subprocess.Popen(
            cmd,
            stdin=gevent.subprocess.DEVNULL,
            env=env,
            pass_fds=[self.table.fd, listener.fileno()],
            preexec_fn=worker_preexec,
        )
        self.table.set_pid(slot.index, slot.popen.pid)
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
                self.table.reset(slot.index)
                if self._stopping.is_set() or slot.retired:
                    log.debug("worker %d (pid %d) %s", slot.index, popen.pid, _exit_text(rc))
                    return
                if slot.trial:
                    slot.failure = "worker %d (pid %d) %s before it was ready" % (slot.index, popen.pid, _exit_text(rc))
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

    def _wait_ready(self, slots: list[_Slot]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not all(self._check_ready(slot) for slot in slots):
            failed = self._startup_error or next((s.failure for s in slots if s.failure), None)
            if failed is not None:
                raise StartupError(failed)
            if self._stopping.is_set():
                raise StartupError("stopping")
            if time.monotonic() > deadline:
                raise StartupError("workers not accepting within %gs" % self.start_timeout)
            gevent.sleep(0.01)

    def _check_ready(self, slot: _Slot) -> bool:
        if not slot.ready and slot.popen is not None and self.table.heartbeat_ns(slot.index):
            slot.ready = True
            if not self._starting and not slot.trial:  # a replacement (a reload has its own line)
                log.info("worker %d (pid %d) ready", slot.index, slot.popen.pid)
        return slot.ready

    def _watch_heartbeats(self) -> None:
        """Abort, then kill, a worker that stopped stamping its heartbeat, or never started to."""
        while not self._stopping.wait(HEARTBEAT_INTERVAL):
            self._check_orphans()
            now = time.monotonic_ns()
            for slot in self.slots:
                popen = slot.popen
                if popen is None or popen.returncode is not None:
                    continue
                if slot.killed:
                    # SIGABRT did not end it (a stopped process keeps the signal pending): SIGKILL.
                    if slot.aborted_ns and (now - slot.aborted_ns) / 1e9 > ABORT_GRACE:
                        log.error("worker %d (pid %d): still there after SIGABRT; killing it", slot.index, popen.pid)
                        slot.aborted_ns = 0
                        _kill(popen, signal.SIGKILL)
                    continue
                if self._check_ready(slot):
                    silent = (now - self.table.heartbeat_ns(slot.index)) / 1e9
                    if silent <= self.config.heartbeat_timeout:
                        continue
                    log.error(
                        "worker %d (pid %d): no heartbeat for %.1fs; aborting it (SIGABRT: a traceback on stderr)",
                        slot.index,
                        popen.pid,
                        silent,
                    )
                elif (now - slot.started_ns) / 1e9 > self.start_timeout:
                    log.error("worker %d (pid %d): not accepting in time; aborting it", slot.index, popen.pid)
                else:
                    continue
                slot.killed = True
                slot.aborted_ns = now
                _kill(popen, signal.SIGABRT)

    def _stop_workers(self, timeout: float) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.kill()
        live = [s for s in self.slots if s.popen is not None and s.popen.returncode is None]
        if live:
            log.info("stopping %d worker(s)", len(live))
        for slot in live:
            _kill(slot.popen, signal.SIGTERM)
            slot.retired = True
        waiting = [s.greenlet for s in self.slots if s.greenlet is not None]
        gevent.joinall(waiting, timeout=timeout)
        late = [s for s in self.slots if s.popen is not None and s.popen.returncode is None]
        for slot in late:
            log.warning("worker %d (pid %d) still running after %gs: killing it", slot.index, slot.popen.pid, timeout)
            _kill(slot.popen, signal.SIGKILL)
        gevent.joinall(waiting, timeout=STOP_MARGIN)


def _table(recovery_path: str | None, slots: int) -> tuple[SlotTable, bool]:
    """The table file beside the recovery file, adopted if a previous master left a valid one."""
    if not recovery_path:
        return SlotTable.create(slots), False
    path = recovery_path + ".slots"
    table, problem = SlotTable.open_saved(path, slots)
    if table is not None:
        return table, True
    if problem is not None:
        log.warning(
            "%s: %s; starting a new one (counts since the last save of the recovery file are lost)", path, problem
        )
    try:
        return SlotTable.create(slots, path), False
    except OSError as exc:  # an unwritable directory: the recovery file reports it; the table goes in memory
        log.warning("%s: cannot create it (%s): the stats table is in memory only", path, exc.strerror or exc)
        return SlotTable.create(slots), False


def _orphan_alive(table: SlotTable, index: int) -> bool:
    """A previous master's worker still runs in ``index``: its pid exists and its heartbeat is fresh."""
    pid = table.pid(index)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # exited, not yet reaped by whoever adopted it (init, a subreaper)
        with open("/proc/%d/stat" % pid, "rb") as handle:
            if handle.read().rpartition(b")")[2].split()[0] in (b"Z", b"X"):
                return False
    except (OSError, IndexError):
        pass
    return (time.monotonic_ns() - table.heartbeat_ns(index)) / 1e9 < ORPHAN_SILENCE


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


def run_master(config: Config, argv: list[str], source: ConfigSource | None = None) -> int:
    """Entry point of ``fooproxy -workers N`` with N > 1."""
    return Supervisor(config, argv, source=source).run()

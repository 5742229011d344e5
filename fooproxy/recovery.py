"""Recovery: keep the stats across restarts in a small JSON file.

File format (version 1)::

    {"format": "fooproxy-recovery", "version": 1,
     "saved_at": 1732790000.123,              # wall clock, time.time()
     "bucket_s": 0.01,
     "totals": {"msg_req": 10, ...},          # history counters only, no gauges
     "buckets": [[age, requests, responses], ...]}   # age in buckets before saved_at

Ages are relative to ``saved_at`` because monotonic clocks do not survive a
restart; at load time the buckets are re-aged by the wall-clock time that has
passed, and those older than the 10 s window are dropped.

``load()`` never raises for bad content: a missing file is normal (None); a
regular file that does not decode, or holds values no proxy could have
written (see ``decode``), is logged, moved aside to
``<path>.corrupt-<unix time>`` and ignored, so a bad file costs the history,
never the start. Anything else at the path (a directory, FIFO, socket, device
or symlink) is reported and left alone: it is not ours to move, and the
``Saver`` reports it as "degraded" until it is gone.

``lock()`` takes an exclusive ``flock`` on ``<path>.lock`` for the life of the
process, so two fooproxies never overwrite each other's file: the second one
gets ``RecoveryInUse`` (a ``StartupError``, exit 1). With ``-workers`` only
the master opens the recovery file, so only the master takes the lock.

``Saver`` writes the file every ``interval`` seconds and on demand: the
snapshot and the JSON are built on the hub (a few milliseconds at most), the
write + fsync + rename run in gevent's threadpool, because fsync can take
seconds on a busy disk and would stall every session if run on the hub.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock

from fooproxy import timetable
from fooproxy.listeners import StartupError
from fooproxy.stats import COUNTERS, GAUGES, Snapshot

FORMAT = "fooproxy-recovery"
VERSION = 1
#: A valid file is a few tens of KiB; refuse to slurp anything much larger.
MAX_BYTES = 4 << 20
#: The largest count a file may hold. Counters live in int64 cells and keep
#: growing after a restore, so a restored value must leave room: at 10^9
#: events a second a proxy needs 146 years to reach 2^62. Anything above it
#: was not written by a proxy, and restoring it would overflow the cell at the
#: next message (every later REQ would fail its session).
MAX_COUNT = 1 << 62
#: saved_at must be a plausible wall-clock time: after 1970, before the year 5000.
_MAX_SAVED_AT = 1e11

_log = logging.getLogger("fooproxy.recovery")

GetSnapshot = Callable[[], Snapshot]


class RecoveryFormatError(ValueError):
    """The file's content is not a recovery file we can use (the only error ``decode`` raises)."""


class RecoveryInUse(StartupError):
    """Another process holds the recovery file's lock."""


# -- format -------------------------------------------------------------------
def encode(snap: Snapshot, saved_at: float) -> bytes:
    """The file content for ``snap`` taken at wall-clock time ``saved_at``."""
    # Gauges (open connections, pool) describe the old process, not history.
    totals = {k: int(v) for k, v in snap.totals.items() if k in COUNTERS and k not in GAUGES}
    buckets = [[int(a), int(r), int(s)] for a, r, s in snap.buckets]
    _trim_to_totals(buckets, 1, totals.get("msg_req", 0))
    _trim_to_totals(buckets, 2, totals.get("msg_ack", 0) + totals.get("msg_nak", 0))
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": saved_at,
        "bucket_s": timetable.BUCKET_S,
        "totals": totals,
        "buckets": buckets,
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def _trim_to_totals(buckets: list[list[int]], column: int, total: int) -> None:
    """Make the window's events in ``column`` add up to at most ``total``.

    Every event is counted in its total before its bucket, so within one
    process the buckets never exceed the totals. The master of ``-workers``
    reads the totals of all slots before their buckets while workers keep
    counting, so its snapshot can hold a few more events in buckets than in
    the totals; those few are trimmed from the youngest buckets (a rate loses
    them, no total does), so every file we write satisfies the invariant
    ``decode`` checks.
    """
    excess = sum(b[column] for b in buckets) - total
    for b in buckets:  # sorted by age: youngest first
        if excess <= 0:
            return
        cut = min(excess, b[column])
        b[column] -= cut
        excess -= cut


def decode(data: bytes, now: float) -> Snapshot:
    """Parse file content and age its buckets to wall-clock ``now``.

    Raises ``RecoveryFormatError``, and nothing else, whatever ``data`` is.
    Content a proxy could not have written is corrupt too: counts that are
    not plain integers in ``0..MAX_COUNT`` (bool and float are refused),
    bucket ages outside the 10 s window, a bucket age given twice, an
    implausible ``saved_at``, and window buckets holding more requests than
    ``msg_req`` or more responses than ``msg_ack + msg_nak`` (every event is
    counted in its total first, see ``_trim_to_totals``).
    """
    try:
        return _decode(data, now)
    except RecoveryFormatError:
        raise
    except (ValueError, RecursionError, TypeError, OverflowError, MemoryError) as exc:
        # JSON syntax, bad UTF-8, int() of a huge digit string, nesting too deep.
        raise RecoveryFormatError("%s: %s" % (exc.__class__.__name__, str(exc)[:200])) from None


def _decode(data: bytes, now: float) -> Snapshot:
    doc = json.loads(data.decode("utf-8"))
    if not isinstance(doc, dict):
        raise RecoveryFormatError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise RecoveryFormatError("not a fooproxy recovery file (format=%s)" % (_short(doc.get("format")),))
    if doc.get("version") != VERSION or type(doc.get("version")) is not int:
        raise RecoveryFormatError("unsupported version %s" % (_short(doc.get("version")),))
    saved_at = doc.get("saved_at")
    if type(saved_at) not in (int, float) or not (math.isfinite(saved_at) and 0 < saved_at < _MAX_SAVED_AT):
        raise RecoveryFormatError("bad saved_at %s" % (_short(saved_at),))
    if doc.get("bucket_s") != timetable.BUCKET_S or type(doc.get("bucket_s")) is not float:
        raise RecoveryFormatError("bucket size %s, expected %r" % (_short(doc.get("bucket_s")), timetable.BUCKET_S))
    totals = doc.get("totals")
    if not isinstance(totals, dict):
        raise RecoveryFormatError("totals is not an object")
    clean: dict[str, int] = {}
    for name, value in totals.items():
        if not _is_count(value):
            raise RecoveryFormatError("totals.%s is not a count: %s" % (_short(name), _short(value)))
        # Unknown names (from a newer version) are ignored, not fatal.
        if name in COUNTERS and name not in GAUGES:
            clean[name] = value
    raw = doc.get("buckets")
    if not isinstance(raw, list):
        raise RecoveryFormatError("buckets is not a list")
    if len(raw) > timetable.SLOTS:
        raise RecoveryFormatError("%d buckets, at most %d" % (len(raw), timetable.SLOTS))
    seen: set[int] = set()
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and all(_is_count(x) for x in item)):
            raise RecoveryFormatError("bad bucket %s" % (_short(item),))
        if item[0] >= timetable.SLOTS or item[0] in seen:
            # A saved bucket is younger than the window, and each age is saved once.
            raise RecoveryFormatError("bad bucket age %r" % (item[0],))
        seen.add(item[0])
    requests = sum(item[1] for item in raw)
    responses = sum(item[2] for item in raw)
    if requests > clean.get("msg_req", 0):
        raise RecoveryFormatError("buckets hold %d requests, more than msg_req" % requests)
    if responses > clean.get("msg_ack", 0) + clean.get("msg_nak", 0):
        raise RecoveryFormatError("buckets hold %d responses, more than msg_ack + msg_nak" % responses)
    # A clock set backwards must not make buckets younger than when saved.
    shift = int(max(0.0, now - saved_at) / timetable.BUCKET_S)
    aged = [(item[0] + shift, item[1], item[2]) for item in raw]
    buckets = timetable.merge_buckets(aged)  # also drops what is older than the 10 s window
    windows = timetable.window_sums(buckets)
    return Snapshot(totals=clean, windows=windows, uptime_s=0.0, buckets=buckets)


def _is_count(x: Any) -> bool:
    # bool is an int subclass; a true/false in a counter is corruption.
    return type(x) is int and 0 <= x <= MAX_COUNT


def _short(value: Any) -> str:
    # Error messages quote the offending value, never a megabyte of it.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- load ---------------------------------------------------------------------
def load(path: str, logger: logging.Logger | None = None, now: float | None = None) -> Snapshot | None:
    """Read the recovery file, its buckets aged to wall-clock ``now`` (default: time.time()).

    Returns None if there is nothing usable; never raises for bad content.
    Only a regular file that fails to decode is moved aside; anything else at
    ``path`` is reported and left where it is (``Saver`` then reports it).
    Blocking file I/O: call it at startup, before serving.
    """
    log = logger or _log
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("recovery file %s: cannot stat (%s); starting from zero", path, _reason(exc))
        return None
    if not stat.S_ISREG(st.st_mode):
        log.warning(
            "recovery file %s is %s, not a regular file: left alone, starting from zero; "
            "stats are not saved until it is removed",
            path,
            describe_mode(st.st_mode),
        )
        return None
    if st.st_size > MAX_BYTES:
        _set_aside(path, RecoveryFormatError("too large (%d bytes)" % st.st_size), log)
        return None
    try:
        data = _read_regular(path)
    except OSError as exc:
        log.warning("recovery file %s: cannot read (%s); starting from zero", path, _reason(exc))
        return None
    try:
        snap = decode(data, time.time() if now is None else now)
    except RecoveryFormatError as exc:
        _set_aside(path, exc, log)
        return None
    return snap


def _read_regular(path: str) -> bytes:
    # O_NOFOLLOW and O_NONBLOCK: if the path was swapped for a symlink or a
    # FIFO since the lstat, fail (or return at once) instead of following it
    # or blocking the start; fstat confirms what was opened.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks = []
        left = MAX_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def describe_mode(mode: int) -> str:
    """``"a directory"``, ``"a FIFO"``... for messages about what sits at a path."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def not_regular(path: str) -> str | None:
    """Why ``path`` cannot be our file (``"... is a directory, not a regular file"``), or None.

    None also when nothing is there: a missing file is normal.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode):
        return None
    return "%s is %s, not a regular file" % (path, describe_mode(st.st_mode))


def _set_aside(path: str, exc: BaseException, log: logging.Logger) -> None:
    aside = "%s.corrupt-%d" % (path, int(time.time()))
    try:
        os.replace(path, aside)
    except OSError as mv:
        log.warning(
            "recovery file %s unusable (%s) and cannot be moved aside (%s); starting from zero",
            path,
            _reason(exc),
            _reason(mv),
        )
    else:
        log.warning("recovery file %s unusable (%s); moved to %s, starting from zero", path, _reason(exc), aside)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


# -- lock ---------------------------------------------------------------------
class RecoveryLock:
    """An exclusive ``flock`` on ``<path>.lock``, held until ``release()`` or the process ends.

    The lock is on a file of its own, beside the recovery file, because the
    recovery file is replaced by a rename at every save (a lock on it would
    stay with the old inode). The lock file holds the owner's pid, for the
    error message; it is never removed (removing it would let a third process
    lock a new inode while the second still waits on the old one). The
    descriptor is close-on-exec, so worker processes never hold it: when the
    master dies, the lock goes with it.
    """

    def __init__(self, path: str, fd: int | None, problem: str | None = None) -> None:
        self.path = path
        self._fd = fd
        #: Why the lock could not be taken (the proxy then runs unlocked), or None.
        self.problem = problem

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock (closing the descriptor releases the flock). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def lock(path: str, logger: logging.Logger | None = None) -> RecoveryLock:
    """Take the lock for the recovery file ``path``; blocking I/O, call it at start.

    Raises ``RecoveryInUse`` (one line, with the holder's pid) when another
    process holds it. Any other failure (unwritable directory, a symlink or a
    directory at the lock path) is logged and gives an unheld lock: persistence
    then fails or works on its own merits, and /health reports it.
    """
    log = logger or _log
    lock_path = path + ".lock"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # O_NOFOLLOW: a symlink planted at the lock path is refused, never followed.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        reason = "cannot open lock file %s: %s" % (lock_path, _reason(exc))
        if exc.errno == errno.ELOOP:
            reason = "lock file %s is a symbolic link" % lock_path
        log.warning("recovery: %s; running without the lock", reason)
        return RecoveryLock(path, None, reason)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RecoveryInUse(
                "recovery file %s is in use by another fooproxy%s; give each instance its own -recovery-path"
                % (path, " (pid %s)" % holder if holder else "")
            ) from None
        reason = "cannot lock %s: %s" % (lock_path, _reason(exc))
        log.warning("recovery: %s; running without the lock", reason)
        return RecoveryLock(path, None, reason)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    except OSError:
        pass  # the pid is only for the message; the lock is what matters
    return RecoveryLock(path, fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


# -- save ---------------------------------------------------------------------
def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old or the new file.

    The temporary file is made by ``mkstemp`` in the same directory: a random
    name opened with ``O_CREAT | O_EXCL``, so nothing planted in the directory
    (a symlink at a guessable name) can be written through. Then fsync,
    rename over ``path``, fsync the directory. ``path`` itself must be absent
    or a regular file; a symlink, directory or FIFO there is refused, never
    replaced.

    Blocking: run it in a thread. Raises OSError with a message naming the step.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, "cannot create directory %s: %s" % (directory, _reason(exc))) from None
    problem = not_regular(path)
    if problem is not None:
        raise OSError(errno.EEXIST, problem)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OSError(exc.errno, "cannot write %s: %s" % (path, _reason(exc))) from None
    try:
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes it 0600; keep the mode the file always had
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OSError(exc.errno, "cannot write %s: %s" % (path, _reason(exc))) from None
    # fsync the directory so the rename itself survives a power cut.
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the data is written
    finally:
        os.close(dfd)


def _write_or_error(path: str, data: bytes) -> OSError | None:
    # Return, not raise: gevent's threadpool prints a traceback for every
    # exception a task raises, which would repeat each second on a full disk.
    try:
        write_atomic(path, data)
    except OSError as exc:
        return exc
    return None


class Saver:
    """Saves ``get_snapshot()`` to ``path`` every ``interval`` s and on demand.

    Failures never raise: they set ``healthy = False`` and ``last_error``, log
    one ERROR (again only if the reason changes), and one INFO on recovery.
    """

    def __init__(
        self,
        path: str,
        get_snapshot: GetSnapshot,
        interval: float = 1.0,
        logger: logging.Logger | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.get_snapshot = get_snapshot
        self.interval = interval
        self.log = logger or _log
        self.wall_clock = wall_clock
        self.healthy = True
        self.last_error: str | None = None
        self.saves = 0  # successful saves
        # One save at a time, and the snapshot is taken inside the lock, so a
        # slow periodic save can never land after (and undo) the final one.
        self._lock = gevent.lock.Semaphore()
        self._stop = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None
        # For ``durable``: snapshots taken for a save so far (numbered from 1), the number
        # of the newest one that is in the file, the number an exposure waits for, and
        # the greenlet saving for exposures (one at a time; they share its writes).
        self._taken = 0
        self._done = 0
        self._wanted = 0
        self._for_exposures: gevent.Greenlet | None = None

    def start(self) -> None:
        """Spawn the periodic save loop (first save after one interval).

        Something other than a regular file at the path (a directory, say) is
        reported at once, so /health says "degraded" from the first probe.
        """
        problem = not_regular(self.path)
        if problem is not None:
            self._failed(problem)
        if self._greenlet is None:
            self._stop.clear()
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop the loop, waiting for a save in progress. Does not save: call ``save_now()``."""
        self._stop.set()
        g, self._greenlet = self._greenlet, None
        if g is not None:
            g.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.save_now()

    def durable(self, timeout: float = 1.0) -> bool:
        """Block this greenlet until the file holds a snapshot taken after this call began.

        For the exposures (SIGUSR2, ``/stats``, ``/metrics``): each takes the snapshot it
        shows first, then calls this, so what the file holds is never less than what was
        shown. Prometheus takes a counter that goes back after a ``kill -9`` and a
        restart as a reset, and a user who saw a SIGUSR2 line must not see smaller
        numbers later. Exposures that arrive while a save is pending share it: the file
        is written once per round however many ask, and never while another save runs
        (the periodic one included: if it took its snapshot before us, one more follows
        it). False when the save failed or took longer than ``timeout``: the caller shows
        its snapshot anyway (``/health`` reports the failing persistence).
        """
        want = self._taken + 1
        self._wanted = max(self._wanted, want)
        if self._for_exposures is None:
            self._for_exposures = gevent.spawn(self._save_for_exposures)
        self._for_exposures.join(timeout)
        return self._done >= want

    def _save_for_exposures(self) -> None:
        try:
            while self._done < self._wanted:
                if not self.save_now():
                    break  # the file cannot be written now: the waiters give up, health says so
        finally:
            self._for_exposures = None

    def save_now(self) -> bool:
        """Save once; blocks this greenlet (not the hub) until the file is durable."""
        with self._lock:
            try:
                self._taken += 1
                number = self._taken
                data = encode(self.get_snapshot(), self.wall_clock())
            except Exception:  # a bug, not an I/O problem: say so loudly, keep serving
                self.log.exception("recovery: cannot build the snapshot")
                return self._failed("cannot build the snapshot")
            error = gevent.get_hub().threadpool.apply(_write_or_error, (self.path, data))
            if error is not None:
                return self._failed(_reason(error))
            self._done = max(self._done, number)
        if not self.healthy:
            self.log.info("recovery file %s is being saved again", self.path)
        self.healthy = True
        self.last_error = None
        self.saves += 1
        return True

    def _failed(self, reason: str) -> bool:
        if self.healthy or reason != self.last_error:
            self.log.error("recovery: cannot save stats to %s: %s (proxy keeps running)", self.path, reason)
        self.healthy = False
        self.last_error = reason
        return False

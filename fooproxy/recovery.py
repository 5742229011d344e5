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
corrupt one is logged, moved aside to ``<path>.corrupt-<unix time>`` and
ignored, so a bad file costs the history, never the start.

``Saver`` writes the file every ``interval`` seconds and on demand: the
snapshot and the JSON are built on the hub (a few milliseconds at most), the
write + fsync + rename run in gevent's threadpool, because fsync can take
seconds on a busy disk and would stall every session if run on the hub.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock

from fooproxy import timetable
from fooproxy.stats import COUNTERS, GAUGES, Snapshot

FORMAT = "fooproxy-recovery"
VERSION = 1
#: A valid file is a few tens of KiB; refuse to slurp anything much larger.
MAX_BYTES = 4 << 20
_INT64_MAX = (1 << 63) - 1

_log = logging.getLogger("fooproxy.recovery")

GetSnapshot = Callable[[], Snapshot]


class RecoveryFormatError(ValueError):
    """The file's content is not a recovery file we can use."""


# -- format -------------------------------------------------------------------
def encode(snap: Snapshot, saved_at: float) -> bytes:
    """The file content for ``snap`` taken at wall-clock time ``saved_at``."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": saved_at,
        "bucket_s": timetable.BUCKET_S,
        # Gauges (open connections, pool) describe the old process, not history.
        "totals": {k: int(v) for k, v in snap.totals.items() if k in COUNTERS and k not in GAUGES},
        "buckets": [[int(a), int(r), int(s)] for a, r, s in snap.buckets],
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def decode(data: bytes, now: float) -> Snapshot:
    """Parse file content and age its buckets to wall-clock ``now``.

    Raises ``RecoveryFormatError`` (or ``ValueError`` from the JSON parser).
    """
    doc = json.loads(data.decode("utf-8"))
    if not isinstance(doc, dict):
        raise RecoveryFormatError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise RecoveryFormatError("not a fooproxy recovery file (format=%r)" % (doc.get("format"),))
    if doc.get("version") != VERSION or type(doc.get("version")) is not int:
        raise RecoveryFormatError("unsupported version %r" % (doc.get("version"),))
    saved_at = doc.get("saved_at")
    if type(saved_at) not in (int, float) or not math.isfinite(saved_at):
        raise RecoveryFormatError("bad saved_at %r" % (saved_at,))
    if doc.get("bucket_s") != timetable.BUCKET_S:
        raise RecoveryFormatError("bucket size %r, expected %r" % (doc.get("bucket_s"), timetable.BUCKET_S))
    totals = doc.get("totals")
    if not isinstance(totals, dict):
        raise RecoveryFormatError("totals is not an object")
    clean: dict[str, int] = {}
    for name, value in totals.items():
        if not _is_count(value):
            raise RecoveryFormatError("totals.%s is not a count: %r" % (name, value))
        # Unknown names (from a newer version) are ignored, not fatal.
        if name in COUNTERS and name not in GAUGES:
            clean[name] = value
    raw = doc.get("buckets")
    if not isinstance(raw, list):
        raise RecoveryFormatError("buckets is not a list")
    # A clock set backwards must not make buckets younger than when saved.
    shift = int(max(0.0, now - saved_at) / timetable.BUCKET_S)
    aged = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and all(_is_count(x) for x in item)):
            raise RecoveryFormatError("bad bucket %r" % (item,))
        aged.append((item[0] + shift, item[1], item[2]))
    buckets = timetable.merge_buckets(aged)  # also drops what is older than the 10 s window
    windows = timetable.window_sums(buckets)
    return Snapshot(totals=clean, windows=windows, uptime_s=0.0, buckets=buckets)


def _is_count(x: Any) -> bool:
    # bool is an int subclass; a true/false in a counter is corruption.
    return type(x) is int and 0 <= x <= _INT64_MAX


# -- load ---------------------------------------------------------------------
def load(path: str, logger: logging.Logger | None = None, now: float | None = None) -> Snapshot | None:
    """Read the recovery file, its buckets aged to wall-clock ``now`` (default: time.time()).

    Returns None if there is nothing usable; never raises for bad content.
    Blocking file I/O: call it at startup, before serving.
    """
    log = logger or _log
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("recovery file %s: cannot stat (%s); starting from zero", path, _reason(exc))
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # A device or FIFO (say -recovery-path /dev/null): never rename that away.
        log.warning("recovery file %s is not a regular file; ignoring it", path)
        return None
    try:
        if stat.S_ISDIR(st.st_mode):
            raise RecoveryFormatError("is a directory")
        if st.st_size > MAX_BYTES:
            raise RecoveryFormatError("too large (%d bytes)" % st.st_size)
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        snap = decode(data, time.time() if now is None else now)
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeError and JSON errors are ValueErrors
        _set_aside(path, exc, log)
        return None
    return snap


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


# -- save ---------------------------------------------------------------------
def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old or the new file.

    Blocking: run it in a thread. Raises OSError with a message naming the step.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, "cannot create directory %s: %s" % (directory, _reason(exc))) from None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            # Replacing a directory fails anyway; replacing /dev/null as root would not.
            raise OSError("%s exists and is not a regular file" % path)
    tmp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
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

    def start(self) -> None:
        """Spawn the periodic save loop (first save after one interval)."""
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

    def save_now(self) -> bool:
        """Save once; blocks this greenlet (not the hub) until the file is durable."""
        with self._lock:
            try:
                data = encode(self.get_snapshot(), self.wall_clock())
            except Exception:  # a bug, not an I/O problem: say so loudly, keep serving
                self.log.exception("recovery: cannot build the snapshot")
                return self._failed("cannot build the snapshot")
            error = gevent.get_hub().threadpool.apply(_write_or_error, (self.path, data))
            if error is not None:
                return self._failed(_reason(error))
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

"""Stats: message totals, connection and byte counters, and moving-window rates.

All counters of one process live in one flat block of int64 cells (a
``bytearray`` by default, or a worker's slot of a shared ``mmap``): the totals
first, then a ``TimeTable`` ring. One writer per block; readers in the same or
another process sum blocks with ``Snapshot.from_blocks``. A ``Snapshot`` is a
plain value: it sums with ``+``, turns into the SIGUSR2/``/stats`` JSON with
``as_dict()``, and carries its window buckets for the recovery file.

``SlotTable`` is the shared ``mmap`` of ``-workers N``, laid out here beside
the block it holds: per slot a few supervision cells (the heartbeat and the
pid of its worker; not metrics, never summed or shown), then one stats block.
The base slot's supervision cells hold the table's header (magic, layout,
slot count, boot id). With a recovery file the table is a file beside it
(``<recovery>.slots``), so that a master killed with -9 leaves its orphaned
workers' counts where a restarted master finds them (``open_saved``).
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import tempfile
import time
from collections.abc import Iterable, MutableSequence
from dataclasses import dataclass, field

from fooproxy import latency, native, timetable
from fooproxy.config import MAX_ADDRESS_BYTES, MAX_UPSTREAMS
from fooproxy.latency import Latency, Timer
from fooproxy.timetable import Clock, TimeTable

#: Counter cells, in block order. Append only: the order is the shared layout.
COUNTERS = (
    "msg_req",
    "msg_ack",
    "msg_nak",
    "msg_invalid",
    "connections_active",
    "connections_total",
    "bytes_client_to_server",
    "bytes_server_to_client",
    "upstream_errors",
    "pool_idle",
    "pool_open",
    "errors_internal",
)
_IDX = {name: i for i, name in enumerate(COUNTERS)}
# Counters that describe the present, not a history: never restored from a file.
GAUGES = frozenset({"connections_active", "pool_idle", "pool_open"})
_HEADER = 16  # cells reserved for counters (room to grow without a layout change)

# -- the upstreams section, appended after the time table ------------------------------
# A fixed number of entries, each keyed by the upstream's address (its text, NUL
# padded, in the first cells), then its values. Twice MAX_UPSTREAMS: a reload may
# replace every upstream while the sessions on the old ones still run. One writer
# (the process's Balancer, and its sessions' messages); readers merge by address.
UPSTREAM_ENTRIES = 2 * MAX_UPSTREAMS
_ADDRESS_CELLS = MAX_ADDRESS_BYTES // 8
#: Value cells of an entry, after its address. Append only.
UPSTREAM_FIELDS = ("up", "sessions_active", "sessions_total", "messages")
UPSTREAM_CELLS = _ADDRESS_CELLS + 8  # room for 4 more fields without a layout change
#: The ``up`` cell: in rotation, out of it, or no longer configured (kept while its sessions run).
UP, DOWN, REMOVED = 1, 0, -1
_UPSTREAMS_AT = _HEADER + timetable.CELLS
#: The latency section (``latency.py`` owns its layout): appended after the upstreams.
_LATENCY = _UPSTREAMS_AT + UPSTREAM_ENTRIES * UPSTREAM_CELLS
BLOCK_CELLS = _LATENCY + latency.CELLS
BLOCK_BYTES = BLOCK_CELLS * 8
_UP_FIELD = {name: _ADDRESS_CELLS + i for i, name in enumerate(UPSTREAM_FIELDS)}
_UP_ACTIVE, _UP_TOTAL = _UP_FIELD["sessions_active"], _UP_FIELD["sessions_total"]

# Cell indices for the hot path, derived from COUNTERS (never a literal order).
_REQ, _ACK, _NAK, _INV, _ACTIVE, _TOTAL, _B_C2S, _B_S2C, _UPERR, _INTERNAL = (
    _IDX[name]
    for name in (
        "msg_req", "msg_ack", "msg_nak", "msg_invalid", "connections_active", "connections_total",
        "bytes_client_to_server", "bytes_server_to_client", "upstream_errors", "errors_internal",
    )
)  # fmt: skip
# The time table's geometry, for the inlined write in Stats.record.
_TICKS, _SLOTS, _STRIDE = timetable.TICKS_PER_S, timetable.SLOTS, timetable.STRIDE
# The latency section's cells, for Stats.answered.
_L_ACK, _L_NAK = _LATENCY + latency.ACK_BUCKETS, _LATENCY + latency.NAK_BUCKETS
_L_ACK_SUM, _L_NAK_SUM = _LATENCY + latency.ACK_SUM_NS, _LATENCY + latency.NAK_SUM_NS
_L_UNANSWERED = _LATENCY + latency.UNANSWERED
_L_CONNECT, _L_CONNECT_SUM = _LATENCY + latency.CONNECT_BUCKETS, _LATENCY + latency.CONNECT_SUM_NS
_L_RING, _L_WSTRIDE, _L_WSLOTS = _LATENCY + latency.RING, latency.WSTRIDE, latency.WINDOW_S
_L_BOUNDS, _L_BUCKET = latency.BOUNDS, latency.bucket_of
_L_FAST, _L_FAST_PER_S, _L_FAST_S = latency.FAST, latency.FAST_PER_S, latency.FAST_S
_floor = math.floor  # a METH_O call: cheaper than int(float), which goes through type_call
_L_BEHIND = latency.MAX_ENTRIES - 1  # FIFO entries behind the timer's head
_L_EMPTY_SLOT = memoryview(bytearray(latency.WSTRIDE * 8)).cast("q")
_L_NB = latency.NB
# Stats._pending: ACK buckets, NAK buckets, then the two sums and the max (float seconds; ns in the block).
_PENDING_ACK_SUM, _PENDING_NAK_SUM, _PENDING_MAX = 2 * _L_NB, 2 * _L_NB + 1, 2 * _L_NB + 2
_PENDING_CELLS = 2 * _L_NB + 3


def _new_pending() -> MutableSequence[float]:
    """Stats._pending: a list, or with the extension a ``_flow.Pending`` of C cells that the
    C Flows add to in place (each list cell's ``+=`` allocated an object). Python indexes both alike."""
    if native.EXT is not None:
        return native.EXT.Pending(2 * _L_NB, _PENDING_CELLS - 2 * _L_NB)
    return [0] * _PENDING_CELLS


def new_block() -> memoryview:
    """A zeroed private block of int64 cells."""
    return memoryview(bytearray(BLOCK_BYTES)).cast("q")


class Stats:
    """The Go tool's Stats: here the single writer of one process's counter block
    (its own buffer, or its slot in the workers' table). Hot-path methods are O(1)."""

    def __init__(self, block: memoryview | None = None, clock: Clock = time.monotonic) -> None:
        self.block = new_block() if block is None else block
        self.clock = clock
        self.started = clock()
        self.table = TimeTable(self.block[_HEADER:], clock)
        #: Latency counts not yet in the block (``answered``, ``flush``): ACK buckets, NAK buckets, sums, max.
        self._pending = _new_pending()
        self._pending_sec = int(self.started)  # the second they were counted in

    # -- hot path ---------------------------------------------------------
    def record(
        self,
        to_server: bool,
        nbytes: int,
        counts: tuple[int, int, int, int],
        timer: Timer | None = None,
        data: bytes = b"",
        messages_cell: int = 0,
    ) -> None:
        """Account one forwarded chunk and the ``(req, ack, nak, invalid)`` lines it completed.

        It only records: the session keeps its own line counts (metrics never steer sessions).
        With the session's latency ``timer`` (``latency.Timer``, which only metrics read),
        a chunk's REQs are remembered and its answers timed, with the one clock
        reading the time table takes; lockstep's one owed chunk is the timer's
        ``head``, without the FIFO (``data`` is only read on the timer's rare paths).
        ``messages_cell`` (``messages_cell()``, non-zero with several upstreams) also
        counts the chunk's messages for the session's upstream: a cell index passed
        in rather than a wrapper around this method, which cost a Python call per
        chunk (W2 +11 % instructions per message, measured with ``foo-harness msgcost``).

        Called once per chunk in each direction: kept to a few cell updates, with
        the time table's write inlined: ``TimeTable.restore`` of one
        ``(0, req, resp)`` bucket, with this module's copies of its constants
        (``test_record_writes_the_cells_a_reference_writer_would`` holds them together).
        """
        c = self.block
        c[_B_C2S if to_server else _B_S2C] += nbytes
        req, ack, nak, inv = counts
        if inv:
            c[_INV] += inv
        if req:
            c[_REQ] += req
        resp = ack + nak
        if resp:
            if ack:
                c[_ACK] += ack
            if nak:
                c[_NAK] += nak
        elif not req:
            if inv and to_server and timer is not None:
                timer.sent(counts, data, self.clock())  # answered, so it holds its place
            return  # no request and no response: nothing for the time table
        if messages_cell:
            c[messages_cell] += req + resp
        now = self.clock()
        b = int(now * _TICKS)  # timetable.bucket_of, inlined
        i = _HEADER + (b % _SLOTS) * _STRIDE
        if c[i] != b:
            c[i] = b
            c[i + 1] = req
            c[i + 2] = resp
            if b // _TICKS != self._pending_sec:  # a new second: the pending latencies belong to the last
                self.flush()
                self._pending_sec = b // _TICKS
        else:
            if req:
                c[i + 1] += req
            if resp:
                c[i + 2] += resp
        if timer is None:
            return
        if to_server:
            if inv != 0 or resp != 0:
                timer.sent(counts, data, now)  # lines answered but not timed: in line order
            elif timer.head_r == 0 and timer.head_o == 0:  # nothing owed: this chunk's REQs are the head
                timer.head_t = now
                timer.head_r = req
            elif len(timer.fifo) < _L_BEHIND:
                timer.fifo.append((now, req, 0))
            else:
                timer.sent(counts, data, now)  # too much owed: coalesced
        elif resp != 0:
            owed = timer.head_r
            if resp <= owed and timer.head_o == 0:  # all of them answer the head: one latency
                seconds = now - timer.head_t
                timer.head_r = owed - resp
                if resp == owed and timer.fifo:
                    timer.next()
                if seconds > timer.max_s:
                    timer.max_s = seconds
                # self.answered(seconds, ack, nak), inlined (a unit test holds the two together)
                if seconds < _L_FAST_S:
                    i = _L_FAST[_floor(seconds * _L_FAST_PER_S)]  # the clock is monotonic: never negative
                else:
                    i = _L_BUCKET(_L_BOUNDS, seconds)
                pending = self._pending
                if resp == 1:  # lockstep: one answer, no multiplication
                    if ack == 1:
                        pending[i] += 1
                        pending[_PENDING_ACK_SUM] += seconds
                    else:
                        pending[_L_NB + i] += 1
                        pending[_PENDING_NAK_SUM] += seconds
                else:
                    if ack:
                        pending[i] += ack
                        pending[_PENDING_ACK_SUM] += seconds * ack
                    if nak:
                        pending[_L_NB + i] += nak
                        pending[_PENDING_NAK_SUM] += seconds * nak
                if seconds > pending[_PENDING_MAX]:
                    pending[_PENDING_MAX] = seconds
            else:
                timer.answered(counts, data, now)

    def answered(self, seconds: float, ack: int, nak: int) -> None:
        """``ack`` + ``nak`` answers, each ``seconds`` after its request.

        Counted in this process's pending lists (a list cell costs a fraction
        of a shared int64 cell); ``flush`` moves them into the block: at every
        ``snapshot()`` of this ``Stats``, and in a worker at each heartbeat.
        """
        i = _L_FAST[_floor(seconds * _L_FAST_PER_S)] if 0 <= seconds < _L_FAST_S else _L_BUCKET(_L_BOUNDS, seconds)
        pending = self._pending
        if ack:
            pending[i] += ack
            pending[_PENDING_ACK_SUM] += seconds * ack
        if nak:
            pending[_L_NB + i] += nak
            pending[_PENDING_NAK_SUM] += seconds * nak
        if seconds > pending[_PENDING_MAX]:
            pending[_PENDING_MAX] = seconds

    def flush(self) -> None:
        """Move the pending latency counts into the block: totals, and the window slot of their second.

        They all belong to ``_pending_sec``: ``record`` flushes at the first chunk of each new
        second, before it counts anything in it.
        """
        pending = self._pending
        if not any(pending):
            return
        if type(pending) is list:
            self._pending = [0] * _PENDING_CELLS
        else:  # a Pending: the C Flows keep it, so it is emptied in place
            pending = pending.take()
        c = self.block
        tag = self._pending_sec + 1
        w = _L_RING + (tag % _L_WSLOTS) * _L_WSTRIDE
        if c[w] != tag:  # a second not seen yet: the slot's old histogram is out of the window
            c[w : w + _L_WSTRIDE] = _L_EMPTY_SLOT
            c[w] = tag
        for i in range(_L_NB):
            ack, nak = pending[i], pending[_L_NB + i]
            if ack or nak:
                c[_L_ACK + i] += ack
                c[_L_NAK + i] += nak
                c[w + 1 + i] += ack + nak
        c[_L_ACK_SUM] += round(pending[_PENDING_ACK_SUM] * 1e9)
        c[_L_NAK_SUM] += round(pending[_PENDING_NAK_SUM] * 1e9)
        top = w + _L_WSTRIDE - 1
        longest = round(pending[_PENDING_MAX] * 1e9)
        if longest > c[top]:
            c[top] = longest

    def unanswered(self, requests: int) -> None:
        """A session ended owing answers to ``requests`` REQs."""
        self.block[_L_UNANSWERED] += requests

    def upstream_connected(self, seconds: float) -> None:
        """One upstream connect took ``seconds``."""
        c = self.block
        c[_L_CONNECT + _L_BUCKET(_L_BOUNDS, seconds)] += 1
        c[_L_CONNECT_SUM] += int(seconds * 1e9)

    def connection_opened(self) -> None:
        self.block[_ACTIVE] += 1
        self.block[_TOTAL] += 1

    def connection_closed(self) -> None:
        self.block[_ACTIVE] -= 1

    def upstream_error(self) -> None:
        self.block[_UPERR] += 1

    def internal_error(self) -> None:
        """A session ended by a bug of ours (``error: internal``): /health turns degraded while these rise."""
        self.block[_INTERNAL] += 1

    def set(self, name: str, value: int) -> None:
        self.block[_IDX[name]] = value

    def add(self, name: str, value: int = 1) -> None:
        self.block[_IDX[name]] += value

    def get(self, name: str) -> int:
        return self.block[_IDX[name]]

    # -- per upstream (the section after the time table) -------------------
    def upstream_entry(self, address: str) -> int:
        """The entry of ``address`` in this block (made if new), or -1 if the section is full.

        An entry is found again by its address (a reload that keeps an upstream
        keeps its counts); a new one takes a free entry, or one of a removed
        upstream whose sessions have all ended.
        """
        key = _address_key(address)
        free = -1
        for entry in range(UPSTREAM_ENTRIES):
            at = _entry_at(entry)
            name = bytes(self.block[at : at + _ADDRESS_CELLS].cast("B"))
            if name == key:
                return entry
            if free < 0 and (
                not any(name)
                or (self.block[at + _UP_FIELD["up"]] == REMOVED and self.block[at + _UP_FIELD["sessions_active"]] <= 0)
            ):
                free = entry
        if free >= 0:
            at = _entry_at(free)
            for i in range(at, at + UPSTREAM_CELLS):
                self.block[i] = 0
            self.block[at : at + _ADDRESS_CELLS].cast("B")[:] = key
        return free

    def set_upstream(self, entry: int, name: str, value: int) -> None:
        if entry >= 0:
            self.block[_entry_at(entry) + _UP_FIELD[name]] = value

    def add_upstream(self, entry: int, name: str, value: int = 1) -> None:
        if entry >= 0:
            self.block[_entry_at(entry) + _UP_FIELD[name]] += value

    def upstream_session(self, entry: int, opened: bool) -> None:
        """A session started on upstream ``entry`` (``sessions_active`` and ``_total`` + 1), or ended (active - 1)."""
        if entry >= 0:
            at = _entry_at(entry)
            if opened:
                self.block[at + _UP_ACTIVE] += 1
                self.block[at + _UP_TOTAL] += 1
            else:
                self.block[at + _UP_ACTIVE] -= 1

    def messages_cell(self, entry: int) -> int:
        """The cell counting the messages of upstream ``entry``'s sessions, for ``record`` (0: none)."""
        return _entry_at(entry) + _UP_FIELD["messages"] if entry >= 0 else 0

    # -- reading ----------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Totals and window counts as of now (pending latency counts flushed first)."""
        self.flush()
        return Snapshot.from_blocks([self.block], self.clock(), self.started)

    def restore(self, snap: Snapshot, now: float | None = None) -> None:
        """Add a saved snapshot's history (totals, live buckets) to this block."""
        for name, value in snap.totals.items():
            if name in _IDX and name not in GAUGES:
                self.block[_IDX[name]] += int(value)
        self.table.restore(snap.buckets, now)


@dataclass
class Snapshot:
    """A point-in-time reading of one or more counter blocks."""

    totals: dict[str, int]
    #: (req_1s, req_10s, resp_1s, resp_10s): events inside each window.
    windows: tuple[int, int, int, int] = (0, 0, 0, 0)
    uptime_s: float = 0.0
    #: Live window buckets as (age_in_buckets, requests, responses).
    buckets: list[tuple[int, int, int]] = field(default_factory=list)
    #: Per upstream address: the ``UPSTREAM_FIELDS`` merged over the blocks (``up``: the highest).
    upstreams: dict[str, dict[str, int]] = field(default_factory=dict)
    #: The latency histograms (not in the recovery file: they start at zero).
    latency: Latency = field(default_factory=Latency)

    @classmethod
    def from_blocks(cls, blocks: Iterable[memoryview], now: float, started: float) -> Snapshot:
        """Sum counter blocks (one process's, or every worker's slot) as of ``now``."""
        blocks = list(blocks)
        totals = {name: sum(b[i] for b in blocks) for i, name in enumerate(COUNTERS)}
        buckets = timetable.merge_buckets(*(TimeTable(b[_HEADER:]).buckets(now) for b in blocks))
        upstreams: dict[str, dict[str, int]] = {}
        for block in blocks:
            _merge_upstreams(upstreams, upstream_rows(block))
        return cls(
            totals=totals,
            windows=timetable.window_sums(buckets),
            uptime_s=max(0.0, now - started),
            buckets=buckets,
            upstreams=upstreams,
            latency=Latency.from_sections((b[_LATENCY:] for b in blocks), now),
        )

    def __add__(self, other: Snapshot) -> Snapshot:
        return Snapshot(
            totals={k: self.totals.get(k, 0) + other.totals.get(k, 0) for k in {*self.totals, *other.totals}},
            windows=tuple(a + b for a, b in zip(self.windows, other.windows, strict=True)),  # type: ignore[arg-type]
            uptime_s=max(self.uptime_s, other.uptime_s),
            buckets=timetable.merge_buckets(self.buckets, other.buckets),
            upstreams=_merge_upstreams(_merge_upstreams({}, self.upstreams), other.upstreams),
            latency=self.latency + other.latency,
        )

    def shown_upstreams(self) -> dict[str, dict[str, int | bool]]:
        """The ``upstreams`` object of the stats JSON: configured ones, and removed ones still in use."""
        out: dict[str, dict[str, int | bool]] = {}
        for address, row in self.upstreams.items():
            if row["up"] == REMOVED and row["sessions_active"] <= 0:
                continue
            out[address] = {
                "up": row["up"] == UP,
                "sessions_active": row["sessions_active"],
                "sessions_total": row["sessions_total"],
                "messages": row["messages"],
            }
            if row["up"] == REMOVED:
                out[address]["removed"] = True
        return out

    def as_dict(self) -> dict[str, int | float]:
        """The stats JSON object: the eight contract fields first, then extras."""
        t = self.totals
        req, ack, nak = t.get("msg_req", 0), t.get("msg_ack", 0), t.get("msg_nak", 0)
        r1, r10, s1, s10 = self.windows
        out: dict[str, int | float] = {
            "msg_total": req + ack + nak,
            "msg_req": req,
            "msg_ack": ack,
            "msg_nak": nak,
            "request_rate_1s": round(r1 / timetable.WINDOWS[0], 3),
            "request_rate_10s": round(r10 / timetable.WINDOWS[1], 3),
            "response_rate_1s": round(s1 / timetable.WINDOWS[0], 3),
            "response_rate_10s": round(s10 / timetable.WINDOWS[1], 3),
        }
        for name in COUNTERS[3:]:
            out[name] = t.get(name, 0)
        out["uptime_s"] = round(self.uptime_s, 3)
        out.update(self.latency.fields())
        if self.upstreams:  # the one nested field, last
            out["upstreams"] = self.shown_upstreams()  # type: ignore[assignment]
        return out


def _entry_at(entry: int) -> int:
    return _UPSTREAMS_AT + entry * UPSTREAM_CELLS


def _address_key(address: str) -> bytes:
    raw = address.encode("utf-8")[:MAX_ADDRESS_BYTES]
    return raw + b"\0" * (MAX_ADDRESS_BYTES - len(raw))


def upstream_rows(block: memoryview) -> dict[str, dict[str, int]]:
    """The upstream entries written in one block, by address."""
    rows: dict[str, dict[str, int]] = {}
    for entry in range(UPSTREAM_ENTRIES):
        at = _entry_at(entry)
        if not block[at]:
            continue  # the first cell holds the address's first bytes: zero means unused
        name = bytes(block[at : at + _ADDRESS_CELLS].cast("B")).rstrip(b"\0").decode("utf-8", "replace")
        rows[name] = {f: block[at + _UP_FIELD[f]] for f in UPSTREAM_FIELDS}
    return rows


def _merge_upstreams(into: dict[str, dict[str, int]], rows: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    for name, row in rows.items():
        have = into.get(name)
        if have is None:
            into[name] = dict(row)
            continue
        for f in UPSTREAM_FIELDS:
            have[f] = max(have[f], row[f]) if f == "up" else have[f] + row[f]
    return into


# -- the workers' shared table ---------------------------------------------------------
#: Cells before each slot's stats block: supervision data, not metrics.
SUPERVISION_CELLS = 8
_HEARTBEAT = 0  # time.monotonic_ns() of the worker's last stamp; 0 = not ready
_PID = 1  # the pid of the worker in the slot (written by the master at spawn); 0 = none
# The header, in the base slot's supervision cells (the base slot has no worker).
_MAGIC, _LAYOUT, _COUNT, _BOOT = 0, 1, 2, 3
MAGIC = int.from_bytes(b"fooslot1", "little")
#: A saved table's counts must be below this (as the recovery file's: int64 cells, never near overflow).
MAX_SAVED = 1 << 62
SLOT_CELLS = SUPERVISION_CELLS + BLOCK_CELLS
SLOT_BYTES = SLOT_CELLS * 8
_GAUGE_CELLS = tuple(_IDX[name] for name in sorted(GAUGES))
_MESSAGE_CELLS = (_REQ, _ACK, _NAK)


def boot_id() -> int:
    """This boot's id (60 bits of the kernel's boot_id): monotonic times compare only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return int(handle.read().strip().replace("-", "")[:15], 16)
    except (OSError, ValueError):
        return 0


class SlotTable:
    """Slots in one shared ``mmap``: ``0..workers-1`` for workers, then the base slot.

    Each slot is a heartbeat cell (``heartbeat``/``beat``) and a stats block
    (``blocks``). One writer per slot: a worker writes its own, the master
    writes the base slot and, only while no worker owns a slot, that slot's
    gauges and heartbeat.
    """

    def __init__(self, fd: int, mapping: mmap.mmap, path: str | None = None) -> None:
        self.fd = fd
        #: The file behind the table (None: anonymous memory).
        self.path = path
        self._mmap = mapping
        count = len(mapping) // SLOT_BYTES
        if count < 2 or len(mapping) % SLOT_BYTES:
            raise ValueError("not a worker table: %d bytes" % len(mapping))
        self.workers = count - 1
        view = memoryview(mapping)
        slots = [view[i * SLOT_BYTES : (i + 1) * SLOT_BYTES].cast("q") for i in range(count)]
        view.release()
        self._supervision = [slot[:SUPERVISION_CELLS] for slot in slots]
        self.blocks = [slot[SUPERVISION_CELLS:] for slot in slots]
        for slot in slots:
            slot.release()

    @classmethod
    def create(cls, workers: int, path: str | None = None) -> SlotTable:
        """A zeroed table for ``workers`` worker slots: at ``path`` (put in place by a rename, so a
        file or symlink planted there is replaced, never written through), or in an anonymous file."""
        size = (workers + 1) * SLOT_BYTES
        if path is not None:
            fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=os.path.dirname(path) or ".")
            try:
                os.ftruncate(fd, size)
                os.rename(tmp, path)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
        else:
            try:
                fd = os.memfd_create("fooproxy-stats")
            except (AttributeError, OSError):  # not Linux, or an old kernel
                fd, tmp = tempfile.mkstemp(prefix="fooproxy-stats-")
                os.unlink(tmp)
            os.ftruncate(fd, size)  # reads as zeros
        table = cls(fd, mmap.mmap(fd, size), path)
        table._stamp()
        return table

    @classmethod
    def open_saved(cls, path: str, workers: int) -> tuple[SlotTable | None, str | None]:
        """The table a previous master left at ``path``: ``(table, None)``; ``(None, None)`` when
        there is none; ``(None, why)`` when it cannot be trusted (layout, boot, values)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, "cannot open it: %s" % (exc.strerror or exc)
        size = (workers + 1) * SLOT_BYTES
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            os.close(fd)
            return None, "not a table for %d worker slots (%d bytes, want %d)" % (workers, info.st_size, size)
        table = cls(fd, mmap.mmap(fd, size), path)
        problem = table._check()
        if problem is not None:
            table.close()
            return None, problem
        return table, None

    def _stamp(self) -> None:
        header = self._supervision[-1]
        header[_MAGIC], header[_LAYOUT], header[_COUNT], header[_BOOT] = MAGIC, SLOT_CELLS, self.workers, boot_id()

    def _check(self) -> str | None:
        header = self._supervision[-1]
        if (header[_MAGIC], header[_LAYOUT], header[_COUNT]) != (MAGIC, SLOT_CELLS, self.workers):
            return "not a table of this version"
        if header[_BOOT] != boot_id():
            return "written before the last reboot"
        newest = timetable.bucket_of(time.monotonic()) + 1
        for block in self.blocks:
            if any(not 0 <= block[i] < MAX_SAVED for i in range(len(COUNTERS))):
                return "a counter out of range"
            ring = block[_HEADER:]
            if any(ring[i] > newest or ring[i] < 0 for i in range(0, timetable.CELLS, _STRIDE)):
                return "a time bucket from the future"
        return None

    def zero(self) -> None:
        """Every cell back to 0 (a saved table found stale before any worker started), header kept."""
        for view in (*self.blocks, *self._supervision):
            view[:] = memoryview(bytes(len(view) * 8)).cast("q")
        self._stamp()

    def remove(self) -> None:
        """Remove the table's file (a clean exit, after the final save: nothing is left to adopt)."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    @classmethod
    def attach(cls, fd: int) -> SlotTable:
        """Map the table the master created (a worker, given the descriptor)."""
        return cls(fd, mmap.mmap(fd, os.fstat(fd).st_size))

    @property
    def base(self) -> memoryview:
        """The master's own block: restored history, written by no worker."""
        return self.blocks[-1]

    def beat(self, slot: int, now_ns: int) -> None:
        """Stamp ``slot``'s heartbeat (its worker, every heartbeat interval)."""
        self._supervision[slot][_HEARTBEAT] = now_ns

    def set_pid(self, slot: int, pid: int) -> None:
        """Record the pid of the worker started in ``slot`` (the master, at spawn)."""
        self._supervision[slot][_PID] = pid

    def pid(self, slot: int) -> int:
        """The pid of the worker last started in ``slot`` (0: none since the slot was reset)."""
        return self._supervision[slot][_PID]

    def heartbeat_ns(self, slot: int) -> int:
        """The last heartbeat stamped in ``slot`` (``time.monotonic_ns()``), 0 before the first."""
        return self._supervision[slot][_HEARTBEAT]

    def messages(self, slot: int) -> int:
        """REQ + ACK + NAK counted in ``slot`` (for log lines)."""
        block = self.blocks[slot]
        return sum(block[i] for i in _MESSAGE_CELLS)

    def reset(self, slot: int) -> None:
        """Zero the gauges and the heartbeat of a slot whose worker is gone.

        Its connections and pool died with it; totals and window buckets stay:
        the replacement continues from them. A zero heartbeat marks the slot
        "not ready" until the replacement stamps its first one.
        """
        block = self.blocks[slot]
        for i in _GAUGE_CELLS:
            block[i] = 0
        for entry in range(UPSTREAM_ENTRIES):  # its view of the upstreams and its sessions are gone too
            if block[_entry_at(entry)]:
                block[_entry_at(entry) + _UP_FIELD["up"]] = REMOVED
                block[_entry_at(entry) + _UP_FIELD["sessions_active"]] = 0
        self._supervision[slot][_HEARTBEAT] = 0
        self._supervision[slot][_PID] = 0

    def snapshot(self, started: float, now: float | None = None) -> Snapshot:
        """All stats blocks summed, as of ``now`` (default: the system-wide monotonic clock)."""
        return Snapshot.from_blocks(self.blocks, time.monotonic() if now is None else now, started)

    def close(self) -> None:
        """Unmap and close (tests; a process simply exits)."""
        for view in (*self.blocks, *self._supervision):
            view.release()
        self.blocks = []
        self._supervision = []
        self._mmap.close()
        os.close(self.fd)

"""Stats: message totals, connection and byte counters, and moving-window rates.

All counters of one process live in one flat block of int64 cells (a
``bytearray`` by default, or a worker's slot of a shared ``mmap``): the totals
first, then a ``TimeTable`` ring. One writer per block; readers in the same or
another process sum blocks with ``Snapshot.from_blocks``. A ``Snapshot`` is a
plain value: it sums with ``+``, turns into the SIGUSR2/``/stats`` JSON with
``as_dict()``, and carries its window buckets for the recovery file.

``SlotTable`` is the shared ``mmap`` of ``-workers N``, laid out here beside
the block it holds: per slot a few supervision cells (the heartbeat; not
metrics, never summed or shown), then one stats block.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from fooproxy import latency, timetable
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
#: The latency section (``latency.py`` owns its layout): appended after the time table.
_LATENCY = _HEADER + timetable.CELLS
BLOCK_CELLS = _LATENCY + latency.CELLS
BLOCK_BYTES = BLOCK_CELLS * 8

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
        self._pending = [0] * _PENDING_CELLS
        self._pending_sec = int(self.started)  # the second they were counted in

    # -- hot path ---------------------------------------------------------
    def record(
        self,
        to_server: bool,
        nbytes: int,
        counts: tuple[int, int, int, int],
        timer: Timer | None = None,
        data: bytes = b"",
    ) -> None:
        """Account one forwarded chunk and the ``(req, ack, nak, invalid)`` lines it completed.

        It only records: the session keeps its own line counts (metrics never steer sessions).
        With the session's latency ``timer`` (``latency.Timer``, which only metrics read),
        a chunk's REQs are remembered and its answers timed, with the one clock
        reading the time table takes; lockstep's one owed chunk is the timer's
        ``head``, without the FIFO (``data`` is only read on the timer's rare paths).

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
        self._pending = [0] * _PENDING_CELLS
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
    #: The latency histograms (not in the recovery file: they start at zero).
    latency: Latency = field(default_factory=Latency)

    @classmethod
    def from_blocks(cls, blocks: Iterable[memoryview], now: float, started: float) -> Snapshot:
        """Sum counter blocks (one process's, or every worker's slot) as of ``now``."""
        blocks = list(blocks)
        totals = {name: sum(b[i] for b in blocks) for i, name in enumerate(COUNTERS)}
        buckets = timetable.merge_buckets(*(TimeTable(b[_HEADER:]).buckets(now) for b in blocks))
        return cls(
            totals=totals,
            windows=timetable.window_sums(buckets),
            uptime_s=max(0.0, now - started),
            buckets=buckets,
            latency=Latency.from_sections((b[_LATENCY:] for b in blocks), now),
        )

    def __add__(self, other: Snapshot) -> Snapshot:
        return Snapshot(
            totals={k: self.totals.get(k, 0) + other.totals.get(k, 0) for k in {*self.totals, *other.totals}},
            windows=tuple(a + b for a, b in zip(self.windows, other.windows, strict=True)),  # type: ignore[arg-type]
            uptime_s=max(self.uptime_s, other.uptime_s),
            buckets=timetable.merge_buckets(self.buckets, other.buckets),
            latency=self.latency + other.latency,
        )

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
        return out


# -- the workers' shared table ---------------------------------------------------------
#: Cells before each slot's stats block: supervision data, not metrics.
SUPERVISION_CELLS = 8
_HEARTBEAT = 0  # time.monotonic_ns() of the worker's last stamp; 0 = not ready
SLOT_CELLS = SUPERVISION_CELLS + BLOCK_CELLS
SLOT_BYTES = SLOT_CELLS * 8
_GAUGE_CELLS = tuple(_IDX[name] for name in sorted(GAUGES))
_MESSAGE_CELLS = (_REQ, _ACK, _NAK)


class SlotTable:
    """Slots in one shared ``mmap``: ``0..workers-1`` for workers, then the base slot.

    Each slot is a heartbeat cell (``heartbeat``/``beat``) and a stats block
    (``blocks``). One writer per slot: a worker writes its own, the master
    writes the base slot and, only while no worker owns a slot, that slot's
    gauges and heartbeat.
    """

    def __init__(self, fd: int, mapping: mmap.mmap) -> None:
        self.fd = fd
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
    def create(cls, workers: int) -> SlotTable:
        """A zeroed table for ``workers`` workers, in an anonymous file (no name to clean up)."""
        size = (workers + 1) * SLOT_BYTES
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

    def beat(self, slot: int, now_ns: int) -> None:
        """Stamp ``slot``'s heartbeat (its worker, every heartbeat interval)."""
        self._supervision[slot][_HEARTBEAT] = now_ns

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
        self._supervision[slot][_HEARTBEAT] = 0

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

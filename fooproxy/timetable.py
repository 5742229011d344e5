"""TimeTable: moving-window event counts in lazily recycled time buckets.

A ring of ``SLOTS`` buckets of ``BUCKET_S`` seconds covers the longest window
(10 s in 10 ms buckets). Each bucket carries the absolute bucket number it
holds; a write into a bucket whose number is stale resets it first, and a read
sums only buckets inside the window. So time advances on write and on read,
with no ticker greenlet and no lock (one writer per table).

The ring lives in a caller-supplied ``memoryview`` of int64 (see ``stats.py``),
so a table can sit in a worker's shared-memory slot and be summed by another
process; the clock is injectable so tests are exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

#: Buckets per second; a bucket's number is ``int(t * TICKS_PER_S)`` (an exact integer product).
TICKS_PER_S = 100
BUCKET_S = 1 / TICKS_PER_S
SLOTS = 1000  # 10 s of 10 ms buckets
SERIES = 2  # requests, responses
#: int64 cells per bucket: its absolute number (the tag), then one count per series.
STRIDE = 1 + SERIES
WINDOWS = (1.0, 10.0)
#: Buckets inside the short (1 s) window.
SHORT = int(WINDOWS[0] * TICKS_PER_S)
#: int64 cells one table needs.
CELLS = SLOTS * STRIDE

Clock = Callable[[], float]
#: A live bucket as read out of a table: ``(age_in_buckets, requests, responses)``.
Bucket = tuple[int, int, int]


def bucket_of(t: float) -> int:
    """Absolute bucket number of monotonic time ``t``."""
    return int(t * TICKS_PER_S)


class TimeTable:
    """The Go tool's TimeTable: requests and responses per 10 ms bucket over the last 10 s.

    Read and restored through this class; written on the hot path by
    ``Stats.record``, which inlines the write with this module's constants
    (``TICKS_PER_S``, ``SLOTS``, ``STRIDE``); a unit test holds the two to the
    same cells.
    """

    __slots__ = ("_cells", "_clock")

    def __init__(self, cells: memoryview, clock: Clock = time.monotonic) -> None:
        if len(cells) < CELLS:
            raise ValueError("TimeTable needs %d int64 cells" % CELLS)
        self._cells = cells
        self._clock = clock

    def window_counts(self, now: float | None = None) -> tuple[int, int, int, int]:
        """``(req_1s, req_10s, resp_1s, resp_10s)``: events inside each window."""
        return window_sums(self.buckets(now))

    def buckets(self, now: float | None = None) -> list[Bucket]:
        """Live buckets as ``(age_in_buckets, requests, responses)``, youngest first."""
        cur = bucket_of(self._clock() if now is None else now)
        cells = self._cells
        out = []
        for i in range(0, CELLS, STRIDE):
            age = cur - cells[i]
            if 0 <= age < SLOTS and (cells[i + 1] or cells[i + 2]):
                out.append((age, cells[i + 1], cells[i + 2]))
        out.sort()
        return out

    def restore(self, buckets: Iterable[Bucket], now: float | None = None) -> None:
        """Add ``(age, requests, responses)`` buckets in, aged to ``now`` (a stale bucket is reset first)."""
        cur = bucket_of(self._clock() if now is None else now)
        cells = self._cells
        for age, req, resp in buckets:
            if not 0 <= age < SLOTS:
                continue
            b = cur - age
            i = (b % SLOTS) * STRIDE
            if cells[i] != b:
                cells[i], cells[i + 1], cells[i + 2] = b, 0, 0
            cells[i + 1] += req
            cells[i + 2] += resp


def merge_buckets(*sources: Iterable[Bucket]) -> list[Bucket]:
    """Buckets of the same age summed, older than the ring dropped, youngest first.

    The one merge: summing workers' tables, adding snapshots, loading a recovery file.
    """
    merged: dict[int, list[int]] = {}
    for source in sources:
        for age, req, resp in source:
            if age < SLOTS:
                slot = merged.get(age)
                if slot is None:
                    merged[age] = [req, resp]
                else:
                    slot[0] += req
                    slot[1] += resp
    return [(age, r, s) for age, (r, s) in sorted(merged.items())]


def window_sums(buckets: Iterable[Bucket]) -> tuple[int, int, int, int]:
    """``(req_1s, req_10s, resp_1s, resp_10s)`` of live buckets: the one window sum."""
    r1 = r10 = s1 = s10 = 0
    for age, req, resp in buckets:
        r10 += req
        s10 += resp
        if age < SHORT:
            r1 += req
            s1 += resp
    return r1, r10, s1, s10

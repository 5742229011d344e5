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

BUCKET_S = 0.01
SLOTS = 1000  # 10 s of 10 ms buckets
SERIES = 2  # requests, responses
WINDOWS = (1.0, 10.0)
#: int64 cells one table needs: tag, then one count per series, per slot.
CELLS = SLOTS * (1 + SERIES)

Clock = Callable[[], float]


def bucket_of(t: float) -> int:
    """Absolute bucket number of monotonic time ``t``."""
    return int(t * 100)  # 1 / BUCKET_S, kept exact for integers


class TimeTable:
    """Counts of requests and responses per 10 ms bucket over the last 10 s."""

    __slots__ = ("_cells", "_clock")

    def __init__(self, cells: memoryview, clock: Clock = time.monotonic) -> None:
        if len(cells) < CELLS:
            raise ValueError("TimeTable needs %d int64 cells" % CELLS)
        self._cells = cells
        self._clock = clock

    def add(self, requests: int, responses: int) -> None:
        """Record events that happened now."""
        b = bucket_of(self._clock())
        i = (b % SLOTS) * 3
        cells = self._cells
        if cells[i] != b:
            cells[i] = b
            cells[i + 1] = requests
            cells[i + 2] = responses
        else:
            cells[i + 1] += requests
            cells[i + 2] += responses

    def window_counts(self, now: float | None = None) -> tuple[int, int, int, int]:
        """``(req_1s, req_10s, resp_1s, resp_10s)``: events inside each window."""
        return window_counts([self._cells], self._clock() if now is None else now)

    def buckets(self, now: float | None = None) -> list[tuple[int, int, int]]:
        """Live buckets as ``(age_in_buckets, requests, responses)``, for saving."""
        cur = bucket_of(self._clock() if now is None else now)
        cells = self._cells
        out = []
        for i in range(0, CELLS, 3):
            age = cur - cells[i]
            if 0 <= age < SLOTS and (cells[i + 1] or cells[i + 2]):
                out.append((age, cells[i + 1], cells[i + 2]))
        return out

    def restore(self, buckets: Iterable[tuple[int, int, int]], now: float | None = None) -> None:
        """Add saved ``(age, requests, responses)`` buckets back, aged to ``now``."""
        cur = bucket_of(self._clock() if now is None else now)
        cells = self._cells
        for age, req, resp in buckets:
            if not 0 <= age < SLOTS:
                continue
            b = cur - age
            i = (b % SLOTS) * 3
            if cells[i] != b:
                cells[i], cells[i + 1], cells[i + 2] = b, 0, 0
            cells[i + 1] += req
            cells[i + 2] += resp


def window_counts(tables: Iterable[memoryview], now: float) -> tuple[int, int, int, int]:
    """Sum the 1 s and 10 s windows of several tables' cells at time ``now``."""
    cur = bucket_of(now)
    short = int(WINDOWS[0] / BUCKET_S)
    r1 = r10 = s1 = s10 = 0
    for cells in tables:
        for i in range(0, CELLS, 3):
            age = cur - cells[i]
            if 0 <= age < SLOTS:
                req, resp = cells[i + 1], cells[i + 2]
                r10 += req
                s10 += resp
                if age < short:
                    r1 += req
                    s1 += resp
    return r1, r10, s1, s10

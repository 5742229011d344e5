"""Per-request latency: the bucket layout, a session's owed-answer FIFO, and reading the cells back.

A REQ's latency is the time from the moment its chunk was handed to the
server until its answer (the next ACK/NAK line server->client on that session,
the server answers in order) was handed to the client. ``Timer`` is one
session's FIFO: one entry per client->server chunk, ``(when, reqs, others)``,
not one per message; ``others`` are the chunk's lines the server also answers
but that are not timed (invalid lines get ``NAK 0 ERRDECODE``; an ``ACK``/``NAK``
from a client is answered like a REQ). Past ``MAX_ENTRIES`` owed chunks the
newest entry absorbs the next chunks (keeping its older time: a coalesced
request is never reported faster than it was). Answers with nothing owed are
not timed; REQs still owed when the session ends count in ``requests_unanswered``.

The histogram cells are a section at the end of each stats block (``stats.py``
writes them in ``Stats.answered``; this module owns the offsets), so workers'
histograms sum exactly like the counters: per result (ACK, NAK) a cumulative
histogram over ``BOUNDS`` (log-spaced, 10 per decade, 25 µs to 10 s, then
+Inf) with its sum in ns, the unanswered count, the upstream connect
histogram, and a ring of ``WINDOW_S`` one-second histograms (ACK and NAK
together, with their max) for the current percentiles.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from fooproxy import native
from fooproxy.protocol import ACK, answer_types, request_runs

#: Bucket upper bounds in seconds (Prometheus ``le``): the R10 series, 25 µs .. 10 s.
_MANTISSAS = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
BOUNDS: tuple[float, ...] = tuple(
    b
    for b in (float("%.6g" % (m * 10.0**e)) for e in range(-5, 2) for m in _MANTISSAS)
    if 25e-6 - 1e-12 <= b <= 10.0 + 1e-9
)
#: Buckets per histogram: one per bound, then the overflow (> 10 s, ``+Inf``).
NB = len(BOUNDS) + 1
#: The moving window: one histogram per second, the current one included.
WINDOW_S = 10
#: Owed client->server chunks remembered per session before the newest absorbs the next.
MAX_ENTRIES = 1024

# -- the section's layout (offsets into the latency section of a stats block) --------
ACK_BUCKETS = 0
NAK_BUCKETS = ACK_BUCKETS + NB
ACK_SUM_NS = NAK_BUCKETS + NB
NAK_SUM_NS = ACK_SUM_NS + 1
UNANSWERED = NAK_SUM_NS + 1
CONNECT_BUCKETS = UNANSWERED + 1
CONNECT_SUM_NS = CONNECT_BUCKETS + NB
RING = CONNECT_SUM_NS + 1
#: Cells per window slot: its tag (absolute second + 1; 0 = never written), the buckets, the max in ns.
WSTRIDE = 1 + NB + 1
CELLS = RING + WINDOW_S * WSTRIDE

bucket_of = bisect.bisect_left  # bucket_of(BOUNDS, seconds): the first bound >= seconds (``le``)

#: The hot path's bucket lookup below ``FAST_S``: ``FAST[int(seconds * FAST_PER_S)]`` is
#: the bucket of that half-microsecond step (every bound is a multiple of 0.5 µs), so
#: a latency less than 0.5 µs above a bound counts in that bound's bucket.
FAST_PER_S = 2_000_000
FAST_S = 0.131072
FAST = bytearray(int(FAST_S * FAST_PER_S))
_start = 0
for _j, _bound in enumerate(BOUNDS):
    _end = min(round(_bound * FAST_PER_S) + 1, len(FAST))
    FAST[_start:_end] = bytes([_j]) * max(0, _end - _start)
    _start = max(_start, _end)
FAST[_start:] = bytes([len(BOUNDS)]) * (len(FAST) - _start)
FAST = bytes(FAST)
del _start, _j, _bound, _end


class _TimerState:
    """The pure-Python path's base of ``Timer``: its five attributes as ``__slots__``."""

    __slots__ = ("head_t", "head_r", "head_o", "max_s", "fifo")


#: Timer's state: with the extension, ``_flow.TimerState``, the same five attributes as C
#: values, which the C Flow reads and writes in place (a float per write otherwise).
_TimerBase: type = native.EXT.TimerState if native.EXT is not None else _TimerState


class Timer(_TimerBase):  # type: ignore[misc,valid-type]
    """One session's owed lines, oldest first, written by ``Stats.record`` (which only metrics read).

    The oldest entry is kept unpacked (``head_t``, ``head_r``, ``head_o``): lockstep
    traffic never has more than one, and ``Stats.record`` handles it inline. The
    entries behind it are in ``fifo``. Owned by the session (``DataBus``), which
    calls ``close()`` at its end.
    """

    __slots__ = ("_stats",)

    def __init__(self, stats) -> None:
        self.max_s = 0.0  # the session's largest latency (its close line)
        self.head_t = 0.0
        self.head_r = self.head_o = 0
        # A list, not a deque: an empty deque is 760 bytes and a list 56, paid by every session,
        # idle ones too (W5), while lockstep traffic never puts anything here. A pipelining session
        # keeps it short (one entry per chunk, at most MAX_ENTRIES), so pop(0) moves few pointers.
        self.fifo: list[tuple[float, int, int]] = []
        self._stats = stats

    def _unfold(self) -> list[tuple[float, int, int]]:
        fifo = self.fifo
        if self.head_r or self.head_o:
            fifo.insert(0, (self.head_t, self.head_r, self.head_o))
            self.head_r = self.head_o = 0
        return fifo

    def _fold(self) -> None:
        if self.fifo:
            self.head_t, self.head_r, self.head_o = self.fifo.pop(0)

    def next(self) -> None:
        """The head was answered in full: the next owed entry becomes the head."""
        self.head_t, self.head_r, self.head_o = self.fifo.pop(0)

    def sent(self, counts: tuple[int, int, int, int], data: bytes, now: float) -> None:
        """A client->server chunk was delivered at ``now`` with these ``(req, ack, nak, invalid)`` lines."""
        req, ack, nak, inv = counts
        fifo = self._unfold()
        others = ack + nak + inv
        if len(fifo) >= MAX_ENTRIES:  # too much owed: the newest entry takes it all
            when, r, o = fifo[-1]
            fifo[-1] = (when, r + req, o + others)
        elif not others:
            fifo.append((now, req, 0))
        else:  # untimed lines among the REQs: one entry per run, in line order
            fifo.extend((now, r, o) for r, o in request_runs(data, req))
        self._fold()

    def answered(self, counts: tuple[int, int, int, int], data: bytes, now: float) -> None:
        """A server->client chunk was delivered at ``now``; its ACK/NAK lines answer the oldest owed lines."""
        ack, nak = counts[1], counts[2]
        n = ack + nak
        fifo = self._unfold()
        if not n or not fifo:
            return  # nothing answered, or answers nobody asked for: not timed
        record = self._stats.answered
        # The answers take the owed lines in order. An entry is REQs or other
        # lines, never both (but past MAX_ENTRIES, where its REQs are taken first).
        order = answer_types(data, ack, nak) if ack and nak else None
        pos = 0
        while pos < n and fifo:
            when, r, o = fifo[0]
            take = min(n - pos, r + o)
            timed = min(take, r)
            if timed:
                if order is None:
                    a = timed if ack else 0
                else:
                    a = order[pos : pos + timed].count(ACK)
                seconds = now - when
                if seconds > self.max_s:
                    self.max_s = seconds
                record(seconds, a, timed - a)
            pos += take
            r -= timed
            o -= take - timed
            if r + o:
                fifo[0] = (when, r, o)
            else:
                fifo.pop(0)
                self.head_t = when  # where Timer.next would leave it, as the C path (answer_entries) does
        self._fold()

    def close(self) -> int:
        """The session ended: its REQs still owed count as unanswered. Returns how many."""
        if not self.head_r and not self.fifo:  # nothing owed: how a lockstep session ends
            self.head_o = 0
            return 0
        owed = sum(r for _, r, _ in self._unfold())
        self.fifo.clear()
        if owed:
            self._stats.unanswered(owed)
        return owed


# -- reading ------------------------------------------------------------------------------
@dataclass
class Latency:
    """The latency section of one or more blocks, summed: totals and the live window."""

    ack: list[int] = field(default_factory=lambda: [0] * NB)
    nak: list[int] = field(default_factory=lambda: [0] * NB)
    ack_sum_ns: int = 0
    nak_sum_ns: int = 0
    unanswered: int = 0
    connect: list[int] = field(default_factory=lambda: [0] * NB)
    connect_sum_ns: int = 0
    #: The window's histogram (ACK and NAK together) and its largest latency, in ns.
    window: list[int] = field(default_factory=lambda: [0] * NB)
    window_max_ns: int = 0

    @classmethod
    def from_sections(cls, sections: Iterable[memoryview], now: float) -> Latency:
        out = cls()
        cur = int(now) + 1
        for c in sections:
            for i in range(NB):
                out.ack[i] += c[ACK_BUCKETS + i]
                out.nak[i] += c[NAK_BUCKETS + i]
                out.connect[i] += c[CONNECT_BUCKETS + i]
            out.ack_sum_ns += c[ACK_SUM_NS]
            out.nak_sum_ns += c[NAK_SUM_NS]
            out.unanswered += c[UNANSWERED]
            out.connect_sum_ns += c[CONNECT_SUM_NS]
            for s in range(WINDOW_S):
                w = RING + s * WSTRIDE
                tag = c[w]
                if tag and 0 <= cur - tag < WINDOW_S:
                    for i in range(NB):
                        out.window[i] += c[w + 1 + i]
                    out.window_max_ns = max(out.window_max_ns, c[w + WSTRIDE - 1])
        return out

    def __add__(self, other: Latency) -> Latency:
        def add(a: list[int], b: list[int]) -> list[int]:
            return [x + y for x, y in zip(a, b, strict=True)]

        return Latency(
            add(self.ack, other.ack),
            add(self.nak, other.nak),
            self.ack_sum_ns + other.ack_sum_ns,
            self.nak_sum_ns + other.nak_sum_ns,
            self.unanswered + other.unanswered,
            add(self.connect, other.connect),
            self.connect_sum_ns + other.connect_sum_ns,
            add(self.window, other.window),
            max(self.window_max_ns, other.window_max_ns),
        )

    def window_quantile(self, q: float) -> float:
        """The ``q`` quantile of the window in seconds (0.0 when empty).

        As Prometheus's ``histogram_quantile`` does: linear inside the bucket
        that holds the rank, then capped at the window's largest latency.
        """
        return quantile(self.window, q, self.window_max_ns / 1e9)

    def fields(self) -> dict[str, float | int]:
        """The extra SIGUSR2 / ``/stats`` fields."""
        return {
            "latency_p50_ms": round(self.window_quantile(0.50) * 1e3, 3),
            "latency_p90_ms": round(self.window_quantile(0.90) * 1e3, 3),
            "latency_p99_ms": round(self.window_quantile(0.99) * 1e3, 3),
            "latency_max_ms": round(self.window_max_ns / 1e6, 3),
            "requests_unanswered": self.unanswered,
        }


def quantile(buckets: list[int], q: float, largest: float) -> float:
    """The ``q`` quantile of per-bucket counts over ``BOUNDS`` (+Inf last), capped at ``largest`` seconds."""
    total = sum(buckets)
    if not total:
        return 0.0
    rank = q * total
    cum = 0
    for i, count in enumerate(buckets):
        if count and cum + count >= rank:
            if i == len(BOUNDS):
                return largest  # the overflow bucket: its largest value is all we know
            lower = BOUNDS[i - 1] if i else 0.0
            value = lower + (BOUNDS[i] - lower) * (rank - cum) / count
            return min(value, largest) if largest else value
        cum += count
    return largest

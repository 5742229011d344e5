"""Totals and moving windows with an injected clock, so every number is exact."""

from __future__ import annotations

import json

import pytest

from fooproxy.protocol import Counts
from fooproxy.stats import BLOCK_BYTES, Snapshot, Stats, new_block

REQUIRED = {
    "msg_total": int,
    "msg_req": int,
    "msg_ack": int,
    "msg_nak": int,
    "request_rate_1s": float,
    "request_rate_10s": float,
    "response_rate_1s": float,
    "response_rate_10s": float,
}


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def steady(stats: Stats, clock: FakeClock, per_second: int, seconds: float) -> None:
    """Feed ``per_second`` REQs and as many ACKs, evenly spread."""
    step = 1.0 / per_second
    for _ in range(int(per_second * seconds)):
        clock.t += step
        stats.record(True, 10, Counts(req=1))
        stats.record(False, 40, Counts(ack=1))


def test_fields_and_types():
    stats = Stats(clock=FakeClock())
    stats.record(True, 12, Counts(req=2, invalid=1))
    stats.record(False, 80, Counts(ack=1, nak=1))
    d = stats.snapshot().as_dict()
    for name, typ in REQUIRED.items():
        assert type(d[name]) is typ, name
    assert list(d)[:8] == list(REQUIRED)
    assert (d["msg_total"], d["msg_req"], d["msg_ack"], d["msg_nak"], d["msg_invalid"]) == (4, 2, 1, 1, 1)
    assert d["bytes_client_to_server"] == 12 and d["bytes_server_to_client"] == 80
    for extra in ("connections_active", "connections_total", "upstream_errors", "uptime_s"):
        assert extra in d
    json.loads(json.dumps(d))


def test_steady_200_per_second_reads_200():
    clock = FakeClock()
    stats = Stats(clock=clock)
    steady(stats, clock, 200, 12)
    d = stats.snapshot().as_dict()
    assert d["request_rate_10s"] == pytest.approx(200, rel=0.05)
    assert d["request_rate_1s"] == pytest.approx(200, rel=0.12)
    assert d["response_rate_10s"] == pytest.approx(200, rel=0.05)
    assert d["response_rate_1s"] == pytest.approx(200, rel=0.12)


def test_rates_decay_after_traffic_stops():
    clock = FakeClock()
    stats = Stats(clock=clock)
    steady(stats, clock, 200, 12)
    clock.t += 1.3
    d = stats.snapshot().as_dict()
    assert d["request_rate_1s"] == 0.0 and d["response_rate_1s"] == 0.0
    clock.t += 5.0 - 1.3
    d = stats.snapshot().as_dict()
    assert d["request_rate_10s"] == pytest.approx(100, rel=0.05)
    clock.t += 5.1
    d = stats.snapshot().as_dict()
    assert d["request_rate_10s"] == 0.0
    assert d["msg_req"] == 2400  # totals never decay


def test_window_counts_only_what_is_inside():
    clock = FakeClock()
    stats = Stats(clock=clock)
    stats.record(True, 1, Counts(req=300))  # long ago
    clock.t += 20
    for _ in range(300):
        clock.t += 10 / 300
        stats.record(True, 1, Counts(req=1))
    assert stats.snapshot().as_dict()["request_rate_10s"] == pytest.approx(30.0, abs=0.2)


def test_snapshots_sum_exactly():
    clock = FakeClock()
    a, b = Stats(clock=clock), Stats(clock=clock)
    a.record(True, 5, Counts(req=3))
    clock.t += 0.5
    b.record(True, 7, Counts(req=4))
    b.record(False, 9, Counts(nak=4))
    summed = a.snapshot() + b.snapshot()
    both = Snapshot.from_blocks([a.block, b.block], clock(), a.started)
    assert summed.totals == both.totals
    assert summed.windows == both.windows == (7, 7, 4, 4)
    assert summed.as_dict()["msg_total"] == 11


def test_block_in_shared_buffer_is_the_same_counters():
    import mmap

    shm = mmap.mmap(-1, 2 * BLOCK_BYTES)
    slot = memoryview(shm)[BLOCK_BYTES:].cast("q")
    writer = Stats(block=slot, clock=FakeClock())
    writer.record(True, 10, Counts(req=5))
    reader = memoryview(shm)[BLOCK_BYTES:].cast("q")
    assert Snapshot.from_blocks([reader], 1000.0, 1000.0).totals["msg_req"] == 5
    del slot, reader, writer


def test_restore_adds_history_but_not_gauges():
    clock = FakeClock()
    old = Stats(clock=clock)
    old.connection_opened()
    steady(old, clock, 100, 3)
    snap = old.snapshot()
    new = Stats(clock=clock)
    clock.t += 2
    aged = Snapshot(totals=snap.totals, buckets=[(age + 200, r, s) for age, r, s in snap.buckets])
    new.restore(aged)
    d = new.snapshot().as_dict()
    assert d["msg_req"] == 300 and d["connections_total"] == 1
    assert d["connections_active"] == 0
    assert d["request_rate_10s"] == pytest.approx(30.0, abs=0.5)
    assert d["request_rate_1s"] == 0.0


def test_new_block_is_zero():
    assert not any(new_block())


def _reference_record(block, now: float, to_server: bool, nbytes: int, counts: Counts) -> None:
    """What ``Stats.record`` must write, spelled out through the named API (no inlining)."""
    from fooproxy.stats import _HEADER, COUNTERS
    from fooproxy.timetable import TimeTable

    cell = COUNTERS.index
    block[cell("bytes_client_to_server" if to_server else "bytes_server_to_client")] += nbytes
    for name, n in zip(("msg_req", "msg_ack", "msg_nak", "msg_invalid"), counts, strict=True):
        block[cell(name)] += n
    if counts.req or counts.ack or counts.nak:
        TimeTable(block[_HEADER:]).restore([(0, counts.req, counts.ack + counts.nak)], now)


def test_record_writes_the_cells_a_reference_writer_would():
    """The inlined bucket write in ``record`` cannot drift from the table's layout or COUNTERS' order."""
    import random

    rng = random.Random(15)
    clock = FakeClock(5000.0)
    stats = Stats(clock=clock)
    expected = new_block()
    for _ in range(5000):
        # Same bucket, next bucket, a jump past the ring (stale buckets are reset), and wrap-around.
        clock.t += rng.choice((0.0, 0.004, 0.01, 0.37, 3.3, 10.0, 25.0))
        counts = Counts(*(rng.choice((0, 0, 1, 2, 7)) for _ in range(4)))
        to_server, nbytes = rng.random() < 0.5, rng.randrange(1, 70000)
        assert stats.record(to_server, nbytes, counts) is None  # metrics record, they answer nothing
        _reference_record(expected, clock.t, to_server, nbytes, counts)
        assert stats.block.tobytes() == expected.tobytes()


def test_merge_buckets_sums_equal_ages_and_drops_what_left_the_ring():
    from fooproxy.timetable import SLOTS, merge_buckets, window_sums

    merged = merge_buckets([(3, 1, 2), (150, 4, 0)], [(3, 10, 20), (SLOTS, 99, 99)], [])
    assert merged == [(3, 11, 22), (150, 4, 0)]
    assert window_sums(merged) == (11, 15, 22, 22)  # age 150 (1.5 s) is in the 10 s window only

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

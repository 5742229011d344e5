"""The latency FIFO and histogram cells with an injected clock: exact figures."""

from __future__ import annotations

from fooproxy import latency
from fooproxy.latency import BOUNDS, MAX_ENTRIES, Timer, quantile
from fooproxy.stats import Snapshot, Stats, new_block


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def sent(stats: Stats, timer: Timer, counts: tuple, data: bytes) -> None:
    stats.record(True, len(data), counts, timer, data)  # as Flow.delivered does


def answered(stats: Stats, timer: Timer, counts: tuple, data: bytes) -> None:
    stats.record(False, len(data), counts, timer, data)


def bucket(seconds: float) -> int:
    return latency.bucket_of(BOUNDS, seconds)


def test_bounds_are_log_spaced_from_25us_to_10s():
    assert BOUNDS[0] == 25e-6 and BOUNDS[-1] == 10.0 and 0.005 in BOUNDS and 0.05 in BOUNDS
    ratios = [b / a for a, b in zip(BOUNDS, BOUNDS[1:], strict=False)]
    assert all(1.2 < r < 1.3 for r in ratios)


def test_fifo_per_chunk_pipelined_answers_and_unanswered():
    clock = Clock()
    stats = Stats(clock=clock)
    timer = Timer(stats)
    sent(stats, timer, (3, 0, 0, 0), b"REQ 1\nREQ 2\nREQ 3\n")  # one entry for three REQs
    clock.t += 0.010
    sent(stats, timer, (1, 0, 0, 0), b"REQ 4\n")
    clock.t += 0.010
    answered(stats, timer, (0, 2, 0, 0), b"ACK 1\nACK 2\n")  # 20 ms
    answered(stats, timer, (0, 1, 1, 0), b"NAK 3\nACK 4\n")  # 20 ms (NAK), 10 ms (ACK): in line order
    snap = stats.snapshot().latency
    assert snap.ack[bucket(0.020)] == 2 and snap.nak[bucket(0.020)] == 1 and snap.ack[bucket(0.010)] == 1
    assert sum(snap.ack) == 3 and sum(snap.nak) == 1
    answered(stats, timer, (0, 1, 0, 0), b"ACK 9\n")  # nothing owed: not timed
    sent(stats, timer, (2, 0, 0, 0), b"REQ 5\nREQ 6\n")
    assert timer.close() == 2
    assert stats.snapshot().as_dict()["requests_unanswered"] == 2


def test_invalid_lines_hold_their_place_untimed():
    clock = Clock()
    stats = Stats(clock=clock)
    timer = Timer(stats)
    sent(stats, timer, (1, 0, 0, 1), b"bad\nREQ 1\n")
    clock.t += 0.005
    answered(stats, timer, (0, 0, 1, 0), b"NAK 0 ERRDECODE\n")
    assert sum(stats.snapshot().latency.nak) == 0
    answered(stats, timer, (0, 1, 0, 0), b"ACK 1\n")
    assert stats.snapshot().latency.ack[bucket(0.005)] == 1


def test_the_fifo_is_bounded():
    stats = Stats(clock=Clock())
    timer = Timer(stats)
    for _ in range(MAX_ENTRIES * 3):
        sent(stats, timer, (1, 0, 0, 0), b"REQ 1\n")
    assert len(timer.fifo) + 1 == MAX_ENTRIES  # the head, then the FIFO
    assert timer.close() == MAX_ENTRIES * 3


def exchange(stats: Stats, timer: Timer, clock: Clock, seconds: float) -> None:
    sent(stats, timer, (1, 0, 0, 0), b"REQ 1\n")
    clock.t += seconds
    answered(stats, timer, (0, 1, 0, 0), b"ACK 1\n")


def test_window_forgets_after_ten_seconds_totals_do_not():
    clock = Clock()
    stats = Stats(clock=clock)
    timer = Timer(stats)
    exchange(stats, timer, clock, 0.050)
    assert stats.snapshot().as_dict()["latency_max_ms"] == 50.0
    clock.t += 9.4
    exchange(stats, timer, clock, 0.005)
    f = stats.snapshot().as_dict()
    assert f["latency_max_ms"] == 50.0
    clock.t += 1.0
    f = stats.snapshot().as_dict()
    assert f["latency_max_ms"] == 5.0 and 4.0 <= f["latency_p50_ms"] <= 5.0
    assert sum(stats.snapshot().latency.ack) == 2


def test_latencies_count_in_the_second_they_happened_whenever_read():
    clock = Clock()
    stats = Stats(clock=clock)
    timer = Timer(stats)
    exchange(stats, timer, clock, 0.050)  # nobody reads the stats...
    clock.t += 30.0  # ...until long after: the answer is out of the window, in the totals
    f = stats.snapshot().as_dict()
    assert f["latency_max_ms"] == 0.0 and sum(stats.snapshot().latency.ack) == 1


def test_quantile_interpolates_inside_the_bucket_and_caps_at_the_max():
    counts = [0] * latency.NB
    counts[bucket(0.005)] = 50  # (4 ms, 5 ms]
    counts[bucket(0.050)] = 50  # (40 ms, 50 ms]
    assert abs(quantile(counts, 0.25, 0.0) - 0.0045) < 1e-9
    assert quantile(counts, 0.99, 0.048) == 0.048
    assert quantile([0] * latency.NB, 0.5, 0.0) == 0.0


def test_workers_blocks_sum_exactly():
    clock = Clock()
    blocks = [new_block(), new_block()]  # as two workers' slots: the same summing code
    a, b = Stats(blocks[0], clock), Stats(blocks[1], clock)
    a.answered(0.005, 3, 1)
    b.answered(0.005, 2, 0)
    b.upstream_connected(0.0002)
    a.flush(), b.flush()  # as workers do at each heartbeat
    snap = Snapshot.from_blocks(blocks, clock.t, 0.0).latency
    assert snap.ack[bucket(0.005)] == 5 and snap.nak[bucket(0.005)] == 1 and sum(snap.connect) == 1
    assert snap.window[bucket(0.005)] == 6


def test_the_fast_bucket_table_agrees_with_bisect_off_the_half_microsecond_steps():
    import random

    rng = random.Random(11)
    for _ in range(20000):
        seconds = rng.uniform(0, latency.FAST_S) if rng.random() < 0.5 else 10 ** rng.uniform(-6, -0.9)
        if seconds >= latency.FAST_S:
            continue
        k = int(seconds * latency.FAST_PER_S)
        want = bucket(k / latency.FAST_PER_S)  # the step's start: exact, as the table says
        assert latency.FAST[k] == want, (seconds, k)
    for b in BOUNDS:
        if b < latency.FAST_S:
            assert latency.FAST[round(b * latency.FAST_PER_S)] == bucket(b)  # a bound is in its own bucket


def test_record_times_lockstep_inline_as_answered_does():
    for seconds in (0.00003, 0.0052, 0.05, 0.2, 12.0):
        clock = Clock()
        inline, called = Stats(clock=clock), Stats(clock=Clock())
        timer = Timer(inline)
        sent(inline, timer, (1, 0, 0, 0), b"REQ 1\n")
        clock.t += seconds
        answered(inline, timer, (0, 0, 1, 0), b"NAK 1\n")
        called.answered(clock.t - 1000.0, 0, 1)
        assert list(inline._pending) == list(called._pending), seconds
        sent(inline, timer, (1, 0, 0, 0), b"REQ 2\n")  # and an ACK
        answered(inline, timer, (0, 1, 0, 0), b"ACK 2\n")
        called.answered(0.0, 1, 0)
        sent(inline, timer, (3, 0, 0, 0), b"REQ 3\nREQ 4\nREQ 5\n")  # and a reply of several
        answered(inline, timer, (0, 2, 1, 0), b"ACK 3\nNAK 4\nACK 5\n")
        called.answered(0.0, 2, 1)
        assert list(inline._pending) == list(called._pending), seconds


def test_pipelined_chunks_behind_the_head_and_answers_in_pieces():
    clock = Clock()
    stats = Stats(clock=clock)
    timer = Timer(stats)
    sent(stats, timer, (4, 0, 0, 0), b"REQ 1\nREQ 2\nREQ 3\nREQ 4\n")  # the head
    clock.t += 0.001
    sent(stats, timer, (2, 0, 0, 0), b"REQ 5\nREQ 6\n")  # behind it
    clock.t += 0.002
    answered(stats, timer, (0, 1, 0, 0), b"ACK 1\nAC")  # part of the head: 3 ms
    answered(stats, timer, (0, 2, 1, 0), b"K 2\nNAK 3\nACK 4\n")  # the rest of the head: 3 ms
    clock.t += 0.004
    answered(stats, timer, (0, 1, 1, 0), b"ACK 5\nNAK 6\n")  # the next entry, now the head: 6 ms
    lat = stats.snapshot().latency
    assert lat.ack[bucket(0.003)] == 3 and lat.nak[bucket(0.003)] == 1
    assert lat.ack[bucket(0.006)] == 1 and lat.nak[bucket(0.006)] == 1
    assert timer.close() == 0 and not timer.fifo and timer.head_r == 0
    assert abs(timer.max_s - 0.006) < 1e-9

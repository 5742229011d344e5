"""Per-request latency through real sockets: a server that answers each request after the delay it asks for."""

from __future__ import annotations

import pytest

from fooproxy.config import Address
from fooproxy.latency import BOUNDS
from tests.helpers import connect, recv_lines, wait_until
from tests.latency_server import DelayServer


@pytest.fixture
def delay_server():
    srv = DelayServer().start()
    yield Address("127.0.0.1", srv.port)
    srv.stop()


def spread(buckets: list[int]) -> list[tuple[float, float, int]]:
    """Non-empty buckets as ``(lower_s, upper_s, count)``."""
    bounds = (0.0, *BOUNDS, float("inf"))
    return [(bounds[i], bounds[i + 1], n) for i, n in enumerate(buckets) if n]


def within(buckets: list[int], low: float, high: float) -> int:
    """How many latencies fell in buckets lying inside ``[low, high]`` seconds."""
    return sum(n for lo, up, n in spread(buckets) if lo >= low - 1e-12 and up <= high + 1e-12)


def lat(d):
    return d.snapshot().latency


def test_each_request_lands_in_its_delays_bucket_and_the_percentiles_follow(delay_server, proxy_for):
    d = proxy_for(delay_server)
    c = connect(d.address)
    for i in range(10):  # lockstep: 5 ms ACKs and 50 ms NAKs, alternating
        c.sendall(b"REQ %d d5\n" % (2 * i))
        assert recv_lines(c, 1) == [b"ACK %d\n" % (2 * i)]
        c.sendall(b"REQ %d d50n\n" % (2 * i + 1))
        assert recv_lines(c, 1) == [b"NAK %d\n" % (2 * i + 1)]
    s = lat(d)
    # Never below its delay (5 ms and 50 ms are bucket bounds), and the 5 ms ones never reach 50 ms;
    # most land in the bucket just above the delay (a loaded machine delays a few by some ms).
    assert within(s.ack, 0.005, 0.05) == 10 == sum(s.ack), spread(s.ack)
    assert within(s.nak, 0.05, 0.1) == 10 == sum(s.nak), spread(s.nak)
    assert within(s.ack, 0.005, 0.008) >= 5 and within(s.nak, 0.05, 0.08) >= 5, (spread(s.ack), spread(s.nak))
    assert 10 * 0.005e9 <= s.ack_sum_ns < 10 * 0.05e9
    f = d.snapshot().as_dict()
    assert 5.0 <= f["latency_p50_ms"] < 50.0  # the 10th of 20: the slowest 5 ms one
    assert 50.0 <= f["latency_p90_ms"] <= f["latency_p99_ms"] <= f["latency_max_ms"] <= 100.0
    assert f["requests_unanswered"] == 0
    assert list(f)[:8] == ["msg_total", "msg_req", "msg_ack", "msg_nak", "request_rate_1s",
                           "request_rate_10s", "response_rate_1s", "response_rate_10s"]  # fmt: skip
    c.close()


def test_pipelined_requests_wait_behind_the_slow_one_they_follow(delay_server, proxy_for):
    d = proxy_for(delay_server)
    c = connect(d.address)
    # One chunk: a 5 ms ACK, a 50 ms NAK, then a 5 ms ACK that is answered with the NAK (in order).
    c.sendall(b"REQ 1 d5\nREQ 2 d50n\nREQ 3 d5\n")
    assert recv_lines(c, 3) == [b"ACK 1\n", b"NAK 2\n", b"ACK 3\n"]
    # Then two chunks in flight at once: 50 ms, and 5 ms behind it.
    c.sendall(b"REQ 4 d50\n")
    c.sendall(b"REQ 5 d5n\n")
    assert recv_lines(c, 2) == [b"ACK 4\n", b"NAK 5\n"]
    s = lat(d)
    assert within(s.ack, 0.005, 0.04) == 1, spread(s.ack)
    assert within(s.ack, 0.04, 0.1) == 2, spread(s.ack)  # REQ 3 (50 ms), REQ 4
    assert within(s.nak, 0.04, 0.1) == 2, spread(s.nak)  # REQ 2, REQ 5 (sent a moment after REQ 4)
    c.close()


def test_an_answer_split_across_chunks_is_timed_at_its_newline(delay_server, proxy_for):
    d = proxy_for(delay_server)
    c = connect(d.address)
    c.sendall(b"REQ 1 d5s\n")  # "ACK" at 5 ms, " 1\n" 20 ms later
    assert recv_lines(c, 1) == [b"ACK 1\n"]
    s = lat(d)
    assert within(s.ack, 0.025, 0.05) == 1 == sum(s.ack), spread(s.ack)
    c.close()


def test_untimed_lines_keep_the_order_and_owed_requests_count_as_unanswered(delay_server, proxy_for):
    d = proxy_for(delay_server, linger=0.2)
    c = connect(d.address)
    # An invalid line is answered (NAK 0 ERRDECODE) but not timed; the REQ behind it is.
    c.sendall(b"hello\nREQ 1 d50\n")
    assert recv_lines(c, 2) == [b"NAK 0 ERRDECODE\n", b"ACK 1\n"]
    s = lat(d)
    assert sum(s.nak) == 0 and within(s.ack, 0.05, 0.1) == 1 == sum(s.ack), (spread(s.ack), spread(s.nak))
    # Three requests the server takes 5 s to answer; the client leaves, linger (0.2 s) runs out.
    c.sendall(b"REQ 2 d5000\nREQ 3 d5000\n")
    c.sendall(b"REQ 4 d5000\n")
    assert wait_until(lambda: d.snapshot().totals["msg_req"] == 4)
    c.close()
    assert wait_until(lambda: d.snapshot().totals["connections_active"] == 0)
    f = d.snapshot().as_dict()
    assert f["requests_unanswered"] == 3
    assert sum(lat(d).ack) == 1  # the owed ones are not latencies


def test_latency_off_measures_nothing(delay_server, proxy_for):
    d = proxy_for(delay_server, latency=False)
    c = connect(d.address)
    c.sendall(b"REQ 1 d5\n")
    assert recv_lines(c, 1) == [b"ACK 1\n"]
    f = d.snapshot().as_dict()
    assert f["msg_ack"] == 1 and sum(lat(d).ack) == 0 and f["latency_max_ms"] == 0.0
    c.close()

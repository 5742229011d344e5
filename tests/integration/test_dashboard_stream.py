"""``/stats/stream`` on a real port: one sampler for every page, history first, pool limits, endings.

The HTTP server, the ``LiveSamples`` and the clients share this hub: the
clients are gevent sockets speaking raw HTTP/1.1, so a test sees the bytes a
browser's EventSource gets (chunked, one event per chunk).
"""

from __future__ import annotations

import ipaddress
import json
import time

import gevent
import pytest
from gevent import socket

from fooproxy.config import Address
from fooproxy.dashboard import LiveSamples
from fooproxy.http import HttpServer, make_app
from fooproxy.stats import Stats
from tests.helpers import wait_until

INTERVAL = 0.1  # seconds between samples here (1 s in the proxy)
HEAD_DEADLINE = 0.3


class Counting:
    """The sampler's stats source: counts how often it is read."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return self.stats.snapshot().as_dict()


@pytest.fixture
def live():
    source = Counting()
    samples = LiveSamples(source, lambda: {"upstream_up": 1.0}, info={"version": "t", "workers": 1}, interval=INTERVAL)
    samples.source = source  # type: ignore[attr-defined]
    app = make_app(Stats().snapshot, lambda: (True, {}), live=samples)
    server = HttpServer(Address("127.0.0.1", 0), app, header_timeout=HEAD_DEADLINE, max_connections=8)
    samples.max_streams = 3
    server.start()
    samples.start()
    samples.server = server  # type: ignore[attr-defined]
    yield samples
    samples.stop()
    server.stop(timeout=0.5)


def open_stream(live: LiveSamples, path: str = "/stats/stream") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live.server.address.port), timeout=5)  # type: ignore[attr-defined]
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n" % path.encode())
    return sock


class Reader:
    """The events of one stream as they arrive: ``[(event, data bytes)]``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf, self.events = sock, b"", []
        self.head = b""

    def until(self, predicate, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while not predicate(self.events):
            left = deadline - time.monotonic()
            assert left > 0, "stream: no such events within %gs: %r" % (timeout, self.events[-3:])
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            assert chunk, "stream ended; events: %r" % [e for e, _ in self.events]
            self.buf += chunk
            self._parse()
        return self.events

    def _parse(self) -> None:
        if not self.head:
            if b"\r\n\r\n" not in self.buf:
                return
            self.head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        while True:
            at = self.buf.find(b"event: ")
            end = self.buf.find(b"\n\n", at)
            if at < 0 or end < 0:
                return
            name, _, data = self.buf[at + 7 : end].partition(b"\ndata: ")
            self.events.append((name.decode(), data))
            self.buf = self.buf[end + 2 :]


def samples_of(events) -> list[bytes]:
    return [data for name, data in events if name == "sample"]


def test_a_stream_sends_info_and_history_at_once_then_a_sample_each_tick(live) -> None:
    assert wait_until(lambda: len(live.ring) >= 3, 5), "the sampler runs before any page opens"
    reader = Reader(open_stream(live))
    events = reader.until(lambda ev: len(samples_of(ev)) >= 3)
    assert reader.head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in reader.head, reader.head
    assert [name for name, _ in events[:2]] == ["info", "history"]
    assert json.loads(events[0][1]) == {"version": "t", "workers": 1}
    history = json.loads(events[1][1])
    assert len(history) >= 3 and all(set(s) == {"t", "stats", "health"} for s in history)
    assert [s["t"] for s in history] == sorted(s["t"] for s in history)
    sample = json.loads(samples_of(events)[-1])
    assert sample["stats"]["msg_total"] == 0 and sample["health"] == {"upstream_up": 1.0}
    reader.sock.close()


def test_two_pages_get_the_same_bytes_and_cost_one_read_per_tick(live) -> None:
    a, b = Reader(open_stream(live)), Reader(open_stream(live))
    a.until(lambda ev: len(samples_of(ev)) >= 1)
    b.until(lambda ev: len(samples_of(ev)) >= 1)
    calls, taken = live.source.calls, live.taken  # type: ignore[attr-defined]
    a.until(lambda ev: len(samples_of(ev)) >= 6)
    b.until(lambda ev: len(samples_of(ev)) >= 6)
    assert live.streams == 2
    # One read of the stats per sample, however many pages; each page got the very same bytes.
    reads, ticks = live.source.calls - calls, live.taken - taken  # type: ignore[attr-defined]
    assert reads == ticks and ticks >= 5, (reads, ticks)
    common = set(samples_of(a.events)) & set(samples_of(b.events))
    assert len(common) >= 5, (samples_of(a.events), samples_of(b.events))
    a.sock.close()
    b.sock.close()


def test_a_stream_outlives_the_head_deadline_and_ends_when_the_client_goes(live) -> None:
    reader = Reader(open_stream(live))
    reader.until(lambda ev: len(samples_of(ev)) >= 1)
    started = time.monotonic()
    # Well past the 0.3 s head deadline (and many ticks), still streaming.
    reader.until(lambda ev: len(samples_of(ev)) >= int(4 * HEAD_DEADLINE / INTERVAL))
    assert time.monotonic() - started > 2 * HEAD_DEADLINE
    assert live.streams == 1
    reader.sock.close()
    # The next write or two fail (EPIPE/ECONNRESET): the stream ends and its slot is free.
    assert wait_until(lambda: live.streams == 0, 3), "stream still open after its client left"
    assert wait_until(lambda: len(live.server._server.connections) == 0, 3)  # type: ignore[attr-defined]


def test_past_max_streams_a_page_gets_503_and_health_still_answers(live) -> None:
    readers = [Reader(open_stream(live)) for _ in range(live.max_streams)]
    for r in readers:
        r.until(lambda ev: len(samples_of(ev)) >= 1)
    extra = open_stream(live)
    extra.settimeout(5)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = extra.recv(4096)
        assert chunk, answer
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"Retry-After: 5" in answer
    health = open_stream(live, "/health")
    health.settimeout(5)
    assert health.recv(4096).startswith(b"HTTP/1.1 200 ")
    for sock in (extra, health, *(r.sock for r in readers)):
        sock.close()


def test_stopping_the_samples_ends_every_stream_with_the_chunked_terminator(live) -> None:
    reader = Reader(open_stream(live))
    reader.until(lambda ev: len(samples_of(ev)) >= 1)
    live.stop()
    reader.sock.settimeout(2)
    tail = reader.buf
    while not tail.endswith(b"0\r\n\r\n"):
        chunk = reader.sock.recv(4096)
        assert chunk, tail
        tail += chunk
    assert wait_until(lambda: live.streams == 0, 2)
    reader.sock.close()


def test_the_page_and_its_files_are_served(live) -> None:
    for path, kind, needle in (
        ("/", b"text/html", b"/stats/stream"),
        ("/dashboard", b"text/html", b"dashboard.js"),
        ("/static/uPlot.iife.min.js", b"text/javascript", b"uPlot"),
        ("/static/uPlot.min.css", b"text/css", b".uplot"),
        ("/static/uPlot.LICENSE", b"text/plain", b"MIT"),
    ):
        sock = open_stream(live, path)
        sock.settimeout(5)
        data = b""
        while needle not in data:
            chunk = sock.recv(65536)
            assert chunk, (path, data[:300])
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 200 ") and kind in head, (path, head)
        sock.close()
    sock = open_stream(live, "/static/nothing.js")
    sock.settimeout(5)
    assert sock.recv(4096).startswith(b"HTTP/1.1 404 ")
    sock.close()
    gevent.sleep(0)


def test_a_page_that_stops_reading_is_closed_in_one_line_without_a_traceback(capfd, caplog) -> None:
    big = {"field_%d" % i: "x" * 100 for i in range(600)}  # 60 KB a sample: the socket buffers fill in a second
    samples = LiveSamples(lambda: big, interval=0.01)
    app = make_app(Stats().snapshot, lambda: (True, {}), live=samples)
    server = HttpServer(Address("127.0.0.1", 0), app, idle_timeout=0.3)
    server.start()
    samples.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        with caplog.at_level("WARNING", logger="fooproxy.http"):
            sock.connect(("127.0.0.1", server.address.port))
            sock.sendall(b"GET /stats/stream HTTP/1.1\r\nHost: t\r\n\r\n")
            assert wait_until(lambda: samples.streams == 1, 3)
            # Never read: the send times out after 0.3 s without progress and the stream ends.
            assert wait_until(lambda: samples.streams == 0, 10), "a stalled page kept its stream"
    finally:
        sock.close()
        samples.stop()
        server.stop(timeout=0.5)
    assert any("stopped reading" in r.getMessage() for r in caplog.records), caplog.text
    assert "Traceback" not in capfd.readouterr().err


def test_http_allow_covers_the_page_and_the_stream() -> None:
    samples = LiveSamples(lambda: {"x": 1}, interval=INTERVAL)
    app = make_app(Stats().snapshot, lambda: (True, {}), live=samples)
    server = HttpServer(Address("127.0.0.1", 0), app, allow=[ipaddress.ip_network("10.0.0.0/8")])
    server.start()
    samples.start()
    samples.server = server  # type: ignore[attr-defined]
    try:
        for path in ("/", "/stats/stream", "/static/uPlot.iife.min.js"):
            sock = open_stream(samples, path)
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 403 "), path
            sock.close()
        assert samples.streams == 0
    finally:
        samples.stop()
        server.stop(timeout=0.5)

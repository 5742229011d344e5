"""The C hot path (fooproxy/_flow.c) against the Python it replaces, byte for byte and cell for cell.

The same lines through ``_flow.classify`` and ``protocol.parse_line``; the same
chunks through ``_flow.Counter`` and ``protocol.MessageCounter``; and the same
session script (client and server chunks, interleaved, with a clock that moves
between them) through a DataBus of C Flows and one of Python Flows, over real
socket pairs: every cell of the two stats blocks, the latency timer and the
flows' own counts must be equal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import gevent.socket
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fooproxy import databus, speedups
from fooproxy.protocol import MAX_LINE, MessageCounter, parse_line
from fooproxy.stats import Stats

flow = speedups.FLOW
needs_c = pytest.mark.skipif(flow is None, reason="the C extension is not built (or FOOPROXY_PURE is set)")
KIND = {b"REQ": 0, b"ACK": 1, b"NAK": 2}


def test_make_install_built_the_extension_where_a_compiler_exists():
    """A missing build must not pass as the fallback: with a C compiler, setup.py builds _flow."""
    if os.environ.get("FOOPROXY_PURE", "") not in ("", "0"):
        pytest.skip("FOOPROXY_PURE is set: the pure-Python path is chosen on purpose")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the pure-Python path is the one that runs")
    assert speedups.HOT_PATH == "c", "fooproxy._flow was not built by the install"


def test_foopoxy_pure_chooses_the_python_path():
    code = "from fooproxy import speedups, databus; print(speedups.HOT_PATH, databus._CFlow)"
    env = dict(os.environ, FOOPROXY_PURE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["python", "None"]


# -- lines ------------------------------------------------------------------------------------
_FIELD = st.sampled_from([b"REQ", b"ACK", b"NAK", b"REQ\t", b"req", b"RE", b"", b"REQQ"])
_SEQ = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64).map(lambda n: b"%d" % n),
    st.integers(min_value=0, max_value=10**6).map(lambda n: b"+%d" % n),
    st.sampled_from(
        [
            b"9223372036854775807",
            b"9223372036854775808",
            b"-9223372036854775808",
            b"-9223372036854775809",
            b"0" * 40 + b"9223372036854775807",
            b"+",
            b"-",
            b"",
            b"1a",
            b"00000000000000000000012345678901234567",
        ]
    ),  # fmt: skip
    st.binary(max_size=6),
)
_DATA = st.one_of(st.just(None), st.binary(max_size=12), st.sampled_from([b"", b"a b", b"x\r", b"\t", b"\x00"]))
_TAIL = st.sampled_from([b"", b"\r", b"\r\r", b"\r\r\r", b" ", b"\r \r"])


@st.composite
def lines(draw) -> bytes:
    """One line, its newline excluded: mostly near the grammar, sometimes anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=30)).replace(b"\n", b"")
    line = draw(_FIELD) + draw(st.sampled_from([b" ", b" ", b"  ", b"\t"])) + draw(_SEQ)
    data = draw(_DATA)
    if data is not None:
        line += b" " + data
    return (line + draw(_TAIL)).replace(b"\n", b"")


def python_kind(line: bytes) -> int:
    msg = parse_line(line)
    return 3 if msg is None else KIND[msg.type]


@needs_c
@settings(max_examples=2000, deadline=None)
@given(lines())
def test_classify_decides_every_line_as_parse_line(line):
    assert flow.classify(line) == python_kind(line), line


@needs_c
@pytest.mark.parametrize(
    "line",
    [b"REQ 1", b"REQ 1\r\r", b"REQ 1\r\r\r", b"REQ 1 a\r\r\r", b"REQ 1 a b", b"REQ  1", b"REQ 1 ", b"NAK -0",
     b"ACK 9223372036854775807", b"ACK 9223372036854775808", b"ACK -9223372036854775808", b"REQ", b"",
     b"\rREQ 1", b"REQ 0000000000000000000000009223372036854775807 d"],
)  # fmt: skip
def test_classify_edges(line):
    assert flow.classify(line) == python_kind(line)


# -- chunks -----------------------------------------------------------------------------------
@st.composite
def streams(draw) -> tuple[bytes, list[int]]:
    """A byte stream of lines (some far longer than MAX_LINE) and the cuts that chunk it."""
    parts = []
    for _ in range(draw(st.integers(1, 12))):
        roll = draw(st.integers(0, 19))
        if roll == 0:
            parts.append(b"REQ 1 " + b"d" * draw(st.sampled_from([MAX_LINE - 8, MAX_LINE - 7, MAX_LINE - 6, 70_000])))
        else:
            parts.append(draw(lines()))
    stream = b"\n".join(parts) + draw(st.sampled_from([b"\n", b"", b"\nREQ 7"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    return stream, cuts


def chunks_of(stream: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@needs_c
@settings(max_examples=400, deadline=None)
@given(streams())
def test_counter_counts_every_segmentation_as_message_counter(case):
    stream, cuts = case
    c, py = flow.Counter(), MessageCounter()
    for chunk in chunks_of(stream, cuts):
        assert c.feed(chunk) == py.feed(chunk)
        assert c.pending == py.pending


# -- whole sessions -------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


class Session:
    """A DataBus between two socket pairs, its flows driven by hand: one on_readable per chunk."""

    def __init__(self, use_c: bool, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
        self.client_peer, client = gevent.socket.socketpair()
        upstream, self.server_peer = gevent.socket.socketpair()
        self.stats = Stats(clock=clock)
        self.messages_cell = self.stats.messages_cell(self.stats.upstream_entry("127.0.0.1:8001"))
        with monkeypatch.context() as m:
            m.setattr(databus, "_CFlow", flow.Flow if use_c else None)
            m.setattr(speedups, "records_in_c", lambda stats: True)
            self.bus = databus.DataBus(client, upstream, self.stats, messages_cell=self.messages_cell)
        assert isinstance(self.bus.c2s_flow, flow.Flow if use_c else databus.Flow)

    def move(self, to_server: bool, chunk: bytes) -> bytes:
        src, dst_peer = (self.client_peer, self.server_peer) if to_server else (self.server_peer, self.client_peer)
        src.sendall(chunk)
        (self.bus.c2s_flow if to_server else self.bus.s2c_flow).on_readable()
        got = b""
        while len(got) < len(chunk):
            got += dst_peer.recv(1 << 17)
        return got

    def state(self) -> dict:
        timer = self.bus.timer
        self.stats.flush()
        return {
            "block": bytes(self.stats.block.cast("B")),
            "pending_sec": self.stats._pending_sec,
            "timer": (timer.head_t, timer.head_r, timer.head_o, list(timer.fifo), timer.max_s),
            "flows": [(f.lines, f.nbytes, f.counter.pending) for f in (self.bus.c2s_flow, self.bus.s2c_flow)],
        }

    def close(self) -> None:
        self.bus.c2s_flow.close()
        self.bus.s2c_flow.close()
        for s in (self.client_peer, self.server_peer, self.bus.client, self.bus.upstream):
            s.close()


_REQS = st.lists(st.sampled_from([b"REQ 1 a\n", b"REQ 2\n", b"bad\n", b"ACK 3\n", b"REQ 4 x", b"\n"]), min_size=1,
                 max_size=6).map(b"".join)  # fmt: skip
_ANSWERS = st.lists(st.sampled_from([b"ACK 1 h\n", b"NAK 2 ERR\n", b"ACK 3", b" c0b3\n", b"\n", b"NAK 0 X\n"]),
                    min_size=1, max_size=6).map(b"".join)  # fmt: skip
_STEPS = st.lists(
    st.tuples(st.booleans(), st.one_of(_REQS, _ANSWERS), st.sampled_from([0.0, 0.00004, 0.003, 0.05, 0.7, 1.3, 11.0])),
    min_size=1,
    max_size=25,
)


@needs_c
@settings(max_examples=150, deadline=None)
@given(_STEPS)
def test_a_session_writes_the_same_cells_through_c_as_through_python(steps):
    """Both hot paths, one script: the same bytes delivered, every cell, timer and count the same."""
    _run_both(steps)


def _run_both(steps) -> None:
    """Each step's chunk through a Python session and a C one, with one clock; their states compared after each."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        clock_py, clock_c = Clock(), Clock()
        flow.set_clock(clock_c)
        py, c = Session(False, clock_py, monkeypatch), Session(True, clock_c, monkeypatch)
        try:
            for to_server, chunk, dt in steps:
                clock_py.t += dt
                clock_c.t += dt
                assert py.move(to_server, chunk) == c.move(to_server, chunk) == chunk
                assert c.state() == py.state()
        finally:
            flow.set_clock(None)
            py.close()
            c.close()


_R = b"REQ 1 a\n"
#: Pipelined: chunks of REQs sent at different times, then answers of one kind that cross from one
#: chunk's REQs to the next (the C path's answer_entries), part of an entry, several entries, and
#: more answers than were owed; then the same with an entry of other lines in the way.
_PIPELINED = [
    [(True, _R * 2, 0.001), (True, _R * 3, 0.002), (True, _R, 0.004), (False, b"NAK 1 x\n" * 3, 0.003),
     (False, b"NAK 1 x\n" * 2, 0.0001), (False, b"NAK 1 x\n" * 3, 0.02)],
    [(True, _R * 2, 0.001), (True, _R * 3, 0.002), (False, b"ACK 1 h\n" * 5, 0.003), (True, _R, 0.0),
     (False, b"ACK 1 h\n" * 2, 0.6)],
    [(True, _R * 2, 0.001), (True, b"bad\n", 0.002), (True, _R * 2, 0.002), (False, b"ACK 1 h\n" * 4, 0.003),
     (False, b"ACK 1 h\n", 0.004)],
    # both kinds (answer_mixed): the first line begun in the chunk before; a 19-digit Seq among
    # them; an entry of other lines in the way (Timer.answered takes the chunk)
    [(True, _R * 2, 0.001), (True, _R * 3, 0.002), (False, b"ACK 1 h\nNA", 0.003),
     (False, b"K 1 x\nACK 1 h\nNAK 1 x\nACK 1 h\n", 0.004), (True, _R * 2, 0.0),
     (False, b"NAK 1 x\nACK 1 h\nACK 1 h\n", 0.5)],
    [(True, _R * 2, 0.001), (True, _R * 2, 0.002), (False, b"NAK 1 x\nACK 1234567890123456789 h\nNAK 2 x\n", 0.003),
     (False, b"ACK 9 h\n", 0.001)],
    [(True, _R * 2, 0.001), (True, b"bad\n", 0.002), (True, _R * 2, 0.002), (False, b"ACK 1 h\nNAK 1 x\n" * 2, 0.003),
     (False, b"NAK 1 h\n", 0.004)],
]  # fmt: skip


@needs_c
@pytest.mark.parametrize(
    "steps",
    _PIPELINED,
    ids=[
        "nak-spans",
        "ack-spans-and-over",
        "other-lines-between",
        "mixed-begun-before",
        "mixed-big-seq",
        "mixed-other-lines",
    ],
)
def test_answers_that_cross_request_chunks_write_the_same_cells_through_c(steps):
    """Answers of one kind taking the head and the entries behind it: the same latencies through C."""
    _run_both(steps)


# -- the C latency state: TimerState and Pending --------------------------------------------------
@needs_c
def test_pending_cells_index_like_the_list_they_replace_and_take_empties_them_in_place():
    p = flow.Pending(4, 2)
    assert len(p) == 6 and list(p) == [0, 0, 0, 0, 0.0, 0.0]
    p[1] = 7
    p[3] = 2**62
    p[4] = 0.125
    p[5] = 3
    assert list(p) == [0, 7, 0, 2**62, 0.125, 3.0]
    assert [type(v) for v in p] == [int] * 4 + [float] * 2
    same = p
    assert p.take() == [0, 7, 0, 2**62, 0.125, 3.0]
    assert same is p and list(p) == [0, 0, 0, 0, 0.0, 0.0]
    with pytest.raises(IndexError):
        p[6]
    with pytest.raises(IndexError):
        p[6] = 1
    with pytest.raises(TypeError):
        p[0] = "x"
    with pytest.raises(TypeError):
        del p[0]
    with pytest.raises(OverflowError):
        p[0] = 2**64
    with pytest.raises(ValueError):
        flow.Pending(-1, 3)


@needs_c
def test_stats_flush_moves_c_pending_cells_into_the_block_as_the_list_does_and_zeroes_them():
    """Stats keeps one Pending for its whole life (the C Flows hold it): flush empties it in place."""
    c_stats, list_stats = Stats(clock=Clock()), Stats(clock=Clock())
    pending = c_stats._pending
    assert isinstance(pending, flow.Pending)
    list_stats._pending = list(pending)
    for stats in (c_stats, list_stats):
        stats.answered(0.004, 3, 0)
        stats.answered(0.05, 0, 2)
        stats.answered(0.00003, 1, 1)
    assert list(pending) == list_stats._pending and any(pending)
    c_stats.flush()
    list_stats.flush()
    assert c_stats._pending is pending and not any(pending)
    assert bytes(c_stats.block.cast("B")) == bytes(list_stats.block.cast("B"))
    assert bytes(c_stats.block.cast("B")) != bytes(Stats(clock=Clock()).block.cast("B"))


@needs_c
def test_a_c_flow_takes_only_a_timer_state_as_its_timer():
    with pytest.MonkeyPatch.context() as monkeypatch:
        s = Session(True, Clock(), monkeypatch)
        try:
            with pytest.raises(TypeError, match="TimerState"):
                s.bus.c2s_flow.timer = object()
            s.bus.c2s_flow.timer = None
            assert s.bus.c2s_flow.timer is None
            s.bus.c2s_flow.timer = s.bus.timer
            assert isinstance(s.bus.timer, flow.TimerState)
        finally:
            s.close()


@needs_c
def test_a_closed_flows_reader_is_stopped_and_serves_the_next_flow_on_its_own_fd():
    """Flow.close keeps its read watcher as a spare (stopped, no callback); the next Flow watches its own fd."""
    first = Session(True, Clock(), pytest.MonkeyPatch())
    reader = first.bus.c2s_flow.reader
    first.bus.start(lambda bus: None)
    first.bus.finish("test")
    assert not reader.active and reader.callback is None  # holds nothing of the closed session
    assert first.bus.c2s_flow.reader is None
    second = Session(True, Clock(), pytest.MonkeyPatch())
    try:
        flows = (second.bus.c2s_flow, second.bus.s2c_flow)
        assert any(f.reader is reader for f in flows)  # a spare, not a new watcher
        assert {f.reader.fd for f in flows} == {second.bus.client.fileno(), second.bus.upstream.fileno()}
        second.bus.start(lambda bus: None)
        second.client_peer.sendall(b"REQ 1 a\n")
        second.server_peer.settimeout(5)
        assert second.server_peer.recv(64) == b"REQ 1 a\n"  # through the hub, on the reused watcher
        second.server_peer.sendall(b"ACK 1 h\n")
        second.client_peer.settimeout(5)
        assert second.client_peer.recv(64) == b"ACK 1 h\n"
        assert flows[0].lines == 1 and flows[1].lines == 1
    finally:
        second.bus.finish("test")
        second.close()
        first.close()


@needs_c
def test_a_flow_on_a_closed_fd_is_refused_as_a_new_watcher_would_refuse_it():
    warm = Session(True, Clock(), pytest.MonkeyPatch())
    warm.bus.start(lambda bus: None)
    warm.bus.finish("test")  # at least one spare reader now
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)  # a descriptor number nothing has open
    loop = gevent.get_hub().loop
    try:
        for bad, error in ((fd, OSError), (-1, ValueError)):
            with pytest.raises(error):
                flow.Flow(None, bad, 1, True, loop, warm.stats, None, 0)
    finally:
        warm.close()

"""The message grammar and the incremental counter, against a whole-line parse."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fooproxy.protocol import MAX_LINE, Counts, Message, MessageCounter, count_lines, parse_line

VALID = [
    b"REQ 1 Hey",
    b"ACK 1 Hello",
    b"NAK 5 Stop",
    b"REQ 2",
    b"REQ +5 x",
    b"REQ -0 x",
    b"REQ 007 x",
    b"REQ -1 x",
    b"REQ 9223372036854775807 x",
    b"REQ -9223372036854775808 x",
    b"REQ 000000000000000000000000001 x",
    b"REQ 1 x\r",
    b"ACK 3 \xc3\xa9t\xc3\xa9",
]
INVALID = [
    b"",
    b"RE",
    b"FOO 1",
    b"req 1 x",
    b"REQ",
    b"REQ x",
    b"REQ 1 x y z",
    b"REQ  1 x",
    b"REQ 1  x",
    b"REQ 1 ",
    b"REQ\t1\tx",
    b"REQ 1 x\ty",
    b"REQ 9223372036854775808 x",
    b"REQ -9223372036854775809 x",
    b"REQ 99999999999999999999 x",
    b"REQ 1_0 x",
    b"REQ 1 x\r\r",
    b" REQ 1 x",
    b"\xff\xfe",
]


def whole_line_counts(stream: bytes) -> Counts:
    """The reference: split on newlines and parse each complete line."""
    req = ack = nak = inv = 0
    for line in stream.split(b"\n")[:-1]:
        msg = None if len(line) + 1 > MAX_LINE else parse_line(line)
        if msg is None:
            inv += 1
        elif msg.type == b"REQ":
            req += 1
        elif msg.type == b"ACK":
            ack += 1
        else:
            nak += 1
    return Counts(req, ack, nak, inv)


def feed_all(chunks) -> Counts:
    counter = MessageCounter()
    total = [0, 0, 0, 0]
    for chunk in chunks:
        for i, v in enumerate(counter.feed(chunk)):
            total[i] += v
    return Counts(*total)


def test_parse_line_examples():
    assert parse_line(b"REQ 1 Hey\n") == Message(b"REQ", 1, b"Hey")
    assert parse_line(b"REQ +5") == Message(b"REQ", 5, b"")
    assert parse_line(b"NAK 0 ERRDECODE") == Message(b"NAK", 0, b"ERRDECODE")
    for line in VALID:
        assert parse_line(line) is not None, line
    for line in INVALID:
        assert parse_line(line) is None, line


def test_count_lines_matches_parse_for_every_listed_case():
    stream = b"".join(line + b"\n" for line in VALID + INVALID)
    assert count_lines(stream, 0, len(stream)) == whole_line_counts(stream)
    assert count_lines(stream, 0, len(stream)) == Counts(req=10, ack=2, nak=1, invalid=len(INVALID))


def test_every_split_point_of_a_stream_counts_the_same():
    stream = b"".join(line + b"\n" for line in VALID + INVALID) + b"REQ 7 partial"
    expected = whole_line_counts(stream)
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1, 7):
            assert feed_all([stream[:i], stream[i:j], stream[j:]]) == expected, (i, j)


def test_byte_by_byte():
    stream = b"".join(line + b"\n" for line in VALID + INVALID)
    assert feed_all(stream[i : i + 1] for i in range(len(stream))) == whole_line_counts(stream)


line_st = st.one_of(
    st.sampled_from(VALID + INVALID),
    st.builds(
        lambda t, s, d: t + b" " + str(s).encode() + (b" " + d if d else b""),
        st.sampled_from([b"REQ", b"ACK", b"NAK", b"REX"]),
        st.integers(min_value=-(2**64), max_value=2**64),
        st.binary(max_size=12),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(line_st, max_size=40),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
    st.binary(max_size=5),
)
def test_any_segmentation_gives_whole_line_counts(lines, cuts, tail):
    stream = b"".join(line + b"\n" for line in lines) + tail.replace(b"\n", b"")
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks, prev = [], 0
    for p in points + [len(stream)]:
        chunks.append(stream[prev:p])
        prev = p
    assert feed_all(chunks) == whole_line_counts(stream)


def test_oversized_line_is_invalid_and_memory_stays_bounded():
    counter = MessageCounter()
    big = b"REQ 1 " + b"x" * 65536
    for _ in range(128):  # 8 MiB without a newline
        assert counter.feed(big) == Counts()
    assert len(counter._partial) <= MAX_LINE
    assert counter.pending
    assert counter.feed(b"yyy\nREQ 2 ok\n") == Counts(req=1, invalid=1)
    assert not counter.pending


def test_line_of_exactly_max_line_is_counted():
    line = b"REQ 1 " + b"x" * (MAX_LINE - 7) + b"\n"
    assert len(line) == MAX_LINE
    assert feed_all([line[:10], line[10:]]) == Counts(req=1)
    longer = b"REQ 1 " + b"x" * (MAX_LINE - 6) + b"\n"
    assert feed_all([longer[:10], longer[10:]]) == Counts(invalid=1)

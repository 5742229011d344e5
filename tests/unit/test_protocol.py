"""The message grammar and the incremental counter, against a whole-line parse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fooproxy.protocol import (
    ACK,
    MAX_LINE,
    NAK,
    Counts,
    Message,
    MessageCounter,
    answer_types,
    count_lines,
    parse_line,
    parse_seq,
)

# Every case below was checked against the reference server-linux (a line is
# valid iff it is not answered ``NAK 0 ERRDECODE``); tests/faults checks the
# list again wherever the binary is present. Valid: the line -> (type, seq, data).
ZEROS = b"0" * 5000
NINES = b"9" * 5000
DECODED = {
    b"REQ 1 Hey": (b"REQ", 1, b"Hey"),
    b"ACK 1 Hello": (b"ACK", 1, b"Hello"),
    b"NAK 5 Stop": (b"NAK", 5, b"Stop"),
    b"REQ 2": (b"REQ", 2, b""),
    b"ACK 3 \xc3\xa9t\xc3\xa9": (b"ACK", 3, b"\xc3\xa9t\xc3\xa9"),
    # Seq: sign, leading zeros, int64 edges
    b"REQ +5 x": (b"REQ", 5, b"x"),
    b"REQ -0 x": (b"REQ", 0, b"x"),
    b"REQ +0": (b"REQ", 0, b""),
    b"REQ 007 x": (b"REQ", 7, b"x"),
    b"REQ -1 x": (b"REQ", -1, b"x"),
    b"REQ 9223372036854775807 x": (b"REQ", 2**63 - 1, b"x"),
    b"REQ +9223372036854775807": (b"REQ", 2**63 - 1, b""),
    b"REQ -9223372036854775807": (b"REQ", -(2**63) + 1, b""),
    b"REQ -9223372036854775808 x": (b"REQ", -(2**63), b"x"),
    b"REQ 000000000000000000000000001 x": (b"REQ", 1, b"x"),
    b"REQ 00000000000000000000000009223372036854775807": (b"REQ", 2**63 - 1, b""),
    # huge Seqs that are still int64 (more digits than Python's int() accepts)
    b"REQ " + ZEROS + b"1 x": (b"REQ", 1, b"x"),
    b"REQ -" + ZEROS + b"9223372036854775808 x": (b"REQ", -(2**63), b"x"),
    b"NAK +" + ZEROS: (b"NAK", 0, b""),
    # trailing \r: the reference drops exactly two, a third stays in the line
    b"REQ 1 x\r": (b"REQ", 1, b"x"),
    b"REQ 1 x\r\r": (b"REQ", 1, b"x"),
    b"REQ 1 x\r\r\r": (b"REQ", 1, b"x\r"),
    b"REQ 1 x\r\r\r\r": (b"REQ", 1, b"x\r\r"),
    b"REQ 1\r": (b"REQ", 1, b""),
    b"REQ 1\r\r": (b"REQ", 1, b""),
    # Data: any byte but space and newline
    b"REQ 1 a\tb": (b"REQ", 1, b"a\tb"),
    b"REQ 1 \tb": (b"REQ", 1, b"\tb"),
    b"REQ 1 x\t": (b"REQ", 1, b"x\t"),
    b"REQ 1 a\rb": (b"REQ", 1, b"a\rb"),
    b"REQ 1 \rx": (b"REQ", 1, b"\rx"),
    b"REQ 1 a\x0bb": (b"REQ", 1, b"a\x0bb"),
    b"REQ 1 a\x0cb": (b"REQ", 1, b"a\x0cb"),
    b"REQ 1 a\x00b": (b"REQ", 1, b"a\x00b"),
    b"REQ 1 \x00": (b"REQ", 1, b"\x00"),
    b"REQ 1 \x1c\x1d\x1e\x1f": (b"REQ", 1, b"\x1c\x1d\x1e\x1f"),
    b"REQ 1 \xff\xfe": (b"REQ", 1, b"\xff\xfe"),
    b"REQ 1 x\x85": (b"REQ", 1, b"x\x85"),
    b"REQ 1 \xc2\xa0": (b"REQ", 1, b"\xc2\xa0"),  # NO-BREAK SPACE
    b"REQ 1 \xe2\x80\x83": (b"REQ", 1, b"\xe2\x80\x83"),  # EM SPACE
    # empty Data after a trailing space
    b"REQ 1 ": (b"REQ", 1, b""),
    b"REQ 1 \r": (b"REQ", 1, b""),
    b"REQ 1 \r\r": (b"REQ", 1, b""),
    b"REQ 1 \r\r\r": (b"REQ", 1, b"\r"),
}
VALID = list(DECODED)
INVALID = [
    b"",
    b"\r",
    b"RE",
    b"FOO 1",
    b"req 1 x",
    b"REQ",
    b"REQ ",
    b"REQ x",
    # the space byte is the only separator, and there are two or three fields
    b"REQ 1 x y",
    b"REQ 1 x y z",
    b"REQ  1 x",
    b"REQ 1  x",
    b"REQ 1  ",
    b" REQ 1 x",
    b"REQ 1 x ",
    b"REQ 1 x  ",
    b"REQ\t1 x",
    b"REQ\t1\tx",
    b"REQ 1\tx",
    b"REQ 1\t",
    b"REQ \t1",
    # \r in the wrong place, or one too many after Seq
    b"REQ 1\r\r\r",
    b"REQ 1\r\r\r\r\r\r",
    b"REQ 1 x\r ",
    b"REQ 1 x \r",
    b"REQ 1\r x",
    b"REQ 1\rx",
    b"REQ\r 1 x",
    b"REQ 1 \r \r",
    # Seq: out of int64, not plain ASCII decimal
    b"REQ 9223372036854775808 x",
    b"REQ +9223372036854775808",
    b"REQ -9223372036854775809 x",
    b"REQ 99999999999999999999 x",
    b"REQ 10000000000000000000",
    b"REQ " + NINES + b" x",
    b"REQ " + ZEROS + b"9223372036854775808",
    b"REQ -" + ZEROS + b"9223372036854775809 x",
    b"REQ 1e3",
    b"REQ 0x10",
    b"REQ 1_0 x",
    b"REQ +",
    b"REQ -",
    b"REQ +-1",
    b"REQ ++1",
    b"REQ \xd9\xa1",  # ARABIC-INDIC DIGIT ONE
    b"REQ \xef\xbc\x91",  # FULLWIDTH DIGIT ONE
    b"\xff\xfe",
]


def case_id(line: bytes) -> str:
    return repr(line) if len(line) < 40 else "%r...(%d bytes)" % (line[:12], len(line))


#: The cases short enough to try at every split point (the huge Seqs have their own test).
SHORT = [line for line in VALID + INVALID if len(line) < 100]


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


@pytest.mark.parametrize("line", VALID, ids=case_id)
def test_parse_line_decodes_what_the_reference_accepts(line):
    assert parse_line(line) == Message(*DECODED[line])
    assert parse_line(line + b"\n") == Message(*DECODED[line])


@pytest.mark.parametrize("line", INVALID, ids=case_id)
def test_parse_line_rejects_what_the_reference_rejects(line):
    assert parse_line(line) is None
    assert parse_line(line + b"\n") is None


def test_parse_seq_decides_int64_range_on_the_digits():
    assert parse_seq(b"9223372036854775807") == 2**63 - 1
    assert parse_seq(b"-9223372036854775808") == -(2**63)
    assert parse_seq(b"9223372036854775808") is None
    assert parse_seq(b"-9223372036854775809") is None
    assert parse_seq(b"-" + b"0" * 60000 + b"42") == -42  # far past int()'s 4,300 digits
    assert parse_seq(b"9" * 60000) is None
    assert parse_seq(b"0" * 60000) == 0


@pytest.mark.parametrize("line", VALID + INVALID, ids=case_id)
def test_one_chunk_per_line_counts_like_the_parse(line):
    msg = parse_line(line)
    want = Counts(invalid=1) if msg is None else Counts(**{msg.type.decode().lower(): 1})
    assert MessageCounter().feed(line + b"\n") == want


def test_count_lines_matches_parse_for_every_listed_case():
    stream = b"".join(line + b"\n" for line in VALID + INVALID)
    assert count_lines(stream, 0, len(stream)) == whole_line_counts(stream)
    assert count_lines(stream, 0, len(stream)) == Counts(req=39, ack=2, nak=2, invalid=len(INVALID))


def test_huge_seq_split_over_two_writes_is_counted():
    line = b"REQ " + ZEROS + b"1 x\n"
    assert feed_all([line[:2000], line[2000:]]) == Counts(req=1)
    assert feed_all([b"ACK 1 x\n" + line[:3000], line[3000:] + b"NAK 2\n"]) == Counts(req=1, ack=1, nak=1)
    nines = b"REQ " + NINES + b" x\n"
    assert feed_all([nines[:100], nines[100:]]) == Counts(invalid=1)
    assert feed_all([nines]) == Counts(invalid=1)


def test_every_split_point_of_a_stream_counts_the_same():
    stream = b"".join(line + b"\n" for line in SHORT) + b"REQ 7 partial"
    expected = whole_line_counts(stream)
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1, 31):
            assert feed_all([stream[:i], stream[i:j], stream[j:]]) == expected, (i, j)


def test_byte_by_byte():
    stream = b"".join(line + b"\n" for line in SHORT)
    assert feed_all(stream[i : i + 1] for i in range(len(stream))) == whole_line_counts(stream)


line_st = st.one_of(
    st.sampled_from(SHORT),
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


def test_answer_types_give_the_answers_in_line_order_the_first_one_from_the_counts():
    """The first line may have begun in an earlier chunk: its type is what the rest does not account for."""
    assert answer_types(b"K 1 x\nACK 1 h\nNAK 1 x\nAC", 2, 1) == [ACK, ACK, NAK]  # its tail reads as no answer
    assert answer_types(b"K 1 x\nACK 1 h\nNAK 1 x\n", 1, 2) == [NAK, ACK, NAK]
    assert answer_types(b"REQ 1\nACK 1 h\nbad\nNAK 2 x\n", 1, 1) == [ACK, NAK]  # the first line no answer
    # a 19-digit Seq is decided exactly and keeps its place
    assert answer_types(b"NAK 1 x\nACK 1234567890123456789 h\nNAK 2 x\n", 1, 2) == [NAK, ACK, NAK]
    assert answer_types(b"NAK 1 x\nACK 9234567890123456789 h\nNAK 2 x\n", 0, 2) == [NAK, NAK]  # out of range
    assert answer_types(b"ACK 1 h", 1, 0) == [] == answer_types(b"ACK 1 h\n", 0, 0)

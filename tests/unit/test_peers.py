"""The bundled peers' pure parts: answer rule, stream answerer, request plan, CLI parsing."""

from __future__ import annotations

import errno
import hashlib
import re
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    import harness  # noqa: F401
except ModuleNotFoundError:  # an editable install made before harness/ existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fooproxy.config import Address
from fooproxy.protocol import MAX_LINE
from harness.peers import client, flags, server
from harness.peers.answer import ERRDECODE, answer, answer_for, answer_hash, answer_type, check_answer, lie_about
from harness.peers.client import ALPHABET, BLOCK, Plan, check_line, request_data
from harness.peers.gofmt import (
    AddrError,
    dial_error,
    duration,
    io_error,
    join_host_port,
    log_line,
    quote,
    split_host_port,
)
from harness.peers.server import Answerer

EXAMPLE_ANSWER = b"ACK 1 ab79c6453de3f8785fb18a0c9d1ea4bb\n"  # REQ 1 x, as foo-protocol.md gives it


def reference(msg_type: bytes, seq: int, data: bytes) -> bytes:
    """The rule as foo-protocol.md states it, computed independently."""
    digest = hashlib.md5(msg_type + str(seq).encode() + data.hex().encode() + b"weaveworks").hexdigest()
    kind = "NAK" if digest[0] in "2d" else "ACK"
    return ("%s %d %s\n" % (kind, seq, digest)).encode()


# --- the answer rule ---------------------------------------------------------


def test_documented_example_byte_for_byte():
    assert answer_for(b"REQ 1 x") == b"ACK 1 ab79c6453de3f8785fb18a0c9d1ea4bb\n"
    assert answer_for(b"REQ 1 x\n") == b"ACK 1 ab79c6453de3f8785fb18a0c9d1ea4bb\n"
    assert answer_for(b"REQ 1 x\r\n") == b"ACK 1 ab79c6453de3f8785fb18a0c9d1ea4bb\n"
    assert answer_hash(b"REQ", 1, b"x") == b"ab79c6453de3f8785fb18a0c9d1ea4bb"


def test_nak_rule_on_both_digits():
    firsts = {}
    for seq in range(1, 2000):
        line = answer_for(b"REQ %d abc" % seq)
        firsts.setdefault(chr(line.split()[2][0]), line)
        assert line == reference(b"REQ", seq, b"abc")
    assert firsts["2"].startswith(b"NAK ") and firsts["d"].startswith(b"NAK ")
    assert all(line.startswith(b"ACK ") for digit, line in firsts.items() if digit not in "2d")
    assert answer_type(b"2f") == b"NAK" and answer_type(b"d0") == b"NAK" and answer_type(b"e2") == b"ACK"


# foo-protocol.md's formula (plain hex of Data) holds for printable ASCII Data;
# other bytes are hashed per code point (see MEASURED below).
PRINTABLE = st.integers(0x21, 0x7E)


@given(seq=st.integers(-(2**63), 2**63 - 1), data=st.lists(PRINTABLE, max_size=40).map(bytes))
def test_rule_matches_the_documented_formula(seq, data):
    line = b"REQ %d %s" % (seq, data) if data else b"REQ %d" % seq
    assert answer_for(line) == reference(b"REQ", seq, data)


@pytest.mark.parametrize(
    "line, normal",
    [(b"REQ +5 x", 5), (b"REQ 007 x", 7), (b"REQ -0 x", 0), (b"REQ +0007 x", 7), (b"REQ -007 x", -7)],
)
def test_seq_is_normalised_in_hash_and_answer(line, normal):
    assert answer_for(line) == reference(b"REQ", normal, b"x")
    assert answer_for(line).split()[1] == str(normal).encode()


@pytest.mark.parametrize(
    "line",
    [
        b"REQ 1 x y z",  # spaces in data
        b"REQ\t1 x",  # tab as separator
        b"REQ  1 x",  # double space
        b"REQ 1  x",
        b"REQ 1 x ",  # trailing space
        b" REQ 1 x",
        b"req 1 x",  # lower-case types
        b"ack 1 x",
        b"Req 1 x",
        b"FOO 1 x",
        b"REQ x 1",  # non-numeric seq
        b"REQ 1a x",
        b"REQ - x",
        b"REQ",
        b"REQ ",
        b"REQ 9223372036854775808 x",  # overflowing seq
        b"REQ -9223372036854775809 x",
        b"REQ 99999999999999999999999 x",
        b"",  # empty line
        b"\r",
    ],
)
def test_errdecode_cases(line):
    assert answer_for(line) == ERRDECODE == b"NAK 0 ERRDECODE\n"


@pytest.mark.parametrize("seq", [-1, 0, 9223372036854775807, -9223372036854775808])
def test_int64_edges_accepted(seq):
    assert answer_for(b"REQ %d x" % seq) == reference(b"REQ", seq, b"x")


#: Answers measured from the reference server-linux, for Data with control,
#: non-ASCII or invalid UTF-8 bytes (where its hash is not plain hex of Data),
#: and for the lines the old grammar refused (tabs, \r, empty Data, huge Seqs).
MEASURED = {
    b"REQ 1 a\tb": b"ACK 1 7865d01e7c327f4507443b8504f96a16\n",
    b"REQ 1 x\t": b"ACK 1 5f50f196f1a5f9614d9f9c80ec1c0767\n",
    b"REQ -5 \t\t": b"ACK -5 7b300112ca38a1db5870f4f05920ebe6\n",
    b"REQ 1 a\rb": b"NAK 1 29671c0393a801383d04b88430cabce6\n",
    b"REQ 1 x\r\r\r\r": b"ACK 1 f4f73ec224d544f9277a47e92152b90b\n",
    b"REQ 1 x\r\r": b"ACK 1 ab79c6453de3f8785fb18a0c9d1ea4bb\n",
    b"REQ 1 a\x0bb": b"ACK 1 0f577acc1de66ae1cb01a07594639765\n",
    b"REQ 1 a\x0cb": b"ACK 1 f66f3813ca088fd8cb37741a55cbbc8b\n",
    b"REQ 1 a\x00b": b"ACK 1 0db4541e9c7f8f4ea9653edd492e3118\n",
    b"REQ 1 \x7f\x10\x0f": b"ACK 1 9ec52e9672ec99dcb545b722f70f2d4c\n",
    b"REQ 1 \xff\xfe": b"ACK 1 a6583b7c6f92ceb313b0ba289ac3b33f\n",
    b"REQ 1 \xc2\xa0": b"ACK 1 833f972a47f4334fbcae72c01ee7c2a8\n",
    b"REQ 1 \xe2\x80\x83": b"ACK 1 6821c6dc973bcd486409564dd2d14329\n",
    b"REQ 1 \xf0\x9f\x98\x80": b"ACK 1 f8c028f02a36a240b85feeeae4580991\n",
    b"REQ 1 \xe2\x80x": b"ACK 1 a5b6f6ccfc5493c405b4d7536838485a\n",
    b"REQ 1 \xed\xa0\x80": b"ACK 1 0988a07a6e0749e699c75f66a8e8afde\n",
    b"REQ 1 \xf0\x80\x80\x80": b"ACK 1 58ff320fa81836b3213b043d60be48dc\n",
    b"REQ 1 a\xf0\x9f\x98": b"ACK 1 e502efb864918ab0a45fe5be9d50a049\n",
    b"ACK 7 \xc2": b"ACK 7 07d81a1f4dd4fae05e0fca8a7b660437\n",
    b"REQ 1 ": b"ACK 1 b7100d104e721105e1729cafe8f544fe\n",
    b"REQ 1 \r": b"ACK 1 b7100d104e721105e1729cafe8f544fe\n",
    b"REQ " + b"0" * 5000 + b"1 x": b"ACK 1 ab79c6453de3f8785fb18a0c9d1ea4bb\n",
    b"REQ " + b"9" * 5000 + b" x": ERRDECODE,
    b"REQ 1\r\r\r": ERRDECODE,
}


@pytest.mark.parametrize("line", list(MEASURED), ids=lambda line: repr(line[:24]))
def test_answers_measured_from_the_reference(line):
    assert answer_for(line) == MEASURED[line]
    assert answer_for(line + b"\n") == MEASURED[line]


def test_a_huge_seq_split_over_two_writes_is_answered():
    line = b"REQ " + b"0" * 5000 + b"1 x\n"
    a = Answerer()
    assert a.feed(line[:2500]) == b""
    assert a.feed(line[2500:] + b"REQ " + b"9" * 5000 + b" x\n") == EXAMPLE_ANSWER + ERRDECODE


def test_no_data_hashes_empty_hex():
    assert answer_for(b"REQ 2") == reference(b"REQ", 2, b"")


def test_ack_or_nak_from_a_client_is_hashed_with_its_own_type():
    assert answer_for(b"ACK 1 x") == reference(b"ACK", 1, b"x")
    assert answer_for(b"ACK 1 x") != answer_for(b"REQ 1 x")
    assert answer_for(b"NAK 3 y") == reference(b"NAK", 3, b"y")


def test_lie_changes_the_hash_only():
    good = answer_for(b"REQ 1 x")
    bad = lie_about(good)
    assert bad != good and len(bad) == len(good) and bad[:-2] == good[:-2]
    assert lie_about(ERRDECODE) == ERRDECODE
    assert check_answer(bad.rstrip(b"\n"), 1, b"x") == "corrupted data"


def test_check_answer_reasons():
    good = answer(b"REQ", 4, b"abcd")
    assert check_answer(good, 4, b"abcd") is None
    assert check_answer(good.rstrip(b"\n"), 4, b"abcd") is None
    assert check_answer(good, 5, b"abcd").startswith("unexpected seq 4 (want 5)")
    flipped = (b"NAK" if good.startswith(b"ACK") else b"ACK") + good[3:]
    assert check_answer(flipped, 4, b"abcd") == "corrupted data"
    assert check_answer(b"NAK 0 ERRDECODE", 4, b"abcd").startswith("unexpected seq 0")
    assert check_answer(b"garbage", 4, b"abcd").startswith("undecodable answer")


# --- the server's stream answerer --------------------------------------------


LINES = [b"REQ 1 x", b"REQ +5 abc", b"bad line", b"", b"ACK 7 q\r", b"REQ 9223372036854775807 z", b"REQ 2"]


def answers_per_line(lines):
    return b"".join(answer_for(line) for line in lines)


@settings(max_examples=200)
@given(lines=st.lists(st.sampled_from(LINES), max_size=30), cuts=st.lists(st.integers(0, 400), max_size=20))
def test_answerer_any_segmentation(lines, cuts):
    stream = b"".join(line + b"\n" for line in lines) + b"REQ 99 unterminated"
    pieces, prev = [], 0
    for cut in sorted(c for c in cuts if c <= len(stream)) + [len(stream)]:
        pieces.append(stream[prev:cut])
        prev = cut
    a = Answerer()
    out = b"".join(a.feed(p) for p in pieces)
    assert out == answers_per_line(lines)
    assert not a.oversized


def test_answerer_byte_by_byte():
    a = Answerer()
    stream = b"REQ 1 x\nREQ 2 y\n"
    assert b"".join(a.feed(stream[i : i + 1]) for i in range(len(stream))) == answers_per_line([b"REQ 1 x", b"REQ 2 y"])


def test_answerer_max_line_boundary_in_one_chunk():
    fits = b"REQ 1 " + b"a" * (MAX_LINE - 7)  # + "\n" = exactly MAX_LINE bytes
    assert len(fits) + 1 == MAX_LINE
    a = Answerer()
    assert a.feed(fits + b"\n") == answer_for(fits) and not a.oversized
    a = Answerer()
    out = a.feed(b"REQ 1 x\n" + fits + b"a\nREQ 2 y\n")
    assert out == answer_for(b"REQ 1 x") and a.oversized  # the line before it is answered
    assert a.feed(b"REQ 3 z\n") == b""  # and nothing after


def test_answerer_oversized_across_chunks():
    a = Answerer()
    assert a.feed(b"REQ 1 " + b"a" * 40000) == b""
    assert not a.oversized
    assert a.feed(b"a" * 40000) == b"" and a.oversized
    assert a.feed(b"\nREQ 1 x\n") == b""
    a = Answerer()
    a.feed(b"R" * (MAX_LINE - 1))
    assert not a.oversized
    assert a.feed(b"\n") == ERRDECODE
    a = Answerer()
    a.feed(b"R" * (MAX_LINE - 1))
    assert a.feed(b"R\n") == b"" and a.oversized


def test_answerer_lie():
    assert Answerer(lie=True).feed(b"REQ 1 x\nbad\n") == lie_about(answer_for(b"REQ 1 x")) + ERRDECODE


# --- log formatting -----------------------------------------------------------


# Go's own table for time.Duration.String (src/time/time_test.go, durationTests), and outputs of the reference.
@pytest.mark.parametrize(
    "ns, text",
    [
        (0, "0s"),
        (1, "1ns"),
        (1100, "1.1µs"),
        (2_200_000, "2.2ms"),
        (3_300_000_000, "3.3s"),
        (4 * 60_000_000_000 + 5_000_000_000, "4m5s"),
        (4 * 60_000_000_000 + 5_001_000_000, "4m5.001s"),
        (5 * 3_600_000_000_000 + 6 * 60_000_000_000 + 7_001_000_000, "5h6m7.001s"),
        (8 * 60_000_000_000 + 1, "8m0.000000001s"),
        (2**63 - 1, "2562047h47m16.854775807s"),
        (-(2**63), "-2562047h47m16.854775808s"),
        (-1100, "-1.1µs"),
        (7_191_310, "7.19131ms"),  # foo-protocol.md's examples, printed by server-linux
        (62_999, "62.999µs"),
        (19_992_014, "19.992014ms"),
        (163_243, "163.243µs"),
        (60_000_000_000, "1m0s"),
        (3_600_000_000_000, "1h0m0s"),
    ],
)
def test_duration_is_gos(ns, text):
    assert duration(ns) == text


def test_log_line_has_gos_standard_prefix():
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} listening on x", log_line("listening on x"))
    when = time.mktime((2026, 12, 2, 0, 34, 36, 0, 0, -1))
    assert log_line("listening on 127.0.0.1:9302", when) == "2026/12/02 00:34:36 listening on 127.0.0.1:9302"


def test_join_host_port():
    assert join_host_port(("127.0.0.1", 5)) == "127.0.0.1:5"
    assert join_host_port(("::ffff:127.0.0.1", 5, 0, 0)) == "127.0.0.1:5"
    assert join_host_port(("::1", 5, 0, 0)) == "[::1]:5"


@pytest.mark.parametrize(
    "text, want",
    [
        (":8001", ("", 8001)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:2", ("::1", 2)),
        ("127.0.0.1:", ("127.0.0.1", 0)),
        # What client-linux / server-linux print after "dial tcp: " / "listen tcp: ":
        ("abc", "address abc: missing port in address"),
        ("8001", "address 8001: missing port in address"),
        ("127.0.0.1:99999", "address 99999: invalid port"),
        ("::1:5", "address ::1:5: too many colons in address"),
        ("[::1]5", "address [::1]5: missing port in address"),
        ("[::1", "address [::1: missing ']' in address"),
    ],
)
def test_split_host_port_is_gos(text, want):
    if isinstance(want, tuple):
        assert split_host_port(text) == want
    else:
        with pytest.raises(AddrError) as info:
            split_host_port(text)
        assert str(info.value) == want


def test_go_error_texts():
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert dial_error(refused, "127.0.0.1:9399") == "dial tcp 127.0.0.1:9399: getsockopt: connection refused"
    assert dial_error(TimeoutError("timed out"), "[::1]:1") == "dial tcp [::1]:1: i/o timeout"
    reset = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert io_error("read", reset, "127.0.0.1:5", "127.0.0.1:6") == (
        "read tcp 127.0.0.1:5->127.0.0.1:6: read: connection reset by peer"
    )
    pipe = BrokenPipeError(errno.EPIPE, "Broken pipe")
    assert io_error("write", pipe, "a:1", "b:2") == "write tcp a:1->b:2: write: broken pipe"
    assert io_error("read", TimeoutError("timed out"), "a:1", "b:2") == "read tcp a:1->b:2: i/o timeout"
    assert quote(b"x") == '"x"' and quote(b'a"\\\t\x00\xff') == '"a\\"\\\\\\t\\x00\\xff"'


# --- the client's plan --------------------------------------------------------


def test_request_data_is_fixed_and_in_range():
    data = request_data(1, 0, 2000)
    assert data == request_data(1, 0, 2000)
    assert data != request_data(2, 0, 2000)
    assert all(4 <= len(d) <= 31 and set(d.decode()) <= set(ALPHABET) for d in data)
    assert {len(d) for d in data} == set(range(4, 32))


def test_plan_slices_match_whole_and_rule():
    n = BLOCK * 2 + 17
    plan = Plan(7, n)
    reqs, answers = plan.slice(0, n)
    lines = reqs.split(b"\n")[:-1]
    assert len(lines) == n and lines[0].startswith(b"REQ 1 ") and lines[-1].startswith(b"REQ %d " % n)
    assert answers == answers_per_line(lines)
    parts = [plan.slice(a, b) for a, b in [(0, 1), (1, BLOCK - 1), (BLOCK - 1, BLOCK + 3), (BLOCK + 3, n)]]
    assert b"".join(p[0] for p in parts) == reqs and b"".join(p[1] for p in parts) == answers


WANT = answer(b"REQ", 1, b"x").rstrip(b"\n")  # ACK 1 ab79c6453de3f8785fb18a0c9d1ea4bb
HASH = WANT.split()[2]


# Each verdict was printed by client-linux for that answer to its REQ 1 (see the commit that added this).
@pytest.mark.parametrize(
    "line, verdict",
    [
        (WANT, None),
        (WANT + b"\r", None),  # one \r is dropped
        (b"ACK 01 " + HASH, None),  # Seq is a number: 01 and +1 are 1
        (b"ACK +1 " + HASH, None),
        (WANT + b"\r\r", "validating response: corrupted data"),
        (b"ACK 1 " + HASH.upper(), "validating response: corrupted data"),
        (b"ACK 1", "validating response: corrupted data"),
        (b"ACK 2 " + HASH, "validating response: unexpected seq no"),
        (b"ACK -1 " + HASH, "validating response: unexpected seq no"),
        (b"NAK 0 ERRDECODE", "validating response: unexpected seq no"),
        (b"NAK 1 " + HASH, "validating response: unexpected response type"),
        (b"REQ 1 " + HASH, "validating response: unexpected response type"),
        (b"NAK 1 abc", "validating response: unexpected response type"),  # the type is checked before the hash
        (b"NAK 2 abc", "validating response: unexpected seq no"),  # and the Seq before the type
        (b"garbage", "decoding response: not enough fields"),
        (b"", "decoding response: not enough fields"),
        (WANT + b" x", "decoding response: too many fields"),
        (WANT + b" ", "decoding response: too many fields"),
        (b" " + WANT, "decoding response: too many fields"),
        (b"ACK  1 " + HASH, "decoding response: too many fields"),
        (b"FOO 1 " + HASH, 'decoding response: bad type ""'),
        (b"ack 1 " + HASH, 'decoding response: bad type ""'),
        (b"ACK\t1 " + HASH, 'decoding response: bad type ""'),
        (b"FOO x " + HASH, 'decoding response: bad type ""'),  # the type is decoded before the Seq
        (b"ACK x " + HASH, 'decoding response: bad seq: strconv.ParseInt: parsing "x": invalid syntax'),
        (b"ACK ", 'decoding response: bad seq: strconv.ParseInt: parsing "": invalid syntax'),
        (
            b"ACK 99999999999999999999 " + HASH,
            'decoding response: bad seq: strconv.ParseInt: parsing "99999999999999999999": value out of range',
        ),
    ],
)
def test_check_line_gives_the_reference_clients_verdict(line, verdict):
    assert check_line(line, WANT) == verdict


# --- command lines ------------------------------------------------------------


@pytest.mark.parametrize("argv", [["-listen", ":9"], ["-listen=:9"], ["--listen", ":9"], ["--listen=:9"]])
def test_server_flags_go_and_docopt_style(argv):
    opts = flags.parse_cli(server.USAGE, argv + ["-quiet", "-close-on-eof"], "foo-server")
    assert opts["--listen"] == ":9" and opts["--quiet"] and opts["--close-on-eof"]
    assert not opts["--split"] and not opts["--lie"]


def test_server_defaults():
    opts = flags.parse_cli(server.USAGE, [], "foo-server")
    assert opts["--listen"] == ":8001"


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        flags.parse_cli(server.USAGE, ["-bogus"], "foo-server")
    assert exc.value.code == 2 and "unknown flag -bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        client.parse(["-window", "0"])
    assert exc.value.code == 2 and "-window" in capsys.readouterr().err


def test_client_defaults_and_flags():
    opts, summary = client.parse([])
    assert opts == client.ClientOptions(address=Address("localhost", 8001))
    assert (opts.requests, opts.window, opts.conns, opts.split, opts.timeout) == (100, 1, 1, True, 10.0)
    assert not summary
    argv = "-connect=[::1]:9 -requests 5 -window 3 -conns 2 -seed -4 -no-split -timeout 0.5 -summary -quiet"
    opts, summary = client.parse(argv.split())
    assert opts == client.ClientOptions(Address("::1", 9), 5, 3, 2, -4, False, 0.5, True) and summary

"""The grammar, differentially: server-linux decides what is valid, fooproxy must count the same.

issue 16 §3. Hypothesis generates lines biased towards the bytes where the
grammar is decided (space, tab, ``\\r``, signs, digits, int64 edges, long Seqs,
REQ/ACK/NAK prefixes, control and non-UTF-8 bytes). Each batch is sent straight
to the reference server, where a line is valid iff it is not answered
``NAK 0 ERRDECODE``, and then through a real fooproxy process in front of the
same server; the proxy's SIGUSR2 counts must grow by exactly what the reference
decided, and the proxy must pass the answers unchanged. Our foo-server's answer
rule (``answer_for``) is checked against the same answers.

Runs only where ``FOO_BIN_DIR`` (default ``bin/``) holds server-linux.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fooproxy.protocol import parse_line
from harness import tasks
from harness.binaries import BIN_DIR_ENV, Peers, bin_dir, reference_server
from harness.peers.answer import answer_for
from tests.unit.test_protocol import DECODED, INVALID

ERRDECODE = b"NAK 0 ERRDECODE\n"
KINDS = ("msg_req", "msg_ack", "msg_nak", "msg_invalid")
INT64_MAX = b"9223372036854775807"


@pytest.fixture(scope="module")
def reference() -> tuple[str, ...]:
    cmd = reference_server()
    if cmd is None:
        pytest.skip(
            "no executable server-linux in %s=%s: the differential grammar test needs the reference server"
            % (BIN_DIR_ENV, bin_dir())
        )
    return cmd


@pytest.fixture(scope="module")
def stack(reference, tmp_path_factory) -> Iterator[tuple[tasks.Service, socket.socket, socket.socket]]:
    """server-linux, a fooproxy in front of it, one connection straight to each."""
    log_dir = tmp_path_factory.mktemp("differential")
    peers = Peers("reference", reference, ("false",))
    with (
        tasks.start_server(peers=peers, log_dir=log_dir) as server,
        tasks.start_proxy(server.address, log_dir=log_dir) as proxy,
    ):
        direct = socket.create_connection(tasks.split_address(server.address), timeout=10)
        proxied = socket.create_connection(tasks.split_address(proxy.address), timeout=10)
        with direct, proxied:
            yield proxy, direct, proxied
        assert "Traceback" not in proxy.stderr_text(), proxy.tail(60)


def exchange(sock: socket.socket, lines: list[bytes], timeout: float = 10.0) -> list[bytes]:
    """Send ``lines`` (each without its newline) in one write; return their answers."""
    sock.sendall(b"".join(line + b"\n" for line in lines))
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < len(lines):
        remaining = deadline - time.monotonic()
        assert remaining > 0, "%d of %d answers within %gs" % (data.count(b"\n"), len(lines), timeout)
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        assert chunk, "EOF after %d of %d answers" % (data.count(b"\n"), len(lines))
        data += chunk
    answers = [a + b"\n" for a in data.split(b"\n")]
    assert answers[-1] == b"\n", "more answers than lines: %r" % data[-200:]
    return answers[:-1]


def counts(stats: dict) -> tuple[int, ...]:
    return tuple(stats[k] for k in KINDS)


# -- the lines ----------------------------------------------------------------
EDGE_TOKENS = [
    b"REQ", b"ACK", b"NAK", b"REQ ", b"ACK ", b"NAK ", b"req", b"RE", b"REQQ",
    b" ", b"  ", b"\t", b"\r", b"\r\r", b"\r\r\r", b"\x0b", b"\x0c", b"\x00", b"\x85", b"\xff",
    b"\xc2\xa0", b"\xe2\x80\x83", b"\xef\xbc\x91", b"\xd9\xa1",
    b"+", b"-", b"0", b"1", b"7", b"9", b"00", b"12", b"x", b"Hey", b"_", b"e", b"0x",
    INT64_MAX, b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809",
]  # fmt: skip
token = st.one_of(st.sampled_from(EDGE_TOKENS), st.binary(min_size=1, max_size=3))


def mostly(common: bytes, *others: bytes) -> st.SearchStrategy[bytes]:
    """``common`` three times in four, else one of ``others``."""
    return st.one_of(st.just(common), st.just(common), st.just(common), st.sampled_from(others))


field_seq = st.builds(
    lambda sign, zeros, digits: sign + b"0" * zeros + digits,
    mostly(b"", b"+", b"-", b"+-", b"--"),
    st.sampled_from([0, 0, 0, 1, 18, 4300, 5000]),
    st.one_of(
        st.integers(min_value=-(2**64), max_value=2**64).map(lambda n: b"%d" % abs(n)),
        st.sampled_from([b"", b"0", b"1", INT64_MAX, b"9223372036854775808", b"9" * 19, b"9" * 5000, b"1_0", b"1e3"]),
    ),
)
# Mostly almost-valid lines (type, separator, seq, separator, data, tail), so
# the edges are hit from both sides; sometimes plain token soup.
shaped = st.builds(
    lambda t, s1, seq, s2, data, tail: t + s1 + seq + s2 + data + tail,
    st.one_of(st.sampled_from([b"REQ", b"ACK", b"NAK"]), st.sampled_from([b"REQ", b"req", b"FOO", b"", b"REQQ"])),
    mostly(b" ", b"\t", b"  ", b"\r ", b""),
    field_seq,
    mostly(b" ", b"", b"\t", b"  ", b"\r", b"\r\r", b"\r\r\r"),
    st.one_of(
        st.lists(st.sampled_from(EDGE_TOKENS[9:]).filter(lambda t: b" " not in t), max_size=4),
        st.lists(token, max_size=4),
    ).map(b"".join),
    mostly(b"", b"\r", b"\r\r", b"\r\r\r", b" ", b" \r", b"\t"),
)
soup = st.lists(token, max_size=10).map(b"".join)
line = st.one_of(shaped, shaped, shaped, soup).map(lambda b: b.replace(b"\n", b"")[:60000])


def check_batch(stack, lines: list[bytes]) -> None:
    proxy, direct, proxied = stack
    answers = exchange(direct, lines)
    valid = [a != ERRDECODE for a in answers]
    # What the reference decided, as counts: each valid line by its type, the
    # rest invalid; every answer is a message too (ERRDECODE is a valid NAK).
    want = [0, 0, 0, 0]
    for text, ok in zip(lines, valid, strict=True):
        want[("REQ", "ACK", "NAK").index(text[:3].decode()) if ok else 3] += 1
    for answer in answers:
        want[1 if answer.startswith(b"ACK ") else 2] += 1
    before = counts(tasks.signal_stats(proxy))
    through = exchange(proxied, lines)
    after = counts(tasks.signal_stats(proxy))
    disagree = [(text[:80], ok) for text, ok in zip(lines, valid, strict=True) if (parse_line(text) is not None) != ok]
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == tuple(want), (
        "proxy counts (req, ack, nak, invalid) differ from the reference's decoding; "
        "parse_line disagrees with server-linux on (line, reference-valid): %r" % disagree
    )
    assert through == answers, "the proxy changed the answers"
    assert [answer_for(text) for text in lines] == answers, "foo-server's answer rule differs from server-linux"


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(lines=st.lists(line, min_size=1, max_size=12))
@example(lines=[b"REQ 1 a\tb", b"REQ 1 ", b"REQ 1\r\r", b"REQ 1\r\r\r", b"REQ " + b"0" * 5000 + b"1 x"])
@example(lines=[b"REQ " + b"9" * 5000 + b" x", b"REQ -" + b"0" * 4400 + b"9223372036854775808", b"REQ 1 x\r\r\r"])
def test_proxy_counts_what_server_linux_decodes(stack, lines):
    check_batch(stack, lines)


def test_the_unit_tests_grammar_table_is_the_reference_s(stack):
    """tests/unit/test_protocol.py's VALID/INVALID lists, decided again by server-linux."""
    lines = list(DECODED) + INVALID
    answers = exchange(stack[1], lines)
    wrong = [
        (text[:60], answer)
        for text, answer in zip(lines, answers, strict=True)
        if (answer != ERRDECODE) != (text in DECODED)
        or (text in DECODED and answer.split(b" ")[1] != b"%d" % DECODED[text][1])
    ]
    assert not wrong, wrong
    check_batch(stack, lines)

"""Hostile lines through a real fooproxy process: huge Seqs, odd bytes, a line split over writes.

issue 16: a Seq of thousands of digits made ``int()`` raise (Python refuses
more than 4,300 digits), which killed the session with a traceback; the valid
``REQ 000…01 x`` split over two writes got no answer. Here a client sends such
lines through the proxy to a server (the Python peer, and server-linux where
``FOO_BIN_DIR`` has it), reads every answer, and the proxy's counts and logs
are checked.
"""

from __future__ import annotations

import socket
import time

import pytest

from harness import tasks
from harness.binaries import find_peers, python_peers

ZEROS = b"0" * 5000
#: Valid although far past int()'s digit limit: Seq 1, answered like ``REQ 1 x``.
HUGE_VALID = b"REQ " + ZEROS + b"1 x\n"
#: Out of int64: the reference answers ERRDECODE and the proxy counts it invalid.
HUGE_INVALID = b"REQ " + b"9" * 5000 + b" x\n"
REQ_1_X = b"ACK 1 ab79c6453de3f8785fb18a0c9d1ea4bb\n"  # the reference's answer to REQ 1 x
ERRDECODE = b"NAK 0 ERRDECODE\n"
#: Lines the old grammar counted invalid and the reference answers, with those answers.
ODD_LINES = {
    b"REQ 2 a\tb\n": b"ACK 2 ",
    b"REQ 3 \r\x0b\x0c\x00\xff\n": b"ACK 3 ",
    b"REQ 4 \n": b"ACK 4 ",
    b"REQ 5 x\r\r\n": b"",  # hashed like REQ 5 x: its answer's type is not fixed here
}


def servers() -> list:
    kinds = [pytest.param(python_peers(), id="python")]
    peers = find_peers()
    if peers.kind == "reference":
        kinds.append(pytest.param(peers, id="reference"))
    else:
        kinds.append(pytest.param(None, id="reference", marks=pytest.mark.skip(reason=peers.note)))
    return kinds


def recv_lines(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    """Exactly ``count`` lines; AssertionError on EOF or timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "only %d of %d answers within %gs: %r" % (data.count(b"\n"), count, timeout, data[:300])
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        assert chunk, "EOF after %d of %d answers: %r" % (data.count(b"\n"), count, data[:300])
        data += chunk
    return [line + b"\n" for line in data.split(b"\n")[:count]]


def wait_forwarded(proxy: tasks.Service, nbytes: int, timeout: float = 10.0) -> None:
    """Poll the proxy's stats until it has forwarded ``nbytes`` client bytes (a readiness check)."""
    deadline = time.monotonic() + timeout
    while tasks.signal_stats(proxy)["bytes_client_to_server"] < nbytes:
        assert time.monotonic() < deadline, "the proxy did not forward %d bytes within %gs" % (nbytes, timeout)
        time.sleep(0.01)  # poll interval


@pytest.mark.parametrize("peers", servers())
def test_huge_seqs_and_odd_bytes_are_answered_and_counted(peers, tmp_path):
    with (
        tasks.start_server(peers=peers, log_dir=tmp_path) as server,
        tasks.start_proxy(server.address, log_dir=tmp_path) as proxy,
    ):
        with socket.create_connection(tasks.split_address(proxy.address), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The huge valid line in two writes: the second only once the proxy has
            # read and forwarded the first, so it really meets the proxy split.
            sock.sendall(HUGE_VALID[:2600])
            wait_forwarded(proxy, 2600)
            sock.sendall(HUGE_VALID[2600:])
            assert recv_lines(sock, 1) == [REQ_1_X]
            sock.sendall(HUGE_INVALID)
            assert recv_lines(sock, 1) == [ERRDECODE]
            sock.sendall(b"".join(ODD_LINES))
            answers = recv_lines(sock, len(ODD_LINES))
            for (line, prefix), got in zip(ODD_LINES.items(), answers, strict=True):
                assert got.startswith(prefix) and got != ERRDECODE, (line, got)
            stats = tasks.signal_stats(proxy)
        proxy_log = proxy.stderr_text()
        server_log = server.stderr_text()
    # Client to server: 1 + 4 REQs valid, the nines invalid. Back: 5 hashed answers
    # (ACK or NAK) and the ERRDECODE, which is itself a valid NAK message.
    n = len(ODD_LINES) + 1
    assert stats["msg_req"] == n, stats
    assert stats["msg_ack"] + stats["msg_nak"] == n + 1, stats
    assert stats["msg_invalid"] == 1, stats
    assert stats["msg_total"] == 2 * n + 1, stats
    assert "Traceback" not in proxy_log, proxy_log[-3000:]
    assert "Traceback" not in server_log, server_log[-3000:]

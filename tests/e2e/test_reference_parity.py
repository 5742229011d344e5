"""The Python peers side by side with the reference binaries: what each prints, stream by stream, and its exit status.

Runs only where ``$FOO_BIN_DIR`` holds ``server-linux`` and ``client-linux``
(skipped, saying so, elsewhere). Each scenario runs once with the reference
peer and once with ours, the rest of the setup being the same; then stdout,
stderr, the exit status (and, for a server, what a client received) must be
equal once the fields in ``MAY_DIFFER`` are blanked out. Nothing else may differ.

Scenarios: a whole OK run, a lying server, a refused connect, a server gone in
the middle of a run (closed, and reset), and a line over 64 KiB sent to a
server.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from harness import tasks
from harness.binaries import Peers
from harness.peers.answer import answer_for
from tests.e2e.helpers import connect, recv_lines

pytestmark = pytest.mark.e2e

#: The only fields that may differ between the two peers' output, each blanked to its name.
MAY_DIFFER: dict[str, re.Pattern[str]] = {
    # Go's log prefix: the wall-clock time of the line.
    "<time>": re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(?= )", re.MULTILINE),
    # How long a connection lasted, in Go's format (the format itself must match: ns, µs, ms, s, m, h).
    "<duration>": re.compile(r"(?<=disconnected \()(?:\d+h)?(?:\d+m)?\d+(?:\.\d+)?(?:ns|µs|ms|s)(?=\)$)", re.MULTILINE),
    # Ephemeral ports (a client's local port, a server's free port).
    "<port>": re.compile(r"(?<=127\.0\.0\.1:)\d+"),
}


def blank(text: str) -> str:
    """``text`` with every ``MAY_DIFFER`` field replaced by its name."""
    for name, pattern in MAY_DIFFER.items():
        text = pattern.sub(name, text)
    return text


def assert_same(ours: dict[str, object], reference: dict[str, object]) -> None:
    """Equal stream by stream, after ``blank``; the message shows both sides of each difference."""
    ours = {k: blank(v) if isinstance(v, str) else v for k, v in ours.items()}
    reference = {k: blank(v) if isinstance(v, str) else v for k, v in reference.items()}
    diff = [
        "%s:\n  reference: %r\n  python:    %r" % (k, reference[k], ours[k])
        for k in reference
        if ours[k] != reference[k]
    ]
    assert not diff, "the Python peer differs from the reference:\n" + "\n".join(diff)


def poll(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out after %gs waiting for %s" % (timeout, what)
        time.sleep(0.01)


@pytest.fixture(scope="module")
def both(ref_server, ref_client, py_peers: Peers) -> dict[str, Peers]:
    """The reference peers and ours (skips, saying why, unless both binaries are there)."""
    return {"reference": Peers("reference", ref_server, ref_client), "python": py_peers}


# -- the client: same server, each client ----------------------------------------------------
def client_streams(address: str, peers: Peers) -> dict[str, object]:
    result = tasks.run_client(address, peers=peers, timeout=30)
    return {"exit": result.rc, "stdout": result.stdout, "stderr": result.stderr}


def each_client(both: dict[str, Peers], address: str) -> dict[str, object]:
    ref = client_streams(address, both["reference"])
    ours = client_streams(address, both["python"])
    assert_same(ours, ref)
    return ref


def test_ok_run(procs, both) -> None:
    server = procs.server(both["reference"])
    ref = each_client(both, server.address)
    assert ref == {"exit": 0, "stdout": "..........OK!\n", "stderr": ""}  # the scenario is what it says


def test_lying_server(procs, both, py_peers) -> None:
    liar = procs.server(py_peers, "-lie", "-quiet")
    ref = each_client(both, liar.address)
    assert ref["exit"] == 1 and "corrupted data" in ref["stderr"]


def test_refused_connect(both) -> None:
    ref = each_client(both, tasks.local_address())  # a free port: nothing listens
    assert ref["exit"] == 1 and "connection refused" in ref["stderr"]


class GoneMidRun:
    """A server that answers ``answers`` requests, reads the next one, and then closes (or resets) the connection."""

    def __init__(self, answers: int, reset: bool) -> None:
        self.answers, self.reset = answers, reset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        with self.listener:
            for _ in range(2):  # one connection per client run
                conn, _ = self.listener.accept()
                with conn:
                    buf, answered = b"", 0
                    while answered <= self.answers:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                        while b"\n" in buf and answered <= self.answers:
                            line, buf = buf.split(b"\n", 1)
                            if answered < self.answers:
                                conn.sendall(answer_for(line))
                            answered += 1  # the last one read is left unanswered
                    if self.reset:  # SO_LINGER 0: close sends an RST
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_server_gone_mid_run(both, reset: bool) -> None:
    server = GoneMidRun(25, reset)
    server.thread.start()
    ref = each_client(both, server.address)
    server.thread.join(timeout=30)
    assert ref["exit"] == 1 and ref["stdout"] == "...FAILED!\n"  # 25 answers: dots after 1, 11 and 21


# -- the server: same client, each server ------------------------------------------------------
def server_streams(procs, peers: Peers, scenario: Callable[[tasks.Service], dict]) -> dict[str, object]:
    server = procs.server(peers, name="server-" + peers.kind)
    seen = scenario(server)
    code = server.stop(sig=signal.SIGTERM)
    return {**seen, "exit": code, "stdout": server.stdout_text(), "stderr": server.stderr_text()}


def test_server_log_of_an_ok_run(procs, both) -> None:
    def one_run(server: tasks.Service) -> dict:
        result = tasks.run_client(server.address, peers=both["reference"])
        poll(lambda: "disconnected" in server.stderr_text(), what="the disconnected line")
        return {"client": (result.rc, result.stdout, result.stderr)}

    ref = server_streams(procs, both["reference"], one_run)
    ours = server_streams(procs, both["python"], one_run)
    assert_same(ours, ref)
    assert blank(ref["stderr"]) == (
        "<time> listening on 127.0.0.1:<port>\n"
        "<time> 127.0.0.1:<port>: connected\n"
        "<time> 127.0.0.1:<port>: disconnected (<duration>)\n"
    )
    assert ref["exit"] == -signal.SIGTERM


def test_a_line_over_64_kib(procs, both) -> None:
    def long_line(server: tasks.Service) -> dict:
        with connect(server.address) as sock:
            fits = b"REQ 1 " + b"a" * 65529  # 65,536 bytes with its newline: still answered
            sock.sendall(fits + b"\n")
            fits_answer = recv_lines(sock, 1)
        poll(lambda: server.stderr_text().count("disconnected") == 1, what="the first disconnected line")
        with connect(server.address) as sock:
            sock.sendall(b"REQ 1 x\nREQ 2 " + b"a" * 70000 + b"\nREQ 3 y\n")
            got = recv_lines(sock, 1)
            sock.settimeout(0.5)
            try:
                more = sock.recv(65536) or b"<EOF>"
            except TimeoutError:
                more = b"<nothing within 0.5 s>"
            # Logged at once, while the socket is still open:
            poll(lambda: server.stderr_text().count("disconnected") == 2, what="the second disconnected line")
        return {"answered": fits_answer == [answer_for(fits)], "received": got, "then": more}

    ref = server_streams(procs, both["reference"], long_line)
    ours = server_streams(procs, both["python"], long_line)
    assert_same(ours, ref)
    assert ref["answered"] and ref["received"] == [answer_for(b"REQ 1 x")] and ref["then"] == b"<nothing within 0.5 s>"

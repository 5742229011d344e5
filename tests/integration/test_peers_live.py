"""foo-server and foo-client over real sockets.

The server runs as a subprocess (``python -m harness.peers.server``) for the CLI-level
checks, in which case the test talks to it with plain blocking sockets, or
in-process (``FooServer`` on port 0) with gevent sockets. Readiness is polled by
connecting; negative checks ("no EOF arrives") use a short socket timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
import gevent.socket as gsocket
import pytest
from gevent.server import StreamServer

try:
    import harness  # noqa: F401
except ModuleNotFoundError:  # an editable install made before harness/ existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fooproxy.config import Address
from harness.peers.answer import answer_for
from harness.peers.client import ClientOptions, run
from harness.peers.server import FooServer, make_listener

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
EXAMPLE = b"ACK 1 ab79c6453de3f8785fb18a0c9d1ea4bb\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, "server exited early with %s" % proc.returncode
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)  # polling interval of the readiness probe, not synchronisation
    raise AssertionError("server did not accept connections on %d" % port)


class ServerProc:
    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.peers.server", "-listen", ":%d" % self.port, *flags],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        wait_port(self.port, self.proc)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.log.close()


@pytest.fixture
def start_server():
    made: list[ServerProc] = []

    def start(*flags: str) -> ServerProc:
        made.append(ServerProc(*flags))
        return made[-1]

    try:
        yield start
    finally:
        for srv in made:
            srv.kill()


def run_client(port: int, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.peers.client", "-connect", "127.0.0.1:%d" % port, *flags],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        timeout=timeout,
    )


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_lines(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while buf.count(b"\n") < n:
        data = sock.recv(65536)
        assert data, "EOF after %r" % buf
        buf += data
    return buf


# --- the client against the server ------------------------------------------


def test_default_client_passes(start_server):
    srv = start_server()
    res = run_client(srv.port)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"..........OK!\n", b"")
    log = srv.stderr()
    stamp = r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} "  # Go's log prefix, as server-linux writes it
    first = r"%slistening on (\[::\]|0\.0\.0\.0):%d\n" % (stamp, srv.port)
    assert re.match(first + r"%s127\.0\.0\.1:\d+: connected\n" % stamp, log), log
    assert re.search(r"%s127\.0\.0\.1:\d+: disconnected \([0-9.]+(ns|µs|ms|s)\)\n" % stamp, log), log


def test_pipelined_and_concurrent_client_passes(start_server):
    srv = start_server("-quiet")
    res = run_client(srv.port, "-requests", "3000", "-window", "64", "-conns", "4", "-summary")
    assert res.returncode == 0, res.stdout
    dots, summary, rest = res.stdout.decode().split("\n")
    assert dots == "." * 1200 + "OK!" and rest == ""
    stats = json.loads(summary)
    assert stats["answers"] == 12000 and stats["errors"] == 0 and stats["conns"] == 4 and stats["msgs_per_s"] > 0
    assert "connected" not in srv.stderr()


def test_client_passes_against_splitting_server(start_server):
    srv = start_server("-split", "-quiet")
    assert run_client(srv.port).stdout == b"..........OK!\n"
    assert run_client(srv.port, "-window", "10", "-requests", "500", "-quiet", "-no-split").stdout == b"OK!\n"


def test_lying_server_fails_the_client(start_server):
    srv = start_server("-lie")
    res = run_client(srv.port)
    # As client-linux: the verdict on stdout, the reason on stderr, unindented.
    assert (res.returncode, res.stdout, res.stderr) == (
        1,
        b"FAILED!\n",
        b"Errors:\nvalidating response: corrupted data\n",
    )


def test_refused_connect_fails():
    port = free_port()
    res = run_client(port)
    want = b"Errors:\ndial tcp 127.0.0.1:%d: getsockopt: connection refused\n" % port
    assert (res.returncode, res.stdout, res.stderr) == (1, b"FAILED!\n", want)


def test_a_connect_address_go_refuses_is_a_failed_run_not_a_usage_error():
    res = subprocess.run(
        [sys.executable, "-m", "harness.peers.client", "-connect", "abc"], cwd=ROOT, env=ENV, capture_output=True
    )
    want = (1, b"FAILED!\n", b"Errors:\ndial tcp: address abc: missing port in address\n")
    assert (res.returncode, res.stdout, res.stderr) == want


def test_client_passes_against_close_on_eof_server(start_server):
    srv = start_server("-close-on-eof")
    res = run_client(srv.port, "-window", "8")
    assert (res.returncode, res.stdout) == (0, b"..........OK!\n")


# --- the server's wire behaviour -------------------------------------------------


def test_byte_by_byte_request_is_answered(start_server):
    srv = start_server()
    with connect(srv.port) as s:
        for byte in b"REQ 1 ":
            s.send(bytes([byte]))
        s.settimeout(0.2)
        with pytest.raises(socket.timeout):
            s.recv(1)  # nothing is answered before the newline, so the line did arrive in pieces
        s.settimeout(5)
        for byte in b"x\nREQ +5 x\n":
            s.send(bytes([byte]))
        assert read_lines(s, 2) == EXAMPLE + answer_for(b"REQ 5 x")


def test_pipelined_answers_in_order_and_errdecode_keeps_open(start_server):
    srv = start_server()
    lines = [b"REQ %d d%d" % (i, i) for i in range(1, 200)] + [b"REQ 1 x y", b"REQ 7 q\r"]
    with connect(srv.port) as s:
        s.sendall(b"".join(line + b"\n" for line in lines))
        assert read_lines(s, len(lines)) == b"".join(answer_for(line) for line in lines)
        s.sendall(b"REQ 1 x\n")
        assert read_lines(s, 1) == EXAMPLE


def test_longest_line_answered_longer_ends_the_answers_but_not_the_connection(start_server):
    srv = start_server()
    fits = b"REQ 1 " + b"a" * 65529 + b"\n"
    assert len(fits) == 65536
    with connect(srv.port) as s:
        s.sendall(fits)
        assert read_lines(s, 1) == answer_for(fits)
    with connect(srv.port) as s:
        s.sendall(b"REQ 1 x\nREQ 2 " + b"a" * 70000 + b"\nREQ 3 y\n")
        assert read_lines(s, 1) == EXAMPLE  # the line before it is answered
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recv(1)  # then nothing, and no EOF: the server holds the socket, as server-linux does
        log = srv.stderr()
        assert "127.0.0.1:%d: disconnected (" % s.getsockname()[1] in log, log  # at once, the socket still held


def test_eof_answers_pending_then_never_closes(start_server):
    srv = start_server()
    with connect(srv.port) as s:
        s.sendall(b"REQ 1 x\nREQ 2 y\n")
        s.shutdown(socket.SHUT_WR)
        assert read_lines(s, 2) == EXAMPLE + answer_for(b"REQ 2 y")
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(1)  # no EOF from the server (as the reference)


def test_eof_answers_pending_then_closes_with_option(start_server):
    srv = start_server("-close-on-eof")
    with connect(srv.port) as s:
        s.sendall(b"REQ 1 x\nREQ 2 y\n")
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            buf += data
        assert buf == EXAMPLE + answer_for(b"REQ 2 y")


def test_dual_stack_on_empty_host(start_server):
    srv = start_server()
    with connect(srv.port, "127.0.0.1") as s:
        s.sendall(b"REQ 1 x\n")
        assert read_lines(s, 1) == EXAMPLE
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        s6 = connect(srv.port, "::1")
    except OSError:
        pytest.skip("IPv6 loopback unavailable")
    with s6:
        s6.sendall(b"REQ 1 x\n")
        assert read_lines(s6, 1) == EXAMPLE
    assert "[::1]:" in srv.stderr()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_it_promptly_by_that_signal_with_open_connections(start_server, sig):
    srv = start_server()
    with connect(srv.port) as held, connect(srv.port) as parked:
        parked.sendall(b"REQ 1 x\n")
        parked.shutdown(socket.SHUT_WR)
        assert read_lines(parked, 1) == EXAMPLE
        held.sendall(b"REQ 2 y\n")
        read_lines(held, 1)
        srv.proc.send_signal(sig)
        assert srv.proc.wait(timeout=5) == -sig  # as server-linux, which does not catch it


def test_bad_flag_exits_2():
    res = subprocess.run(
        [sys.executable, "-m", "harness.peers.server", "-nope"], cwd=ROOT, env=ENV, capture_output=True, timeout=30
    )
    assert res.returncode == 2 and b"unknown flag -nope" in res.stderr


def test_port_in_use_exits_1(start_server):
    srv = start_server()
    res = subprocess.run(
        [sys.executable, "-m", "harness.peers.server", "-listen", ":%d" % srv.port],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert re.fullmatch(
        rb"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d listen tcp :%d: bind: address already in use\n" % srv.port, res.stderr
    )


# --- in-process: parking and reaping -------------------------------------------


@pytest.fixture
def inproc():
    servers: list[FooServer] = []

    def make(**kw) -> FooServer:
        kw.setdefault("quiet", True)
        srv = FooServer(make_listener(Address("127.0.0.1", 0)), **kw)
        srv.start()
        servers.append(srv)
        return srv

    try:
        yield make
    finally:
        for srv in servers:
            srv.stop(timeout=0)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    with gevent.Timeout(timeout, False):
        while not predicate():
            gevent.sleep(0.005)
        return True
    return predicate()


def gread(sock, n: int) -> bytes:
    buf = b""
    while buf.count(b"\n") < n:
        data = sock.recv(65536)
        assert data
        buf += data
    return buf


def test_parked_connection_released_on_reset_and_on_stop(inproc):
    srv = inproc(reap_interval=0.02)
    a = gsocket.create_connection(("127.0.0.1", srv.server_port), timeout=5)
    b = gsocket.create_connection(("127.0.0.1", srv.server_port), timeout=5)
    for s in (a, b):
        s.sendall(b"REQ 1 x\n")
        s.shutdown(gsocket.SHUT_WR)
    assert gread(b, 1) == EXAMPLE
    assert wait_until(lambda: srv.parked == 2)
    assert wait_until(lambda: a.recv(1, socket.MSG_PEEK) == b"A")  # answer queued, unread
    a.close()  # closing with unread data resets the connection
    assert wait_until(lambda: srv.parked == 1)
    assert len(srv.pool) == 1
    srv.stop(timeout=0)
    assert wait_until(lambda: srv.parked == 0 and len(srv.pool) == 0)
    b.settimeout(2)
    assert b.recv(1) == b""  # stop() closes what was held open
    b.close()


def test_in_process_client_and_server(inproc):
    srv = inproc()
    opts = ClientOptions(address=Address("127.0.0.1", srv.server_port), requests=500, window=32, conns=3, quiet=True)
    result = run(opts)
    assert result.ok and result.answers == 1500
    liar = inproc(lie=True)
    result = run(ClientOptions(address=Address("127.0.0.1", liar.server_port), quiet=True))
    assert not result.ok and result.errors == ["validating response: corrupted data"]


def test_client_times_out_on_a_silent_server(inproc):
    srv = gsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts (in the backlog) but never answers
    try:
        result = run(ClientOptions(address=Address("127.0.0.1", srv.getsockname()[1]), timeout=0.2, quiet=True))
        local = "127.0.0.1:\\d+"
        assert re.fullmatch(r"decoding response: read tcp %s->%s: i/o timeout" % (local, local), result.errors[0])
    finally:
        srv.close()


def test_client_fails_when_the_server_closes_early(inproc):
    def answer_one_then_close(sock, _addr):
        buf = b""
        while b"\n" not in buf:
            buf += sock.recv(100)
        sock.sendall(answer_for(buf.split(b"\n")[0]))

    srv = StreamServer(("127.0.0.1", 0), answer_one_then_close)
    srv.start()
    try:
        result = run(ClientOptions(address=Address("127.0.0.1", srv.server_port), quiet=True))
        assert result.answers == 1 and not result.ok
        # Whichever side notices first: the EOF (Go's decoder then reads Seq 0), or the next write's error.
        (reason,) = result.errors
        assert reason == "validating response: unexpected seq no" or re.fullmatch(
            r"encoding request: write tcp [\d.:]+->[\d.:]+: write: (broken pipe|connection reset by peer)", reason
        ), reason
    finally:
        srv.stop(timeout=0)

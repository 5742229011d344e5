"""Real signals to the fooproxy process: SIGUSR2 stats lines, SIGTERM/SIGINT drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from harness import tasks
from harness.binaries import fooproxy_command
from harness.peers.answer import answer
from harness.processes import wait_for_port
from harness.sigusr2 import next_line, parse_stats
from tests.e2e.helpers import connect, recv_lines, recv_until_eof

pytestmark = pytest.mark.e2e
CHECK_TRACEBACKS = True  # see conftest.procs


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_exits_0(proxy: tasks.Service, sig: int) -> None:
    started = time.monotonic()
    proxy.send_signal(sig)
    rc = proxy.wait(timeout=10)
    assert rc == 0, proxy.tail()
    assert time.monotonic() - started < 5, "idle proxy took %.1fs to stop" % (time.monotonic() - started)


def test_session_open_during_sigterm_is_allowed_to_finish(procs, server: tasks.Service) -> None:
    proxy = procs.proxy(server.address, "-grace", "20")
    host, port = tasks.split_address(proxy.address)
    with connect(proxy.address) as sock:
        sock.sendall(b"REQ 1 first\n")
        assert recv_lines(sock, 1) == [answer(b"REQ", 1, b"first")]
        proxy.send_signal(signal.SIGTERM)
        proxy.wait_for_output(r"draining 1 open session", timeout=5)
        # No new clients while draining ...
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=2).close()
        # ... but the open session goes on.
        sock.sendall(b"REQ 2 second\n")
        assert recv_lines(sock, 1) == [answer(b"REQ", 2, b"second")]
        assert proxy.alive(), proxy.tail()
        sock.shutdown(socket.SHUT_WR)
        closed_at = time.monotonic()
        assert recv_until_eof(sock, timeout=10) == b""
    rc = proxy.wait(timeout=10)
    assert rc == 0, proxy.tail()
    assert time.monotonic() - closed_at < 5, "the drain did not end when the last session did"


def test_session_still_open_after_grace_is_closed(procs, server: tasks.Service) -> None:
    proxy = procs.proxy(server.address, "-grace", "1")
    with connect(proxy.address) as sock:
        sock.sendall(b"REQ 1 x\n")
        assert recv_lines(sock, 1) == [answer(b"REQ", 1, b"x")]
        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        rc = proxy.wait(timeout=10)
        took = time.monotonic() - started
        assert rc == 0, proxy.tail()
        assert 0.8 <= took < 5, "stopped after %.2fs with -grace 1" % took
        try:
            assert recv_until_eof(sock, timeout=5) == b""
        except ConnectionResetError:
            pass


def test_second_sigterm_exits_at_once(procs, server: tasks.Service) -> None:
    proxy = procs.proxy(server.address, "-grace", "60")
    with connect(proxy.address) as sock:
        sock.sendall(b"REQ 1 x\n")
        recv_lines(sock, 1)
        proxy.send_signal(signal.SIGTERM)
        proxy.wait_for_output(r"draining 1 open session", timeout=5)
        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=5)
        assert time.monotonic() - started < 3


def test_100_sequential_sigusr2_give_100_json_lines(proxy: tasks.Service, peers) -> None:
    assert tasks.run_client(proxy.address, peers=peers).ok
    for i in range(100):
        stats = tasks.signal_stats(proxy, timeout=5)
        assert stats["msg_req"] == 100, (i, stats)
    lines = proxy.stdout_text().splitlines()
    assert len(lines) == 100, proxy.tail()
    for line in lines:
        assert isinstance(json.loads(line), dict)
    assert proxy.alive()


def test_a_burst_of_100_sigusr2_does_not_kill_the_proxy(proxy: tasks.Service, peers) -> None:
    for _ in range(100):
        os.kill(proxy.pid, signal.SIGUSR2)
    # Pending signals coalesce: at least one line, not necessarily 100.
    parse_stats(next_line(proxy, timeout=5))
    assert proxy.alive(), proxy.tail()
    assert tasks.run_client(proxy.address, peers=peers).ok
    # A line answering the burst may still land after this read starts: read again until current.
    for _ in range(5):
        stats = tasks.signal_stats(proxy)
        if stats["msg_req"] == 100:
            break
    assert stats["msg_req"] == 100, stats
    text = proxy.stdout_text()
    assert text.endswith("\n")
    for line in text.splitlines():
        parse_stats(line)
    rc = proxy.stop()
    assert rc == 0, proxy.tail()


def test_sigusr2_with_a_closed_stdout_pipe_does_not_kill_the_proxy(procs, server: tasks.Service) -> None:
    """A stats reader that went away (``fooproxy | head -1``) must not take the proxy down."""
    procs.allow_tracebacks = True
    listen = tasks.local_address()
    cmd = [*fooproxy_command(), "-listen", listen, "-forward", server.address, "-http", "off", "-recovery-path", "off"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=tasks.proxy_env(),
        start_new_session=True,
    )
    try:
        wait_for_port(*tasks.split_address(listen), timeout=30, alive=lambda: proc.poll() is None)
        os.kill(proc.pid, signal.SIGUSR2)
        assert json.loads(proc.stdout.readline())["msg_req"] == 0
        proc.stdout.close()  # the reader goes away
        os.kill(proc.pid, signal.SIGUSR2)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)  # still running a second later
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

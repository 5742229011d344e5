"""Hostile recovery files, as an attacker or a careless operator leaves them, against the real ``fooproxy``.

Each test starts real processes: a Foo server, fooproxy with ``-recovery-path``
pointing at the planted thing, and checks what a user would see: the proxy
starts, answers, counts, says what is wrong, and touches nothing that is not
its own file.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from harness import tasks
from harness.binaries import fooproxy_command
from harness.sigusr2 import read_stats
from tests.faults import running
from tests.faults.running import http_get, poll
from tests.helpers import connect, recv_lines

pytestmark = pytest.mark.e2e
INT64_MAX = (1 << 63) - 1


@pytest.fixture
def procs(tmp_path) -> Iterator[running.Running]:
    yield from running.processes(tmp_path)


def recovery_doc(**changes) -> dict:
    """A file as a proxy writes it (saved now), with ``changes``."""
    import time

    doc = {
        "format": "fooproxy-recovery",
        "version": 1,
        "saved_at": time.time(),
        "bucket_s": 0.01,
        "totals": {"msg_req": 5, "msg_ack": 5},
        "buckets": [[0, 1, 1]],
    }
    doc.update(changes)
    return doc


def one_request(proxy: tasks.Service) -> bytes:
    """Send one REQ through the proxy and return the answer line."""
    with connect(proxy.address, timeout=5) as sock:
        sock.sendall(b"REQ 1 hello\n")
        [answer] = recv_lines(sock, 1, timeout=5)
    return answer


@pytest.mark.parametrize(
    "changes",
    [
        {"totals": {"msg_req": INT64_MAX, "msg_ack": 5}},  # was: every later REQ crashed its session
        {"totals": {"msg_req": INT64_MAX, "msg_ack": 5}, "buckets": [[0, INT64_MAX, 1]]},  # was: crash at start
        {"totals": {"msg_req": 5, "msg_ack": 5}, "buckets": [[0, 6, 0]]},  # more in the window than in total
        {"totals": {"msg_req": -1}},
        {"totals": {"msg_req": 1.0}},
        {"buckets": [[-1, 1, 0]]},  # a bucket from the future
    ],
    ids=["counter-int64-max", "bucket-int64-max", "bucket-over-total", "negative", "float", "future-bucket"],
)
def test_impossible_values_are_set_aside_and_the_proxy_counts_from_zero(procs, tmp_path, changes):
    path = tmp_path / "recovery.json"
    content = json.dumps(recovery_doc(**changes))
    path.write_text(content)
    server = procs.server()
    proxy = procs.proxy(server.address, recovery_path=str(path))
    assert one_request(proxy).startswith((b"ACK 1", b"NAK 1"))
    stats = read_stats(proxy)
    assert stats["msg_req"] == 1 and stats["msg_ack"] + stats["msg_nak"] == 1, stats
    [aside] = tmp_path.glob("recovery.json.corrupt-*")
    assert aside.read_text() == content
    assert "recovery.json" in proxy.stderr_text() and "moved to" in proxy.stderr_text()
    assert "Traceback" not in proxy.stderr_text()


def test_a_symlink_planted_at_the_temporary_name_is_never_written_through(procs, tmp_path):
    path = tmp_path / "recovery.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("the attacker wants this overwritten")
    server = procs.server()
    proxy = procs.proxy(server.address, recovery_path=str(path))
    # The old code wrote every save to .<name>.<pid>.tmp with O_TRUNC, following symlinks.
    (tmp_path / (".recovery.json.%d.tmp" % proxy.pid)).symlink_to(victim)
    one_request(proxy)

    def saved_the_request() -> bool:
        try:
            return json.loads(path.read_text())["totals"]["msg_req"] == 1
        except (OSError, ValueError, KeyError):
            return False

    assert poll(saved_the_request, timeout=10)
    assert proxy.stop() == 0
    assert victim.read_text() == "the attacker wants this overwritten"
    assert not path.is_symlink()
    assert json.loads(path.read_text())["totals"]["msg_req"] == 1


def test_a_directory_at_the_path_is_left_alone_and_health_says_degraded(procs, tmp_path):
    path = tmp_path / "recovery.json"
    path.mkdir()
    (path / "operator-data").write_text("keep me")
    server = procs.server()
    http = tasks.local_address()
    proxy = procs.proxy(server.address, recovery_path=str(path), http=http)
    status, body = http_get(http, "/health")
    assert status == 200 and body["status"] == "degraded", body
    assert "directory" in body["persistence"], body
    assert one_request(proxy).startswith((b"ACK 1", b"NAK 1"))  # still serving
    assert proxy.stop() == 0  # the final save fails too, the exit is clean
    assert (path / "operator-data").read_text() == "keep me"
    assert not list(tmp_path.glob("recovery.json.corrupt-*"))
    assert "Traceback" not in proxy.stderr_text()


@pytest.mark.parametrize("first_args", [(), ("-workers", "2")], ids=["single", "workers-master"])
def test_a_second_instance_on_a_locked_file_refuses_to_start(procs, tmp_path, first_args):
    path = tmp_path / "recovery.json"
    server = procs.server()
    first = procs.proxy(server.address, *first_args, recovery_path=str(path), ready_timeout=60)
    one_request(first)
    second = subprocess.run(
        [
            *fooproxy_command(),
            "-listen",
            tasks.local_address(),
            "-forward",
            server.address,
            "-http",
            "off",
            "-recovery-path",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=tasks.proxy_env(),
        stdin=subprocess.DEVNULL,
    )
    assert second.returncode == 1, second
    lines = second.stderr.splitlines()
    assert len(lines) == 1, second.stderr
    assert str(path) in lines[0] and "in use" in lines[0] and "pid %d" % first.pid in lines[0], lines[0]
    # The first instance is untouched: it goes on serving and saving its own counts.
    assert one_request(first).startswith((b"ACK 1", b"NAK 1"))
    assert first.stop() == 0
    assert json.loads(path.read_text())["totals"]["msg_req"] == 2


def test_the_lock_goes_with_a_killed_instance(procs, tmp_path):
    path = tmp_path / "recovery.json"
    server = procs.server()
    first = procs.proxy(server.address, recovery_path=str(path))
    first.send_signal(9)
    first.wait(timeout=10)
    again = procs.proxy(server.address, recovery_path=str(path))
    assert one_request(again).startswith((b"ACK 1", b"NAK 1"))
    assert os.path.exists(str(path) + ".lock")


def test_a_fifo_at_the_path_neither_blocks_nor_is_replaced(procs, tmp_path):
    path = tmp_path / "recovery.json"
    os.mkfifo(path)
    server = procs.server()
    http = tasks.local_address()
    proxy = procs.proxy(server.address, recovery_path=str(path), http=http)
    status, body = http_get(http, "/health")
    assert status == 200 and body["status"] == "degraded" and "FIFO" in body["persistence"], body
    assert one_request(proxy).startswith((b"ACK 1", b"NAK 1"))
    assert proxy.stop() == 0
    assert os.path.exists(path) and not os.path.isfile(path)

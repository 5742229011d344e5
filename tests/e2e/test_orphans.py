"""``-workers N`` and a master killed with -9: its orphaned workers' traffic is counted (issue 16).

Real processes and signals: a master is SIGKILLed while clients hold open
sessions; its workers drain them (they keep answering for ``-grace``) and
count into the table file beside the recovery file; a restarted master adopts
that table, and the totals end equal to what the clients sent and got.
"""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from harness import sigusr2, tasks
from harness.processes import port_accepts
from tests.e2e.test_workers import running, start_proxy, waited, workers_of

pytestmark = pytest.mark.e2e

SESSIONS = 4


class Session:
    """One client connection that sends REQs and checks each answer's Seq."""

    def __init__(self, address: str) -> None:
        self.sock = socket.create_connection(tasks.split_address(address), timeout=10)
        self.reader = self.sock.makefile("rb")
        self.seq = 0

    def exchange(self, count: int) -> int:
        first = self.seq + 1
        self.seq += count
        self.sock.sendall(b"".join(b"REQ %d x\n" % s for s in range(first, self.seq + 1)))
        for s in range(first, self.seq + 1):
            line = self.reader.readline()
            assert line.startswith((b"ACK %d " % s, b"NAK %d " % s)), (s, line)
        return count

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def test_orphaned_workers_traffic_is_adopted_by_the_restarted_master(procs, server, tmp_path) -> None:
    path = str(tmp_path / "recovery.json")
    first = start_proxy(procs, server, "-grace", "60", recovery_path=path)
    listen = first.address
    sessions = [Session(listen) for _ in range(SESSIONS)]
    sent = sum(s.exchange(5) for s in sessions)
    orphans = workers_of(first)
    os.kill(first.pid, signal.SIGKILL)
    waited(lambda: not running(first.pid), 10, "the master to die")
    # The orphans drain: they still answer the open sessions, and nobody reads their counts yet.
    sent += sum(s.exchange(10) for s in sessions)
    waited(
        lambda: not port_accepts(*tasks.split_address(listen), timeout=1),
        15,
        "the orphans to close the listening sockets",
    )
    second = start_proxy(procs, server, "-grace", "60", listen=listen, recovery_path=path)
    log = second.stderr_text()
    assert "adopted the stats table" in log and "orphaned workers still draining" in log, log
    sent += sum(s.exchange(3) for s in sessions)  # the orphans, after the new master started
    for s in sessions:
        s.close()
    # New sessions through the new master's workers.
    extra = [Session(listen) for _ in range(3)]
    sent += sum(s.exchange(2) for s in extra)
    for s in extra:
        s.close()
    waited(lambda: not any(running(p) for p in orphans), 30, "the orphans to finish draining")
    stats = sigusr2.read_stats_when_idle(second)
    assert stats["msg_req"] == sent, (stats, sent)
    assert stats["msg_ack"] + stats["msg_nak"] == sent, stats
    assert stats["connections_total"] == SESSIONS + len(extra), stats
    assert stats["connections_active"] == 0, stats
    # Each orphan that was still draining when the master started (the others were gone by then) is seen to end.
    adopted = re.search(r"still draining, counted as they finish: pids ([\d ]+)", log).group(1).split()
    waited(lambda: second.stderr_text().count("orphaned worker (pid") == len(adopted), 10, "the orphans' exit lines")
    # A clean stop saves everything to the recovery file and leaves no table to adopt.
    assert second.stop() == 0, second.tail()
    assert not os.path.exists(path + ".slots")
    third = start_proxy(procs, server, listen=listen, recovery_path=path)
    assert tasks.signal_stats(third)["msg_req"] == sent
    assert "adopted" not in third.stderr_text()


def test_a_table_file_that_cannot_be_trusted_is_replaced_with_a_warning(procs, server, tmp_path) -> None:
    path = str(tmp_path / "recovery.json")
    first = start_proxy(procs, server, recovery_path=path)
    session = Session(first.address)
    sent = session.exchange(7)
    session.close()
    sigusr2.read_stats_when_idle(first)
    assert first.stop() == 0, first.tail()
    slots = path + ".slots"
    for planted in (b"\x00" * 4096, b"\xff" * os.path.getsize(path)):  # wrong size; garbage
        with open(slots, "wb") as handle:
            handle.write(planted)
        proxy = start_proxy(procs, server, recovery_path=path)
        assert "%s: not a table" % slots in proxy.stderr_text(), proxy.tail()
        assert tasks.signal_stats(proxy)["msg_req"] == sent  # from the recovery file, once
        assert proxy.stop() == 0

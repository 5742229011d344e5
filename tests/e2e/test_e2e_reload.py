"""SIGHUP reloads a running fooproxy: nothing refused, nothing cut, the counts exact.

Real processes and real signals: two Foo servers, fooproxy started with
``-config FILE`` (a single process, and ``-workers 2``, where a reload is a
new generation of worker processes), client loops running the whole time
while the test rewrites the file and sends SIGHUP.
"""

from __future__ import annotations

import signal
import socket

import pytest

from harness import sigusr2, tasks
from harness.binaries import fooproxy_command
from harness.processes import port_accepts
from tests.e2e.reloading import ClientLoop, reload_lines, sessions_after, sighup_and_wait, write_config
from tests.faults import running

pytestmark = pytest.mark.e2e

RELOADS = 10
#: Without workers, and with 2 (a rolling reload: new worker processes each time).
WORKERS = pytest.mark.parametrize("workers", ["1", "2"])
#: Three Python processes start before a master is ready: slow on a loaded 2-core machine.
READY_TIMEOUT = 60


@pytest.fixture
def procs(tmp_path):
    yield from running.processes(tmp_path)


def start(procs, path, *args):
    proxy = procs.command([*fooproxy_command(), "-config", str(path), *args])
    proxy.wait_for_output("listening on", timeout=READY_TIMEOUT)
    return proxy


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (a master's workers)."""
    try:
        return sorted(int(p) for p in open("/proc/%d/task/%d/children" % (pid, pid)).read().split())
    except FileNotFoundError:
        return []


def one_session(address: str) -> bytes:
    with socket.create_connection(tasks.split_address(address), timeout=5) as sock:
        sock.sendall(b"REQ 7 abc\n")
        return sock.makefile("rb").readline()


@WORKERS
def test_ten_reloads_under_load_drop_nothing(procs, tmp_path, workers):
    a, b = procs.server(), procs.server()
    listen = tasks.local_address()
    path = tmp_path / "fooproxy.toml"
    base = dict(listen=listen, http="off", recovery_path="off", workers=int(workers))
    write_config(path, forward=a.address, **base)
    proxy = start(procs, path)
    pids = children(proxy.pid)
    loops = [ClientLoop(listen, "loop%d" % i) for i in range(2)]
    for loop in loops:
        loop.start()
    lines = []
    for i in range(RELOADS):
        # Each reload moves new sessions to the other server and changes limits and timeouts.
        write_config(
            path,
            forward=(b if i % 2 == 0 else a).address,
            max_conns=100 + i,
            linger=2 + i,
            idle_timeout=60 + i,
            connect_timeout=1 + i / 10,
            pool_size=(0, 4)[i % 3 == 1],
            **base,
        )
        lines.append(sighup_and_wait(proxy, timeout=READY_TIMEOUT))
        if workers != "1":  # a new generation each time: new processes (new code), the old ones gone
            now = children(proxy.pid)
            assert len(now) == int(workers) and not set(now) & set(pids), (pids, now, lines[-1])
            assert "workers " in lines[-1], lines[-1]
            pids = now
        # Let every loop finish a few sessions on the new settings before the next reload.
        assert running.poll(sessions_after(loops, 3), timeout=20)
    counts = [loop.stop() for loop in loops]
    print("\nreload lines:\n" + "\n".join(lines))
    attempted = sum(c.attempted for c in counts)
    refused = sum(c.refused for c in counts)
    cut = sum(c.cut for c in counts)
    wrong = sum(c.wrong for c in counts)
    print("workers %s, reloads %d: connections attempted %d, refused %d, sessions cut %d, wrong answers %d"
          % (workers, RELOADS, attempted, refused, cut, wrong))  # fmt: skip
    assert all("reload: " in line and "forward" in line for line in lines), lines
    errors = [e for c in counts for e in c.errors]
    assert (refused, cut, wrong) == (0, 0, 0), errors[:10]
    assert attempted >= 20, "the loops did not run during the reloads"
    # The clients have closed; the proxy may still be ending the last sessions (a worker's accounting).
    stats = sigusr2.read_stats_when_idle(proxy)
    sessions = sum(c.sessions for c in counts)
    requests = sum(c.requests for c in counts)
    assert stats["connections_total"] == sessions
    assert stats["connections_active"] == 0
    assert stats["msg_req"] == requests
    assert stats["msg_ack"] + stats["msg_nak"] == requests
    assert stats["upstream_errors"] == 0


def test_open_session_keeps_its_upstream_new_ones_use_the_new(procs, tmp_path):
    a, b = procs.server(), procs.server()
    listen = tasks.local_address()
    path = tmp_path / "fooproxy.toml"
    write_config(path, listen=listen, forward=a.address, http="off", recovery_path="off")
    proxy = start(procs, path)
    old = socket.create_connection(tasks.split_address(listen), timeout=5)
    old.sendall(b"REQ 1 x\n")
    reader = old.makefile("rb")
    assert reader.readline().startswith((b"ACK 1 ", b"NAK 1 "))
    write_config(path, listen=listen, forward=b.address, http="off", recovery_path="off")
    assert "forward %s -> %s" % (a.address, b.address) in sighup_and_wait(proxy)
    old.sendall(b"REQ 2 x\n")  # still on a
    assert reader.readline().startswith((b"ACK 2 ", b"NAK 2 "))
    a.stop()  # only the old session used a: it ends, new sessions do not care
    assert reader.readline() == b""
    old.close()
    assert one_session(listen).startswith((b"ACK 7 ", b"NAK 7 "))


@WORKERS
def test_bad_config_on_reload_changes_nothing(procs, tmp_path, workers):
    server = procs.server()
    listen = tasks.local_address()
    path = tmp_path / "fooproxy.toml"
    write_config(path, listen=listen, forward=server.address, http="off", recovery_path="off", max_conns=50)
    proxy = start(procs, path, "-workers", workers)
    pids = children(proxy.pid)
    dead = tasks.local_address()  # nobody listens there
    # A new upstream that would break every session, plus one bad value: the whole file is refused.
    path.write_text('listen = "%s"\nforward = "%s"\nhttp = "off"\nrecovery-path = "off"\ngrace = "soon"\n'
                    % (listen, dead))  # fmt: skip
    line = sighup_and_wait(proxy, timeout=READY_TIMEOUT)
    assert "reload rejected" in line and str(path) in line and "line 5: key grace" in line, line
    for _ in range(3):
        assert one_session(listen).startswith((b"ACK 7 ", b"NAK 7 "))
    path.write_text("max-conns = [\n")  # not even TOML
    line = sighup_and_wait(proxy)
    assert "reload rejected" in line and "not valid TOML" in line, line
    assert one_session(listen).startswith((b"ACK 7 ", b"NAK 7 "))
    path.unlink()  # gone
    assert "cannot read" in sighup_and_wait(proxy)
    assert one_session(listen).startswith((b"ACK 7 ", b"NAK 7 "))
    assert tasks.signal_stats(proxy)["upstream_errors"] == 0
    assert proxy.alive()
    assert children(proxy.pid) == pids  # with workers: no new generation was started


def test_listen_change_is_refused_by_name_http_moves(procs, tmp_path):
    server = procs.server()
    listen, http1, http2 = tasks.local_address(), tasks.local_address(), tasks.local_address()
    path = tmp_path / "fooproxy.toml"
    write_config(path, listen=listen, forward=server.address, http=http1, recovery_path="off")
    proxy = start(procs, path)
    assert running.http_get(http1, "/health")[0] == 200
    moved = tasks.local_address()
    write_config(path, listen=moved, forward=server.address, http=http2, recovery_path="off")
    line = sighup_and_wait(proxy)
    assert "listen refused" in line and "http %s -> %s" % (http1, http2) in line, line
    assert running.http_get(http2, "/health")[0] == 200
    assert running.poll(lambda: not port_accepts(*tasks.split_address(http1), timeout=1), timeout=5)
    assert one_session(listen).startswith((b"ACK 7 ", b"NAK 7 "))
    assert not port_accepts(*tasks.split_address(moved), timeout=1)


@WORKERS
def test_sighup_burst_coalesces_and_never_overlaps(procs, tmp_path, workers):
    server = procs.server()
    listen = tasks.local_address()
    path = tmp_path / "fooproxy.toml"
    write_config(path, listen=listen, forward=server.address, http="off", recovery_path="off")
    proxy = start(procs, path, "-workers", workers)
    write_config(path, listen=listen, forward=server.address, http="off", recovery_path="off", max_conns=9)
    for _ in range(20):
        proxy.send_signal(signal.SIGHUP)
    assert running.poll(lambda: len(reload_lines(proxy)) >= 1, timeout=READY_TIMEOUT)
    # One more after the burst: the burst's runs have all finished.
    line = sighup_and_wait(proxy, timeout=3 * READY_TIMEOUT)
    lines = reload_lines(proxy)
    assert 2 <= len(lines) <= 21, lines
    assert "max-conns 10000 -> 9" in lines[0], lines
    assert all("max-conns" not in x and "rejected" not in x for x in lines[1:]), lines
    if workers == "1":
        assert all("nothing changed" in x for x in lines[1:]), lines
        assert "nothing changed" in line
    else:  # never two reloads at once: never more than one generation beside the running one
        assert len(children(proxy.pid)) <= 2 * int(workers)
        # The last reload's old generation exits once drained; the master reaps it just after.
        assert running.poll(lambda: len(children(proxy.pid)) == int(workers), timeout=10), children(proxy.pid)
    assert "reload failed" not in proxy.stderr_text()
    assert one_session(listen).startswith((b"ACK 7 ", b"NAK 7 "))


def test_clients_waiting_in_the_backlog_during_a_rolling_reload_are_served(procs, tmp_path):
    """The listen queues outlive the old generation: clients queued behind -max-conns get the new workers.

    Each old worker is full (``max-conns 1``, its one client holding its
    session), so the other clients wait in the kernel's accept queues. A
    design where the old workers' sockets close on drain resets them; here
    the new generation accepts them from the same queues.
    """
    server = procs.server()
    listen = tasks.local_address()
    path = tmp_path / "fooproxy.toml"
    base = dict(listen=listen, forward=server.address, http="off", recovery_path="off", workers=2, grace=30)
    write_config(path, max_conns=1, **base)
    proxy = start(procs, path)
    clients = []
    for seq in range(6):
        sock = socket.create_connection(tasks.split_address(listen), timeout=10)  # queued: the handshake is done
        sock.sendall(b"REQ %d x\n" % seq)
        clients.append((seq, sock, sock.makefile("rb")))
    served = []

    def settled() -> bool:  # every worker with a client is full; the rest of the clients are queued
        for item in clients:
            if item not in served and _readable(item[1]):
                served.append(item)
        return bool(served) and tasks.signal_stats(proxy)["connections_active"] == len(served)

    assert running.poll(settled, timeout=20)
    waiting = [item for item in clients if item not in served]
    assert len(waiting) >= 4
    for seq, _sock, reader in served:
        assert reader.readline().startswith((b"ACK %d " % seq, b"NAK %d " % seq))
    write_config(path, max_conns=100, **base)
    proxy.send_signal(signal.SIGHUP)
    for seq, _sock, reader in waiting:  # answered by the new generation, while the old one still drains
        assert reader.readline().startswith((b"ACK %d " % seq, b"NAK %d " % seq)), "client %d" % seq
    for _seq, sock, reader in clients:
        reader.close()  # the file holds the socket open until it is closed too
        sock.close()
    assert running.poll(lambda: any("max-conns 1 -> 100" in x for x in reload_lines(proxy)), timeout=READY_TIMEOUT)
    stats = sigusr2.read_stats_when_idle(proxy)
    assert (stats["connections_total"], stats["msg_req"], stats["connections_active"]) == (6, 6, 0), stats


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])

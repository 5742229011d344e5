"""``-workers N``: a master and N worker processes as real processes, real signals.

Readiness comes from log lines (the master says "listening on" once every
worker accepts; it says "worker N (pid P) ready" for each replacement), never
from fixed sleeps; everything is stopped by PID (process group) at teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from harness import tasks
from harness.binaries import fooproxy_command
from harness.processes import free_port
from tests.helpers import connect, recv_lines, recv_until_eof, wait_until

pytestmark = pytest.mark.e2e

WORKERS = ("-workers", "2")
#: Three Python processes start before "listening on": slow on a loaded 2-core machine.
READY_TIMEOUT = 60.0
READY_AGAIN = r"worker (\d+) \(pid (\d+)\) ready"


@pytest.fixture
def server(procs, peers) -> tasks.Service:
    """A Foo server of the suite's kind on a free port."""
    return procs.server(peers)


def start_proxy(procs, server: tasks.Service, *args: str, **kwargs) -> tasks.Service:
    """fooproxy ``-workers 2`` in front of ``server``, ready once the master says "listening on"."""
    kwargs.setdefault("ready_timeout", READY_TIMEOUT)
    proxy = procs.proxy(server.address, *WORKERS, *args, **kwargs)
    # The port listens once the first worker does; the master's line means all of them.
    proxy.wait_for_output(tasks.PROXY_READY, kwargs["ready_timeout"], "stderr")
    return proxy


# -- helpers -----------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (for the master: its workers)."""
    try:
        text = Path("/proc/%d/task/%d/children" % (pid, pid)).read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def waited(predicate, timeout: float, what: str, interval: float = 0.02):
    """``wait_until``, failing with ``what`` at the deadline; returns what ``predicate`` found."""
    value = wait_until(predicate, timeout, interval)
    assert value, "timed out after %gs waiting for %s" % (timeout, what)
    return value


def workers_of(proxy: tasks.Service, count: int = 2) -> list[int]:
    """The master's worker PIDs, once there are ``count`` of them."""
    return waited(lambda: (lambda c: c if len(c) == count else None)(children(proxy.pid)), 10, "workers")


def sockets_of(pid: int) -> int:
    """How many sockets ``pid`` holds (its listener plus two per session)."""
    fd_dir = Path("/proc/%d/fd" % pid)
    count = 0
    for fd in fd_dir.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


def pids_that_served(proxy: tasks.Service) -> set[int]:
    """PIDs that logged a finished session."""
    return {int(m) for m in re.findall(r"fooproxy\.proxy\[(\d+)\]: .* closed", proxy.stderr_text())}


def assert_exact(stats: dict, runs: int, requests: int = tasks.REQUESTS_PER_RUN) -> None:
    problems = tasks.check_counts(stats, runs, requests)
    assert not problems, "%s\n%s" % ("\n".join(problems), stats)


def delta(after: dict, before: dict, key: str) -> int:
    return after[key] - before[key]


# -- tests -------------------------------------------------------------------------------------
def test_100_parallel_runs_through_2_workers_give_exact_totals(procs, server: tasks.Service, peers) -> None:
    http = "127.0.0.1:%d" % free_port()
    proxy = start_proxy(procs, server, http=http)
    assert len(workers_of(proxy)) == 2
    results = tasks.run_clients_parallel(proxy.address, 100, concurrency=50, peers=peers)
    failed = tasks.failures(results)
    assert not failed, "%d of 100 runs failed; first:\n%s" % (len(failed), failed[0].describe())
    stats = tasks.signal_stats(proxy)
    assert_exact(stats, runs=100)
    assert stats["connections_total"] == 100 and stats["connections_active"] == 0, stats
    # The same summed view over HTTP.
    with urllib.request.urlopen("http://%s/stats" % http, timeout=5) as resp:
        over_http = json.load(resp)
    assert {k: over_http[k] for k in ("msg_req", "msg_ack", "msg_nak")} == {
        k: stats[k] for k in ("msg_req", "msg_ack", "msg_nak")
    }
    # Both workers served: the totals above are a sum, not one worker's share.
    assert len(pids_that_served(proxy) & set(children(proxy.pid))) == 2, proxy.tail(60)
    assert proxy.stdout_text().count("\n") == 1, "workers must print nothing on stdout"


def test_rates_over_workers_are_the_sum_of_the_workers_rates(procs, server: tasks.Service, py_peers) -> None:
    proxy = start_proxy(procs, server)
    # One client process, 20 connections: spread over both workers, done in well under 10 s.
    started = time.monotonic()
    result = tasks.run_client(proxy.address, ["-conns", "20", "-requests", "200", "-quiet"], peers=py_peers)
    assert result.ok, result.describe()
    stats = tasks.signal_stats(proxy)
    elapsed = time.monotonic() - started
    assert stats["msg_req"] == 4000 and stats["msg_ack"] + stats["msg_nak"] == 4000, stats
    assert len(pids_that_served(proxy)) == 2, "all 20 sessions on one worker: %s" % proxy.tail(40)
    if elapsed >= 9.5:
        pytest.skip("machine too loaded: the run took %.1fs, the 10 s window cannot hold all of it" % elapsed)
    # Everything happened inside the last 10 s: the summed 10 s window holds all of it.
    assert stats["request_rate_10s"] * 10 == pytest.approx(4000), stats
    assert stats["response_rate_10s"] * 10 == pytest.approx(4000), stats


def test_kill_9_worker_mid_traffic_is_replaced_and_loses_no_counts(procs, server: tasks.Service, py_peers) -> None:
    proxy = start_proxy(procs, server)
    pids = workers_of(proxy)

    # A: known traffic, exact.
    results = tasks.run_clients_parallel(proxy.address, 20, peers=py_peers)
    assert not tasks.failures(results)
    before = tasks.signal_stats(proxy)
    assert_exact(before, runs=20)

    # B: long lockstep sessions; kill -9 a worker while they run.
    conns, requests = 8, 1500
    background: dict = {}
    load = threading.Thread(
        target=lambda: background.update(
            result=tasks.run_client(
                proxy.address,
                ["-conns", str(conns), "-requests", str(requests), "-quiet", "-summary", "-timeout", "5"],
                peers=py_peers,
                timeout=120,
            )
        )
    )
    load.start()
    try:
        seen = [before["msg_req"]]

        def progressed() -> bool:
            seen.append(tasks.signal_stats(proxy)["msg_req"])
            return seen[-1] >= before["msg_req"] + 400

        waited(progressed, 20, "traffic through the proxy", interval=0.05)
        # Kill the worker holding more sessions (sockets): it surely has open ones.
        victim = max(pids, key=sockets_of)
        os.kill(victim, signal.SIGKILL)
        match = proxy.wait_for_output(READY_AGAIN, timeout=15)
        replacement = int(match.group(2))
        assert replacement != victim and running(replacement)
        while load.is_alive():
            seen.append(tasks.signal_stats(proxy)["msg_req"])
            load.join(0.1)
    finally:
        load.join(120)
    assert seen == sorted(seen), "msg_req went backwards: %s" % seen

    killed = r"worker \d+ \(pid %d\) was killed by SIGKILL .*\(its (\d+) messages stay counted" % victim
    logged = re.search(killed, proxy.stderr_text())
    assert logged and int(logged.group(1)) > 0, proxy.stderr_text()[-3000:]

    result = background["result"]
    assert result.failed, "the killed worker's sessions should have failed:\n" + result.describe()
    answers = json.loads(result.stdout.strip().splitlines()[-1])["answers"]
    assert answers < conns * requests
    after = tasks.signal_stats(proxy)
    req, resp = delta(after, before, "msg_req"), delta(after, before, "msg_ack") + delta(after, before, "msg_nak")
    # Lockstep: one request in flight per session, so the counts match the
    # client's validated answers up to one message per session either way.
    assert answers <= req <= answers + 2 * conns, (answers, req, after)
    assert abs(resp - answers) <= conns, (answers, resp, after)
    assert after["msg_invalid"] == 0
    # The dead worker's open sessions are not "active" any more.
    assert after["connections_active"] == 0, after

    # C: the replaced fleet serves as before, and counts exactly.
    results = tasks.run_clients_parallel(proxy.address, 20, peers=py_peers)
    assert not tasks.failures(results), tasks.failures(results)[0].describe()
    final = tasks.signal_stats(proxy)
    assert delta(final, after, "msg_req") == 2000
    assert delta(final, after, "msg_ack") + delta(final, after, "msg_nak") == 2000
    assert final["connections_active"] == 0
    assert sorted(children(proxy.pid)) == sorted([p for p in pids if p != victim] + [replacement])


def test_idle_worker_killed_keeps_its_counts_exactly(procs, server: tasks.Service, peers) -> None:
    proxy = start_proxy(procs, server)
    pids = workers_of(proxy)
    results = tasks.run_clients_parallel(proxy.address, 20, peers=peers)
    assert not tasks.failures(results)
    before = tasks.signal_stats(proxy)
    assert_exact(before, runs=20)
    for victim in pids:  # both, one after the other: every slot outlives its worker
        os.kill(victim, signal.SIGKILL)
        waited(lambda v=victim: v not in children(proxy.pid) and len(children(proxy.pid)) == 2, 15, "respawn")
    waited(lambda: len(re.findall(READY_AGAIN, proxy.stderr_text())) == 2, 15, "both replacements ready")
    after = tasks.signal_stats(proxy)
    for key in ("msg_req", "msg_ack", "msg_nak", "connections_total", "bytes_client_to_server"):
        assert after[key] == before[key], (key, before, after)
    results = tasks.run_clients_parallel(proxy.address, 10, peers=peers)
    assert not tasks.failures(results)
    assert_exact(tasks.signal_stats(proxy), runs=30)


def test_stuck_worker_is_killed_and_replaced(procs, server: tasks.Service, peers) -> None:
    proxy = start_proxy(procs, server, "-heartbeat-timeout", "2")
    victim = workers_of(proxy)[0]
    os.kill(victim, signal.SIGSTOP)  # a hub that never comes back
    t0 = time.monotonic()
    proxy.wait_for_output(r"pid %d\): no heartbeat for .*; aborting it \(SIGABRT" % victim, timeout=20)
    assert time.monotonic() - t0 < 8  # the flag, not the 10 s default, decided
    # A stopped process keeps SIGABRT pending: SIGKILL follows.
    proxy.wait_for_output(r"pid %d\): still there after SIGABRT; killing it" % victim, timeout=15)
    proxy.wait_for_output(r"pid %d\) was killed by SIGKILL \(no heartbeat\)" % victim, timeout=15)
    proxy.wait_for_output(READY_AGAIN, timeout=15)
    assert not running(victim)
    results = tasks.run_clients_parallel(proxy.address, 10, peers=peers)
    assert not tasks.failures(results)
    assert_exact(tasks.signal_stats(proxy), runs=10)


def test_stuck_worker_leaves_a_traceback_when_aborted(procs, server: tasks.Service, peers) -> None:
    """As gunicorn does: SIGABRT before SIGKILL, and the worker's faulthandler says where it hung."""
    proxy = start_proxy(procs, server, "-heartbeat-timeout", "1")
    victim = workers_of(proxy)[0]
    os.kill(victim, signal.SIGSTOP)  # its hub stops: no heartbeat
    proxy.wait_for_output(r"pid %d\): no heartbeat for .*; aborting it" % victim, timeout=20)
    os.kill(victim, signal.SIGCONT)  # the pending SIGABRT is delivered now, before the SIGKILL
    proxy.wait_for_output(r"pid %d\) was killed by SIGABRT \(no heartbeat\)" % victim, timeout=15)
    text = proxy.stderr_text()
    assert "Fatal Python error: Aborted" in text
    assert re.search(r"(Current thread|Thread) 0x[0-9a-f]+ .*\(most recent call first\):\n  File ", text), text[-2000:]
    assert "still there after SIGABRT" not in text  # SIGKILL was not needed
    proxy.wait_for_output(READY_AGAIN, timeout=15)
    results = tasks.run_clients_parallel(proxy.address, 4, peers=peers)
    assert not tasks.failures(results)


@pytest.mark.parametrize("target", ["master", "group"])
def test_sigterm_drains_workers_exits_0_and_leaves_none(procs, server: tasks.Service, target: str) -> None:
    proxy = start_proxy(procs, server, "-grace", "20")
    pids = workers_of(proxy)
    with connect(proxy.address) as sock:
        sock.sendall(b"REQ 1 first\n")
        assert len(recv_lines(sock, 1)) == 1
        if target == "master":
            proxy.send_signal(signal.SIGTERM)
        else:  # as systemd stops a service: every process gets it, workers twice (forwarded too)
            os.killpg(proxy.pid, signal.SIGTERM)
        proxy.wait_for_output(r"draining 1 open session", timeout=5)
        # The open session goes on while its worker drains ...
        sock.sendall(b"REQ 2 second\n")
        assert len(recv_lines(sock, 1)) == 1
        assert proxy.alive()
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    # ... and once it ends, everything exits.
    assert proxy.wait(timeout=15) == 0, proxy.tail(40)
    assert not [p for p in pids if running(p)], "workers left behind"
    assert proxy.stderr_text().count("stopping 2 worker(s)") == 1


def test_ctrl_c_to_the_process_group_is_handled_once(procs, server: tasks.Service) -> None:
    proxy = start_proxy(procs, server)
    pids = workers_of(proxy)
    os.killpg(proxy.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert proxy.wait(timeout=15) == 0, proxy.tail(40)
    assert not [p for p in pids if running(p)]
    err = proxy.stderr_text()
    assert err.count("stopping 2 worker(s)") == 1, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "second stop signal" not in err, err
    assert "killing it" not in err and "replacing it" not in err, err


def test_second_ctrl_c_exits_at_once_workers_too(procs, server: tasks.Service) -> None:
    proxy = start_proxy(procs, server, "-grace", "60")
    pids = workers_of(proxy)
    with connect(proxy.address) as sock:
        sock.sendall(b"REQ 1 x\n")
        recv_lines(sock, 1)
        os.killpg(proxy.pid, signal.SIGINT)
        proxy.wait_for_output(r"draining 1 open session", timeout=5)
        started = time.monotonic()
        os.killpg(proxy.pid, signal.SIGINT)
        assert proxy.wait(timeout=5) == 1, proxy.tail(40)
        waited(lambda: not any(running(p) for p in pids), 5, "workers to exit at once")
        assert time.monotonic() - started < 4


def test_sigusr2_to_a_worker_is_ignored(procs, server: tasks.Service, peers) -> None:
    proxy = start_proxy(procs, server)
    worker = workers_of(proxy)[0]
    for _ in range(3):
        os.kill(worker, signal.SIGUSR2)
    assert tasks.run_client(proxy.address, peers=peers).ok  # any line would have been written by now
    assert running(worker) and worker in children(proxy.pid)
    assert proxy.stdout_text() == ""
    # The client exits once it has its last answer; the worker counts an answer just after
    # handing it on, and sees the client's EOF after that. So wait for the session to end
    # (CI once read 99 of 100 answers with the session still open), then the counts are in.
    stats = waited(
        lambda: (lambda s: s if s["connections_active"] == 0 else None)(tasks.signal_stats(proxy)),
        10,
        "the client's session to end",
        interval=0.05,
    )
    assert_exact(stats, runs=1)


def test_workers_exit_when_the_master_dies(procs, server: tasks.Service) -> None:
    proxy = start_proxy(procs, server)
    pids = workers_of(proxy)
    os.kill(proxy.pid, signal.SIGKILL)
    waited(lambda: not any(running(p) for p in pids), 15, "workers to exit after the master died")


def test_foreign_process_on_the_port_is_reported_not_shared(tmp_path, server: tasks.Service) -> None:
    # Another process that set SO_REUSEPORT would share the port silently with our workers.
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    try:
        listen = "127.0.0.1:%d" % squatter.getsockname()[1]
        cmd = [*fooproxy_command(), "-listen", listen, "-forward", server.address, "-http", "off"]
        proc = subprocess.run(
            [*cmd, "-recovery-path", "off", *WORKERS], capture_output=True, text=True, timeout=30, cwd=tmp_path
        )
    finally:
        squatter.close()
    assert proc.returncode == 1, proc
    assert "address already in use" in proc.stderr, proc.stderr
    assert "worker" not in proc.stderr.replace("-workers", ""), "no worker should have started: " + proc.stderr


def test_master_restores_recovery_into_its_base_slot(procs, server: tasks.Service, peers, tmp_path) -> None:
    path = str(tmp_path / "recovery.json")
    first = start_proxy(procs, server, recovery_path=path)
    assert not tasks.failures(tasks.run_clients_parallel(first.address, 10, peers=peers))
    assert first.stop() == 0, first.tail()
    saved = json.loads(Path(path).read_text())
    assert saved["totals"]["msg_req"] == 1000

    second = start_proxy(procs, server, recovery_path=path)
    assert_exact(tasks.signal_stats(second), runs=10)  # before any traffic: the restored history
    assert not tasks.failures(tasks.run_clients_parallel(second.address, 5, peers=peers))
    assert_exact(tasks.signal_stats(second), runs=15)
    # A worker's death does not touch the restored part either.
    os.kill(workers_of(second)[0], signal.SIGKILL)
    second.wait_for_output(READY_AGAIN, timeout=15)
    assert_exact(tasks.signal_stats(second), runs=15)
    assert second.stop() == 0
    assert json.loads(Path(path).read_text())["totals"]["msg_req"] == 1500

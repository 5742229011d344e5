"""A number that was shown is never taken back (issue 11 §2).

SIGUSR2, ``/stats`` and ``/metrics`` hand out a snapshot only once the recovery
file holds at least as much. So after a ``kill -9`` right after an exposure and a
restart, every counter is at least what was shown: Prometheus never sees a
counter go back (a reset, which ``rate()`` turns into a spike), and a user never
sees smaller numbers than a SIGUSR2 line said.

Each round sends traffic, exposes the stats one of the three ways, kills the
proxy with SIGKILL at once (the periodic save runs only every second, so without
the durable exposure the file is usually behind), restarts it on the same
recovery file and compares.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import tasks
from harness.processes import free_port
from harness.sigusr2 import read_stats
from tests.helpers import wait_until

ROUNDS = 50
#: With -workers 2 each round starts and kills a master and its workers twice: fewer rounds.
ROUNDS_WORKERS = 20
COUNTERS = ("msg_total", "msg_req", "msg_ack", "msg_nak", "connections_total")
WAYS = ("sigusr2", "stats", "metrics")


def _traffic(address: str, requests: int) -> None:
    """One lockstep session of ``requests`` REQs, every answer read."""
    with socket.create_connection(tasks.split_address(address), timeout=10) as sock:
        for i in range(requests):
            sock.sendall(b"REQ %d durable\n" % i)
            got = b""
            while not got.endswith(b"\n"):
                data = sock.recv(4096)
                assert data, "the proxy closed the session"
                got += data


def _get(http: str, path: str) -> str:
    with urllib.request.urlopen("http://%s%s" % (http, path), timeout=10) as resp:
        return resp.read().decode()


def _shown(way: str, proxy: tasks.Service, http: str) -> dict[str, int]:
    """The counters as one exposure showed them."""
    if way == "sigusr2":
        stats = read_stats(proxy)
        return {k: stats[k] for k in COUNTERS}
    if way == "stats":
        stats = json.loads(_get(http, "/stats"))
        return {k: stats[k] for k in COUNTERS}
    shown: dict[str, int] = {}
    for family in text_string_to_metric_families(_get(http, "/metrics")):
        for sample in family.samples:
            if sample.name == "fooproxy_messages_total":
                shown["msg_" + sample.labels["type"]] = int(sample.value)
            elif sample.name == "fooproxy_connections_total":
                shown["connections_total"] = int(sample.value)
    return {k: v for k, v in shown.items() if k in COUNTERS}


def _children(pid: int) -> list[int]:
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _start(procs, server, args: tuple[str, ...], listen: str, http: str, path: str) -> tasks.Service:
    proxy = procs.proxy(server.address, *args, listen=listen, http=http, recovery_path=path)
    if args:  # every worker listens before the first client
        assert wait_until(lambda: len(_children(proxy.pid)) == int(args[1]), 10), "workers"
    return proxy


def _kill_9(proxy: tasks.Service) -> None:
    """SIGKILL, then wait until its orphaned workers (done with their sessions) let go of the port."""
    workers = _children(proxy.pid)
    proxy.send_signal(signal.SIGKILL)
    proxy.wait(10)
    assert wait_until(lambda: all(_gone(p) for p in workers), 20), "orphaned workers still running"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_counter_after_kill_9_is_at_least_what_was_shown(procs, server, tmp_path, workers) -> None:
    path = str(tmp_path / "recovery.json")
    listen = tasks.local_address()
    http = "127.0.0.1:%d" % free_port()
    args = ("-workers", workers) if workers != "1" else ()
    behind = []
    rounds = ROUNDS if workers == "1" else ROUNDS_WORKERS
    for round_ in range(rounds):
        proxy = _start(procs, server, args, listen, http, path)
        _traffic(proxy.address, 3 + round_ % 5)
        way = WAYS[round_ % len(WAYS)]
        shown = _shown(way, proxy, http)
        _kill_9(proxy)
        restarted = _start(procs, server, args, listen, http, path)
        restored = json.loads(_get(http, "/stats"))
        less = {k: (shown[k], restored[k]) for k in shown if restored[k] < shown[k]}
        if less:
            behind.append((round_, way, less))
        _kill_9(restarted)
    assert not behind, "%d of %d rounds restored counters below what was shown: %s" % (len(behind), rounds, behind[:5])

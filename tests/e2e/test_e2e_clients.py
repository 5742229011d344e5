"""Whole client runs through fooproxy: every run passes and the SIGUSR2 counts are exact."""

from __future__ import annotations

import os

import pytest

from harness import tasks
from harness.binaries import Peers

pytestmark = pytest.mark.e2e
CHECK_TRACEBACKS = True  # see conftest.procs


def assert_all_ok(results: list[tasks.ClientResult], proxy: tasks.Service) -> None:
    bad = tasks.failures(results)
    assert not bad, "%d of %d client runs failed; first:\n%s\n%s" % (
        len(bad),
        len(results),
        bad[0].describe(),
        proxy.tail(),
    )
    assert all(r.stdout.strip() == "..........OK!" for r in results), results[0].stdout


def assert_exact(proxy: tasks.Service, runs: int, requests: int = 100) -> dict:
    stats = tasks.signal_stats(proxy)
    problems = tasks.check_counts(stats, runs, requests)
    assert not problems, "%s\nstats: %s\n%s" % ("; ".join(problems), stats, proxy.tail())
    assert proxy.alive()
    return stats


#: Sequential runs in the long test (each a real client process: ~0.25 s for a Python client).
SEQUENTIAL_RUNS = int(os.environ.get("FOO_E2E_SEQUENTIAL_RUNS", "200"))


def test_200_sequential_runs_are_ok_and_counted_exactly(peers: Peers, proxy: tasks.Service) -> None:
    results = tasks.run_clients_sequential(proxy.address, SEQUENTIAL_RUNS, peers=peers)
    assert_all_ok(results, proxy)
    stats = assert_exact(proxy, SEQUENTIAL_RUNS)
    assert stats["connections_total"] == SEQUENTIAL_RUNS


def test_50_parallel_runs_are_ok_and_counted_exactly(peers: Peers, proxy: tasks.Service) -> None:
    results = tasks.run_clients_parallel(proxy.address, 50, peers=peers)
    assert_all_ok(results, proxy)
    assert_exact(proxy, 50)


def test_sequential_then_parallel_counts_add_up(peers: Peers, proxy: tasks.Service) -> None:
    assert_all_ok(tasks.run_clients_sequential(proxy.address, 5, peers=peers), proxy)
    assert_exact(proxy, 5)
    assert_all_ok(tasks.run_clients_parallel(proxy.address, 10, peers=peers), proxy)
    assert_exact(proxy, 15)


def test_many_connections_and_pipelining_in_one_python_client(procs, py_peers: Peers) -> None:
    """The Python client's load options: 40 connections x 500 requests, 16 in flight each."""
    server = procs.server(py_peers)
    proxy = procs.proxy(server.address)
    result = tasks.run_client(proxy.address, ["-conns", "40", "-requests", "500", "-window", "16"], peers=py_peers)
    assert result.ok, result.describe() + "\n" + proxy.tail()
    assert_exact(proxy, 40, 500)


def test_python_client_through_proxy_to_reference_server(procs, ref_server, py_peers: Peers) -> None:
    peers = Peers("reference server, python client", ref_server, py_peers.client)
    server = procs.server(peers)
    proxy = procs.proxy(server.address)
    results = tasks.run_clients_parallel(proxy.address, 10, peers=peers)
    assert_all_ok(results, proxy)
    assert_exact(proxy, 10)


def test_reference_client_through_proxy_to_python_server(procs, ref_client, py_peers: Peers) -> None:
    peers = Peers("python server, reference client", py_peers.server, ref_client)
    server = procs.server(peers, "-split")
    proxy = procs.proxy(server.address)
    results = tasks.run_clients_parallel(proxy.address, 10, peers=peers)
    assert_all_ok(results, proxy)
    assert_exact(proxy, 10)


@pytest.mark.parametrize("client", ["python", "reference"])
def test_a_lying_server_makes_the_client_fail_through_the_proxy(procs, py_peers: Peers, client: str) -> None:
    if client == "reference":
        from harness.binaries import reference_client

        ref = reference_client()
        if ref is None:
            pytest.skip("no executable client-linux in FOO_BIN_DIR (default bin/)")
        peers = Peers("python -lie server, reference client", py_peers.server, ref)
    else:
        peers = py_peers
    server = procs.server(peers, "-lie")
    proxy = procs.proxy(server.address)
    result = tasks.run_client(proxy.address, peers=peers, timeout=30)
    assert result.failed, result.describe()
    # As client-linux prints it: the verdict on stdout; "Errors:" and the reason, unindented, on stderr.
    assert result.stdout == "FAILED!\n", result.describe()
    assert result.stderr == "Errors:\nvalidating response: corrupted data\n", result.describe()
    assert proxy.alive(), proxy.tail()
    stats = tasks.signal_stats(proxy)
    # The client gives up at the first bad answer: one REQ, one (corrupted but well-formed) answer.
    assert stats["msg_req"] >= 1 and stats["msg_ack"] + stats["msg_nak"] == stats["msg_req"], stats
    assert stats["msg_invalid"] == 0, stats

"""Latency through ``-workers 2``: the master's /stats and /metrics sum both workers' histograms exactly."""

from __future__ import annotations

import json
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import tasks
from harness.processes import Process, free_port
from tests.helpers import connect, recv_lines, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLIENTS, EXCHANGES = 8, 10


def fetch(http: str, path: str) -> bytes:
    with urllib.request.urlopen("http://%s%s" % (http, path), timeout=10) as resp:
        return resp.read()


def test_two_workers_histograms_sum_exactly(procs, tmp_path):
    port = free_port()
    server = Process(
        [sys.executable, "-m", "tests.latency_server", str(port)],
        name="delay-server",
        log_dir=tmp_path,
        cwd=str(ROOT),
        ready_port=("127.0.0.1", port),
        ready_timeout=30,
    )
    procs.add(server)
    server.start()
    http = "127.0.0.1:%d" % free_port()
    proxy = procs.proxy("127.0.0.1:%d" % port, "-workers", "2", http=http, ready_timeout=60)
    proxy.wait_for_output(tasks.PROXY_READY, 60, "stderr")

    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            c = connect(proxy.address)
            for i in range(EXCHANGES):
                c.sendall(b"REQ %d d5\n" % i)
                assert recv_lines(c, 1) == [b"ACK %d\n" % i]
            c.close()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    want = CLIENTS * EXCHANGES

    def summed():  # workers flush their latency counts at each heartbeat (0.5 s)
        stats = json.loads(fetch(http, "/stats"))
        return stats if stats["msg_ack"] == want and stats["connections_active"] == 0 else None

    stats = wait_until(summed, timeout=10)
    assert stats, json.loads(fetch(http, "/stats"))
    count = {}

    def histogram_complete():
        for family in text_string_to_metric_families(fetch(http, "/metrics").decode()):
            for s in family.samples:
                if s.name == "fooproxy_request_duration_seconds_count":
                    count[s.labels["result"]] = s.value
        return count.get("ack") == want

    assert wait_until(histogram_complete, timeout=10), count
    assert count["nak"] == 0
    stats = json.loads(fetch(http, "/stats"))
    assert 5.0 <= stats["latency_p50_ms"] <= 12.5 and stats["latency_max_ms"] >= 5.0
    assert stats["requests_unanswered"] == 0

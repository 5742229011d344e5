"""A real Prometheus scraping two fooproxy instances: the fleet totals are exact sums.

Uses Debian's ``prometheus`` package (``.ci/run`` installs it; as root with
apt-get the test installs it itself: ``harness.prometheus.find_prometheus``). Prometheus runs on loopback with a temp
config and storage dir and the shipped recording rules
(``deploy/prometheus/fooproxy.rules.yml``). One instance runs ``-workers 2``,
so its /metrics is the master's sum over its workers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import tasks
from harness.processes import Process, free_port
from harness.prometheus import RULES, SAMPLE_CONFIG, Api, command, find_prometheus, scrape_config
from tests.helpers import connect, recv_lines

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    found, reason = find_prometheus()
    if found is None:
        pytest.skip(reason)
    return found


def start_prometheus(procs, prometheus_bin: str, tmp_path: Path, targets: list[str]) -> Api:
    """Prometheus on loopback scraping ``targets`` with the shipped rules, once it sees them all up."""
    web = "127.0.0.1:%d" % free_port()
    config = tmp_path / "prometheus.yml"
    shutil.copy(RULES, tmp_path / RULES.name)
    config.write_text(scrape_config(targets, [RULES.name]))
    prom = Process(
        command(prometheus_bin, str(config), str(tmp_path / "data"), web),
        name="prometheus",
        log_dir=tmp_path,
        ready_port=tuple(tasks.split_address(web)),
        ready_timeout=60,
    )
    procs.add(prom)
    prom.start()
    api = Api("http://" + web)
    api.wait_ready(prom)
    api.wait_value('count(up{job="fooproxy"} == 1)', len(targets))
    return api


def test_promtool_accepts_the_shipped_config_and_rules(prometheus_bin: str) -> None:
    promtool = shutil.which("promtool") or str(Path(prometheus_bin).with_name("promtool"))
    for args in (["check", "rules", str(RULES)], ["check", "config", str(SAMPLE_CONFIG)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_sums_two_instances_exactly(procs, peers, prometheus_bin: str, tmp_path: Path) -> None:
    server = procs.server(peers)
    http_a, http_b = ("127.0.0.1:%d" % free_port() for _ in range(2))
    # Instance A is itself a master with two workers; B is a single process.
    a = procs.proxy(server.address, "-workers", "2", http=http_a, ready_timeout=60)
    b = procs.proxy(server.address, http=http_b)

    api = start_prometheus(procs, prometheus_bin, tmp_path, [http_a, http_b])

    runs_a, runs_b = 12, 7
    assert not tasks.failures(tasks.run_clients_parallel(a.address, runs_a, peers=peers))
    assert not tasks.failures(tasks.run_clients_parallel(b.address, runs_b, peers=peers))
    stats_a, stats_b = tasks.signal_stats(a), tasks.signal_stats(b)
    assert stats_a["msg_req"] == runs_a * 100 and stats_b["msg_req"] == runs_b * 100
    want = {key: stats_a[key] + stats_b[key] for key in ("msg_req", "msg_ack", "msg_nak", "msg_total")}

    api.wait_value('sum(fooproxy_messages_total{type="req"})', want["msg_req"])
    assert api.scalar('sum(fooproxy_messages_total{type="ack"})') == want["msg_ack"]
    assert api.scalar('sum(fooproxy_messages_total{type="nak"})') == want["msg_nak"]
    # The shipped recording rules give the same fleet fields.
    for field in ("msg_req", "msg_ack", "msg_nak", "msg_total"):
        api.wait_value('job:fooproxy_%s:sum{job="fooproxy"}' % field, want[field])
    for field in ("request_rate_1s", "request_rate_10s", "response_rate_1s", "response_rate_10s"):
        assert api.scalar('job:fooproxy_%s:sum{job="fooproxy"}' % field) is not None, field
    assert api.scalar('job:fooproxy_instances_up:count{job="fooproxy"}') == 2


def test_fleet_latency_p50_from_prometheus_is_the_servers_delay(procs, prometheus_bin: str, tmp_path: Path) -> None:
    """Two instances (one with workers) before a server that answers after 5 ms: the fleet's p50 is 5 ms."""
    port = free_port()
    server = Process(
        [sys.executable, "-m", "tests.latency_server", str(port)],
        name="delay-server",
        log_dir=tmp_path,
        cwd=str(Path(__file__).resolve().parents[2]),
        ready_port=("127.0.0.1", port),
        ready_timeout=30,
    )
    procs.add(server)
    server.start()
    http_a, http_b = ("127.0.0.1:%d" % free_port() for _ in range(2))
    a = procs.proxy("127.0.0.1:%d" % port, "-workers", "2", http=http_a, ready_timeout=60)
    b = procs.proxy("127.0.0.1:%d" % port, http=http_b)
    a.wait_for_output(tasks.PROXY_READY, 60, "stderr")

    api = start_prometheus(procs, prometheus_bin, tmp_path, [http_a, http_b])

    clients, exchanges = 4, 25
    errors: list[BaseException] = []

    def client(address: str) -> None:
        try:
            c = connect(address)
            for i in range(exchanges):
                c.sendall(b"REQ %d d5\n" % i)
                assert recv_lines(c, 1) == [b"ACK %d\n" % i]
            c.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(p.address,)) for p in (a, b) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    total = 2 * clients * exchanges
    api.wait_value("sum(fooproxy_request_duration_seconds_count)", total)
    p50 = api.scalar("histogram_quantile(0.5, sum by (le) (fooproxy_request_duration_seconds_bucket))")
    # 5 ms is a bucket bound: the answers (5 ms and a little) are in (5, 6.3] ms; one bucket either side.
    assert p50 is not None and 0.004 <= p50 <= 0.008, p50
    deadline = time.monotonic() + 30
    rule = None
    while rule is None and time.monotonic() < deadline:  # the rule's first evaluation over the new scrapes
        rule = api.scalar('job:fooproxy_request_duration_seconds:p50_rate1m{job="fooproxy"}')
        if rule is None or rule != rule:  # no result yet, or NaN before two scrapes of the rise
            rule = None
            time.sleep(0.5)
    assert rule is not None and 0.004 <= rule <= 0.008, rule

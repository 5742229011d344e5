"""A real Prometheus scraping two fooproxy instances: the fleet totals are exact sums.

Uses Debian's ``prometheus`` package (``.ci/run`` installs it; as root with
apt-get the test installs it itself). Prometheus runs on loopback with a temp
config and storage dir and the shipped recording rules
(``deploy/prometheus/fooproxy.rules.yml``). One instance runs ``-workers 2``,
so its /metrics is the master's sum over its workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness import tasks
from harness.processes import Process, free_port
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = DEPLOY / "fooproxy.rules.yml"
SAMPLE_CONFIG = DEPLOY / "prometheus.yml"


def _install_prometheus() -> str:
    """The ``prometheus`` binary; installs Debian's package if missing, or skips saying why."""
    found = shutil.which("prometheus")
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip("Prometheus not installed and no apt-get here: install the 'prometheus' package to run this")
    if os.geteuid() != 0:
        pytest.skip("Prometheus not installed and not root: run `apt-get install prometheus` (or .ci/run) first")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"])
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        except subprocess.TimeoutExpired:
            pytest.skip("`%s` timed out: cannot install Debian's prometheus package" % " ".join(cmd))
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            pytest.skip("`%s` failed, Debian's prometheus package cannot be installed: %s" % (" ".join(cmd), tail))
    found = shutil.which("prometheus")
    if not found:
        pytest.skip("the prometheus package installed no prometheus binary on PATH")
    return found


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _install_prometheus()


def query(base: str, promql: str) -> list[dict]:
    """Instant query through the HTTP API; the result vector."""
    url = "%s/api/v1/query?%s" % (base, urllib.parse.urlencode({"query": promql}))
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(base: str, promql: str) -> float | None:
    """The single value of ``promql``, or None while it has no result yet."""
    result = query(base, promql)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def wait_value(base: str, promql: str, want: float, timeout: float = 45.0) -> None:
    """Poll until ``promql`` evaluates to ``want`` (new scrapes and rule runs come every second)."""
    seen: list = [None]

    def reached() -> bool:
        seen[0] = scalar(base, promql)
        return seen[0] == want

    assert wait_until(reached, timeout, interval=0.2), "%s = %s after %gs, want %s" % (promql, seen[0], timeout, want)


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

    web = "127.0.0.1:%d" % free_port()
    config = tmp_path / "prometheus.yml"
    shutil.copy(RULES, tmp_path / RULES.name)
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "rule_files:\n"
        "  - %s\n"
        "scrape_configs:\n"
        "  - job_name: fooproxy\n"
        "    static_configs:\n"
        "      - targets: ['%s', '%s']\n" % (RULES.name, http_a, http_b)
    )
    prom = Process(
        [
            prometheus_bin,
            "--config.file=%s" % config,
            "--storage.tsdb.path=%s" % (tmp_path / "data"),
            "--web.listen-address=%s" % web,
            "--log.level=warn",
        ],
        name="prometheus",
        log_dir=tmp_path,
        ready_port=tuple(tasks.split_address(web)),
        ready_timeout=60,
    )
    procs.add(prom)
    prom.start()
    base = "http://" + web
    _wait_ready(base, prom)
    wait_value(base, 'count(up{job="fooproxy"} == 1)', 2)

    runs_a, runs_b = 12, 7
    assert not tasks.failures(tasks.run_clients_parallel(a.address, runs_a, peers=peers))
    assert not tasks.failures(tasks.run_clients_parallel(b.address, runs_b, peers=peers))
    stats_a, stats_b = tasks.signal_stats(a), tasks.signal_stats(b)
    assert stats_a["msg_req"] == runs_a * 100 and stats_b["msg_req"] == runs_b * 100
    want = {key: stats_a[key] + stats_b[key] for key in ("msg_req", "msg_ack", "msg_nak", "msg_total")}

    wait_value(base, 'sum(fooproxy_messages_total{type="req"})', want["msg_req"])
    assert scalar(base, 'sum(fooproxy_messages_total{type="ack"})') == want["msg_ack"]
    assert scalar(base, 'sum(fooproxy_messages_total{type="nak"})') == want["msg_nak"]
    # The shipped recording rules give the same fleet fields.
    for field in ("msg_req", "msg_ack", "msg_nak", "msg_total"):
        wait_value(base, 'job:fooproxy_%s:sum{job="fooproxy"}' % field, want[field])
    for field in ("request_rate_1s", "request_rate_10s", "response_rate_1s", "response_rate_10s"):
        assert scalar(base, 'job:fooproxy_%s:sum{job="fooproxy"}' % field) is not None, field
    assert scalar(base, 'job:fooproxy_instances_up:count{job="fooproxy"}') == 2


def _wait_ready(base: str, prom: Process, timeout: float = 60.0) -> None:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        assert prom.alive(), prom.tail()
        return False

    assert wait_until(ready, timeout, interval=0.1), "Prometheus not ready within %gs\n%s" % (timeout, prom.tail())

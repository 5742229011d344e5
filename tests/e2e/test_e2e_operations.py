"""Operations through the real CLI: HTTP endpoints, recovery after kill -9, corrupt files."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import tasks
from harness.processes import free_port
from harness.sigusr2 import read_stats

pytestmark = pytest.mark.e2e
CHECK_TRACEBACKS = True


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def poll(predicate, timeout: float = 10.0) -> bool:
    """Check a condition until it holds or the deadline passes (readiness, not a fixed wait)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_ok(proxy: tasks.Service, n: int = 1) -> None:
    results = tasks.run_clients_parallel(proxy.address, n)
    assert not tasks.failures(results), [r.describe() for r in tasks.failures(results)]


def test_http_endpoints_agree_with_sigusr2(procs, server):
    http = "127.0.0.1:%d" % free_port()
    proxy = procs.proxy(server.address, http=http)
    run_ok(proxy, 3)
    status, body = get("http://%s/health" % http)
    assert status == 200 and json.loads(body)["status"] in ("ok", "degraded")
    printed = read_stats(proxy)
    status, body = get("http://%s/stats" % http)
    served = json.loads(body)
    for name in ("msg_total", "msg_req", "msg_ack", "msg_nak", "msg_invalid", "connections_total"):
        assert served[name] == printed[name], name
    assert served["msg_req"] == 300
    status, body = get("http://%s/metrics" % http)
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }
    assert samples[("fooproxy_messages_total", (("type", "req"),))] == 300
    acks = samples[("fooproxy_messages_total", (("type", "ack"),))]
    naks = samples[("fooproxy_messages_total", (("type", "nak"),))]
    assert acks + naks == 300
    assert get("http://%s/nope" % http)[0] == 404


def test_health_is_503_while_the_upstream_is_down(procs, server):
    http = "127.0.0.1:%d" % free_port()
    port = free_port()  # nothing listens there
    procs.proxy("127.0.0.1:%d" % port, "-health-interval", "0.1", http=http)
    seen = {}

    def unhealthy() -> bool:
        seen["status"], seen["body"] = get("http://%s/health" % http)
        return seen["status"] == 503

    assert poll(unhealthy), seen
    assert "unreachable" in json.loads(seen["body"])["reason"]


def test_stats_survive_kill_9_and_restart(procs, server, tmp_path):
    path = str(tmp_path / "recovery.json")
    listen = tasks.local_address()
    proxy = procs.proxy(server.address, listen=listen, recovery_path=path)
    run_ok(proxy, 5)
    before = read_stats(proxy)
    assert before["msg_req"] == 500

    # The saver runs every second: wait until the file holds all 500 requests.
    def saved_all() -> bool:
        try:
            with open(path) as f:
                return json.load(f)["totals"]["msg_req"] == 500
        except (OSError, ValueError, KeyError):
            return False

    assert poll(saved_all)
    proxy.send_signal(signal.SIGKILL)
    proxy.wait(timeout=10)
    again = procs.proxy(server.address, listen=listen, recovery_path=path)
    after = read_stats(again)
    for name in ("msg_total", "msg_req", "msg_ack", "msg_nak"):
        assert after[name] == before[name], name
    assert after["request_rate_10s"] > 0  # the window buckets came back too
    run_ok(again, 1)
    assert read_stats(again)["msg_req"] == 600


def test_sigterm_saves_the_final_snapshot(procs, server, tmp_path):
    path = tmp_path / "recovery.json"
    proxy = procs.proxy(server.address, recovery_path=str(path))
    run_ok(proxy, 2)
    assert proxy.stop() == 0
    saved = json.loads(path.read_text())
    assert saved["totals"]["msg_req"] == 200


def test_corrupt_recovery_file_is_set_aside_and_the_proxy_starts(procs, server, tmp_path):
    path = tmp_path / "recovery.json"
    path.write_text('{"totals": {"msg_req": "lots"')
    proxy = procs.proxy(server.address, recovery_path=str(path))
    assert read_stats(proxy)["msg_req"] == 0
    assert list(tmp_path.glob("recovery.json.corrupt-*"))
    assert "recovery.json" in proxy.stderr_text() and "WARNING" in proxy.stderr_text()
    run_ok(proxy, 1)


def test_busy_http_port_is_a_clear_startup_error(procs, server):
    first = "127.0.0.1:%d" % free_port()
    procs.proxy(server.address, http=first)
    import subprocess

    from harness.binaries import fooproxy_command

    out = subprocess.run(
        [
            *fooproxy_command(),
            "-listen",
            tasks.local_address(),
            "-forward",
            server.address,
            "-http",
            first,
            "-recovery-path",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "address already in use" in out.stderr and first in out.stderr
    assert "Traceback" not in out.stderr

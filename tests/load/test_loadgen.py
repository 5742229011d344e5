"""The bench's load generator verifies answers for real, and ``foo-harness bench`` runs end to end.

The bench's smoke runs go through HAProxy when it is installed (``.ci/run``
installs Debian's package) and also without it (``--haproxy`` pointed at a
missing path, ``--no-haproxy``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.bench.bench import Fronts, choose_peers, describe_server, find_haproxy, proxy_options, server_args
from harness.bench.loadgen import LoadGen, LoadSpec
from harness.sigusr2 import read_stats
from harness.tasks import start_proxy, start_server


def _run(spec: LoadSpec):
    gen = LoadGen(spec)
    try:
        gen.start()
        return gen.run()
    finally:
        gen.close()


def test_loadgen_through_the_proxy_counts_exactly() -> None:
    peers = choose_peers(python=True)
    with (
        start_server(peers=peers, args=server_args(peers)) as server,
        start_proxy(server.address, **proxy_options(monitor=False)) as proxy,
    ):
        result = _run(LoadSpec(proxy.address, conns=4, window=16, size=32, duration=1.0))
        stats = read_stats(proxy)
    assert result.errors == 0, result.error_texts
    assert result.answered == result.sent > 1000
    assert result.naks > 0  # about 1 in 8: both kinds were seen and checked
    assert stats["msg_req"] == result.sent
    assert stats["msg_ack"] + stats["msg_nak"] == result.answered
    assert stats["msg_nak"] == result.naks
    assert result.p50_us > 0 and result.p99_us >= result.p50_us


def test_loadgen_churn_opens_a_connection_every_k_requests() -> None:
    peers = choose_peers(python=True)
    with start_server(peers=peers, args=server_args(peers, close_on_eof=True)) as server:
        result = _run(LoadSpec(server.address, conns=2, window=1, duration=1.0, churn=5))
    assert result.errors == 0, result.error_texts
    assert result.conns_opened >= result.answered // 5 >= 20


def test_loadgen_reports_wrong_answers() -> None:
    peers = choose_peers(python=True)
    with start_server(peers=peers, args=["-quiet", "-lie"], name="liar") as liar:
        result = _run(LoadSpec(liar.address, conns=2, window=4, duration=0.5))
    assert result.errors >= 2
    assert any("wrong answer" in text for text in result.error_texts), result.error_texts


HAPROXY, NO_HAPROXY = find_haproxy("haproxy")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason=NO_HAPROXY)


def test_paced_load_keeps_its_schedule_instead_of_a_closed_loop() -> None:
    peers = choose_peers(python=True)
    with start_server(peers=peers, args=server_args(peers)) as server:
        result = _run(LoadSpec(server.address, conns=4, window=1, duration=1.0, rate=50.0))
    assert result.errors == 0, result.error_texts
    # 4 connections x 50/s x 1 s; a closed loop on loopback would send thousands.
    assert 170 <= result.sent <= 204, result.sent
    assert result.answered == result.sent and result.samples == result.sent  # one latency sample per request
    assert result.late == 0 and 0 < result.p50_us <= result.p99_us


def test_paced_load_counts_sends_it_could_not_make_on_time() -> None:
    # 20,000 requests/s on one lockstep connection is far beyond a Python server's pace.
    peers = choose_peers(python=True)
    with start_server(peers=peers, args=server_args(peers)) as server:
        result = _run(LoadSpec(server.address, conns=1, window=1, duration=0.5, rate=20_000.0, procs=1))
    assert result.errors == 0, result.error_texts
    assert result.sent < 10_000 and result.late > 0


@needs_haproxy
def test_haproxy_relays_foo_and_leaves_nothing_behind() -> None:
    assert HAPROXY is not None
    peers = choose_peers(python=True)
    with start_server(peers=peers, args=server_args(peers)) as server:
        haproxy = Fronts(haproxy=HAPROXY).start("haproxy", server.address)
        try:
            result = _run(LoadSpec(haproxy.address, conns=4, window=8, duration=0.5))
            assert haproxy.alive()
        finally:
            haproxy.close()
    assert result.errors == 0, result.error_texts
    assert result.answered == result.sent > 100
    assert not haproxy.alive() and not haproxy.config_dir.exists()


def _bench(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [sys.executable, "-m", "harness.cli", "bench", *args, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("*.json")
    return proc, json.loads(path.read_text())


@pytest.mark.slow
@needs_haproxy
def test_bench_quick_run_beside_haproxy_writes_json(tmp_path) -> None:
    proc, doc = _bench(
        tmp_path, "--duration", "1", "--only", "W2,W5,W6,W7", "--idle-conns", "100", "--idle-seconds", "0.5"
    )
    assert "server: %s" % describe_server(choose_peers()) in proc.stdout
    assert "HAProxy: %s" % HAPROXY in proc.stdout and "vs HAProxy is empty" not in proc.stdout
    assert doc["ok"] and doc["haproxy"]["binary"] == HAPROXY
    for key in ("W2", "W7"):
        runs = [r for r in doc["runs"] if r["workload"] == key]
        assert [r["path"] for r in runs] == ["direct", "haproxy", "proxy", "direct"]
        direct1, hap, foo, direct2 = runs
        assert hap["errors"] == 0 and hap["cpu_s"]["haproxy"] > 0 and hap["proxy_us_per_msg"] > 0
        assert foo["errors"] == 0 and foo["proxy_us_per_msg"] > 0
        assert foo["proxy_counts"]["msg_req"] == foo["load"]["sent"]
        if key == "W2":  # W7 is judged on latency: its msgs/s is the schedule's
            assert foo["vs_haproxy"] == round(foo["msgs_per_s"] / hap["msgs_per_s"], 3)
        base = (direct1["msgs_per_s"] + direct2["msgs_per_s"]) / 2
        assert hap["ratio"] == round(hap["msgs_per_s"] / base, 3)
    w2 = doc["summary"]["W2"]
    assert w2["target"] == 1.0 and w2["verdict"] in ("met", "MISSED")
    assert w2["vs_haproxy"]["median"] == [r for r in doc["runs"] if r["path"] == "proxy"][0]["vs_haproxy"]
    w7 = doc["summary"]["W7"]
    # 8 connections x 200 req/s x 1 s, paced: the latency runs are not closed loops.
    assert all(1200 <= r["load"]["sent"] <= 1610 for r in doc["runs"] if r["workload"] == "W7")
    assert w7["verdict"] in ("met", "MISSED") and w7["haproxy_added_p50_us"] and w7["proxy_added_p50_us"]
    for held in (doc["idle_and_memory"], doc["idle_and_memory_haproxy"]):
        assert held["held"] == 100 and held["kib_per_conn"] > 0 and held["idle_cpu_pct"] >= 0
    assert doc["idle_verdicts"]["W5"] in ("met", "MISSED")
    assert "W7 latency     direct p50 / p99" in proc.stdout and "W5 memory" in proc.stdout
    assert "W6 idle CPU    fooproxy" in proc.stdout


@pytest.mark.slow
def test_bench_without_haproxy_says_why_the_column_is_empty(tmp_path) -> None:
    missing = tmp_path / "no-such" / "haproxy"
    proc, doc = _bench(tmp_path, "--duration", "0.5", "--only", "W2", "--haproxy", str(missing))
    assert "vs HAProxy is empty: haproxy not installed: no executable %s" % missing in proc.stdout
    assert doc["ok"] and doc["haproxy"]["binary"] is None
    assert [r["path"] for r in doc["runs"]] == ["direct", "proxy", "direct"]
    assert doc["summary"]["W2"]["vs_haproxy"] is None and doc["summary"]["W2"]["verdict"] == "n/a"
    assert doc["runs"][1]["ratio"] > 0


@pytest.mark.slow
def test_bench_rounds_interleave_and_summarise(tmp_path) -> None:
    proc, doc = _bench(tmp_path, "--duration", "0.5", "--only", "W2", "--rounds", "2", "--no-haproxy")
    assert "vs HAProxy is empty: skipped (--no-haproxy)" in proc.stdout
    assert [(r["round"], r["path"]) for r in doc["runs"]] == [
        (1, "direct"),
        (1, "proxy"),
        (1, "direct"),
        (2, "direct"),
        (2, "proxy"),
        (2, "direct"),
    ]
    ratios = [r["ratio"] for r in doc["runs"] if r["path"] == "proxy"]
    row = doc["summary"]["W2"]
    assert row["rounds"] == 2 and (row["ratio_min"], row["ratio_max"]) == (min(ratios), max(ratios))
    assert all(r.get("drift") for r in doc["runs"] if r["leg"] == 3)


@pytest.mark.slow
def test_bench_with_a_haproxy_that_does_not_start_ends_in_one_line(tmp_path) -> None:
    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\necho '[ALERT] fake haproxy refuses' >&2\nexit 1\n")
    fake.chmod(0o755)
    cmd = [sys.executable, "-m", "harness.cli", "bench", "--duration", "0.3", "--only", "W2", "--haproxy", str(fake)]
    proc = subprocess.run(cmd + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()  # one line, no traceback
    assert line.startswith("foo-harness bench: haproxy: exited before port ")
    assert line.endswith(" listened; it said: [ALERT] fake haproxy refuses")

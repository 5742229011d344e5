"""The bench's load generator verifies answers for real, and ``foo-harness bench`` runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.bench.bench import choose_peers, proxy_options, server_args
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


@pytest.mark.slow
def test_bench_quick_run_writes_json(tmp_path) -> None:
    cmd = [sys.executable, "-m", "harness.cli", "bench", "--duration", "1", "--only", "W2,W6"]
    cmd += ["--idle-seconds", "0.5", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "W2 lockstep" in proc.stdout and "W6 idle CPU" in proc.stdout
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["ok"] and [r["path"] for r in doc["runs"]] == ["direct", "proxy"]
    proxied = doc["runs"][1]
    assert proxied["errors"] == 0 and proxied["proxy_us_per_msg"] > 0
    assert proxied["proxy_counts"]["msg_req"] == proxied["load"]["sent"]


@pytest.mark.slow
def test_bench_rounds_interleave_and_summarise(tmp_path) -> None:
    cmd = [sys.executable, "-m", "harness.cli", "bench", "--duration", "0.5", "--only", "W2", "--rounds", "2"]
    cmd += ["--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert [(r["round"], r["path"]) for r in doc["runs"]] == [(1, "direct"), (1, "proxy"), (2, "direct"), (2, "proxy")]
    ratios = [r["ratio"] for r in doc["runs"] if r["path"] == "proxy"]
    row = doc["summary"]["W2"]
    assert row["rounds"] == 2 and (row["ratio_min"], row["ratio_max"]) == (min(ratios), max(ratios))
    assert "W2 over 2 rounds: ratio median" in proc.stdout

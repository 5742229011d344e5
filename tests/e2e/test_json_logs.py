"""``-log-format json``: every stderr line of a real fooproxy is one JSON object; the close line has its fields."""

from __future__ import annotations

import json

import pytest

from tests.helpers import connect, recv_lines

pytestmark = pytest.mark.e2e

CLOSE_FIELDS = ("peer", "duration_s", "ended", "bytes_c2s", "bytes_s2c", "msgs_c2s", "msgs_s2c", "latency_max_ms")


def test_json_log_lines(procs, server):
    proxy = procs.proxy(server.address, "-log-format", "json")
    c = connect(proxy.address)
    for seq in range(3):
        c.sendall(b"REQ %d abc\n" % seq)
        assert len(recv_lines(c, 1)) == 1
    c.close()
    proxy.wait_for_output(r'"ended": "client closed"', 10, "stderr")
    proxy.stop()
    lines = [line for line in proxy.stderr_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one object
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records), records
    assert any("listening on" in r["msg"] for r in records)
    [close] = [r for r in records if "ended" in r]
    assert set(CLOSE_FIELDS) <= set(close), close
    assert close["ended"] == "client closed" and close["level"] == "INFO"
    assert close["msgs_c2s"] == 3 == close["msgs_s2c"] and close["bytes_c2s"] == 3 * len(b"REQ 0 abc\n")
    assert 0 < close["latency_max_ms"] < 1000 and close["duration_s"] > 0
    assert close["ts"].endswith("+00:00")


def test_text_stays_the_default(procs, server):
    proxy = procs.proxy(server.address)
    proxy.stop()
    first = proxy.stderr_text().splitlines()[0]
    assert not first.startswith("{") and "INFO fooproxy" in first

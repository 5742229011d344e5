"""``-log-format json``: every stderr line of a real fooproxy is one JSON object; the close line has its fields."""

from __future__ import annotations

import json
import re

import pytest

from harness.processes import free_port
from tests.helpers import connect, recv_lines

pytestmark = pytest.mark.e2e

CLOSE_FIELDS = ("peer", "duration_s", "ended", "bytes_c2s", "bytes_s2c", "msgs_c2s", "msgs_s2c", "latency_max_ms")


def test_json_log_lines(procs, server):
    proxy = procs.proxy(server.address, "-log-format", "json")
    c = connect(proxy.address)
    c_name = c.getsockname()[:2]
    for seq in range(3):
        c.sendall(b"REQ %d abc\n" % seq)
        assert len(recv_lines(c, 1)) == 1
    c.close()
    proxy.wait_for_output(r'"ended": ?"client closed"', 10, "stderr")
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
    assert close["peer"] == "%s:%d" % c_name and close["logger"] == "fooproxy.proxy"
    assert close["msg"].startswith("%s: closed (client closed) after " % close["peer"])


def test_json_close_line_of_a_client_whose_upstream_refused(procs) -> None:
    # No session was started (no bus): the line has the client's peer, ended and duration only.
    nobody = "127.0.0.1:%d" % free_port()
    proxy = procs.proxy(nobody, "-log-format", "json")
    c = connect(proxy.address)
    c_name = c.getsockname()[:2]
    assert c.recv(1) == b""  # closed by the proxy once the connect failed
    c.close()
    match = proxy.wait_for_output(re.compile(r'^\{.*"ended": ?"upstream unreachable".*$', re.M), 10, "stderr")
    close = json.loads(match.group(0))
    assert close["peer"] == "%s:%d" % c_name and close["level"] == "INFO" and close["ended"] == "upstream unreachable"
    assert close["duration_s"] >= 0 and "bytes_c2s" not in close
    assert close["msg"] == "%s: closed (%s) after %.3fs" % (close["peer"], close["ended"], close["duration_s"])


def test_text_stays_the_default(procs, server):
    proxy = procs.proxy(server.address)
    c = connect(proxy.address)
    c_name = c.getsockname()[:2]
    c.sendall(b"REQ 0 abc\n")
    assert len(recv_lines(c, 1)) == 1
    c.close()
    text_close = r"INFO fooproxy\.proxy\[\d+\]: (\S+): closed \(client closed\) after [\d.]+s: (.*)"
    close = proxy.wait_for_output(text_close, 10)
    assert close.group(1) == "%s:%d" % c_name
    assert re.fullmatch(r"client->server 10 bytes 1 msgs, server->client \d+ bytes 1 msgs", close.group(2)), close
    proxy.stop()
    first = proxy.stderr_text().splitlines()[0]
    assert not first.startswith("{") and "INFO fooproxy" in first

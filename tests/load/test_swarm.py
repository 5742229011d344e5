"""A CI-sized locust swarm through fooproxy: zero failures, and the proxy's counts
equal what locust counted, exactly.

locust runs as a subprocess (``harness.bench.swarm``); it is never imported here, since
importing it monkey-patches the test process.
"""

from __future__ import annotations

import pytest

from harness.bench.swarm import SwarmResult, check, parse_json_stats, report, swarm


@pytest.mark.slow
def test_swarm_through_fooproxy_counts_exactly(tmp_path) -> None:
    res = swarm(users=20, spawn_rate=20, duration=8, scenario="all", window=16, churn=10, keep_logs=tmp_path)
    detail = "%s\n%s\n%s" % (report(res), "\n".join(res.problems), res.locust_output[-2000:])
    assert res.ok, detail
    assert res.failures == 0 and res.other_failures == 0, detail
    assert res.requests == res.proxy["msg_req"], detail
    assert res.answers == res.proxy["msg_ack"] + res.proxy["msg_nak"], detail
    assert res.proxy["msg_nak"] > 0, detail  # about 1 answer in 8 is a NAK: both kinds passed
    names = {e["name"] for e in res.entries if e["num_requests"]}
    assert {"lockstep REQ", "pipelined REQ", "churn REQ", "mixed REQ"} <= names, detail
    assert res.requests > 1000, detail
    # --keep-logs keeps what it says: locust's two streams and each process's output.
    assert parse_json_stats((tmp_path / "locust.out").read_text()) == res.entries
    assert (tmp_path / "locust.err").exists()
    (proxy_out,) = tmp_path.glob("fooproxy-*.out")
    assert '"msg_req": %d' % res.requests in proxy_out.read_text()  # the SIGUSR2 line the check used
    (server_err,) = tmp_path.glob("server-*.err")
    assert "listening on" in server_err.read_text()


def _entry(name: str, requests: int, failures: int = 0) -> dict:
    return {"name": name, "num_requests": requests, "num_failures": failures}


def test_check_is_exact_both_ways() -> None:
    entries = [_entry("lockstep REQ", 70), _entry("churn REQ", 30), _entry("churn CONNECT", 3)]
    good = {"msg_req": 100, "msg_ack": 88, "msg_nak": 12, "msg_invalid": 0}
    assert check(entries, good, 0).ok
    assert isinstance(check(entries, good, 0), SwarmResult)
    one_more = dict(good, msg_req=101)
    assert any("msg_req" in p for p in check(entries, one_more, 0).problems)
    one_less = dict(good, msg_ack=87)
    assert any("msg_ack+msg_nak" in p for p in check(entries, one_less, 0).problems)
    failed = [_entry("lockstep REQ", 70, failures=1), _entry("churn REQ", 30)]
    assert not check(failed, dict(good, msg_ack=87), 1).ok
    assert not check([], {"msg_req": 0, "msg_ack": 0, "msg_nak": 0}, 0).ok

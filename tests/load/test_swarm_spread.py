"""``foo-harness swarm --processes 2``: locust's distributed mode (one master, two worker processes)
through fooproxy; the master's aggregated counts equal the proxy's SIGUSR2 counts exactly.

locust runs only as subprocesses; skipped, saying why, where it is not installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from harness.bench.spread import local_inventory, spread_swarm
from harness.processes import free_port

needs_locust = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust is not installed (pip install -e '.[load]')"
)


@pytest.mark.slow
@needs_locust
def test_swarm_over_two_locust_workers_counts_exactly(tmp_path) -> None:
    inv = local_inventory(2)
    assert inv.role_hosts("workers") == ["local", "local"]
    res = spread_swarm(inv, users=20, spawn_rate=20, duration=6, scenario="all", expect_workers=2)
    swarm = res.swarm
    detail = "%s\n%s\n%s" % (swarm.problems, res.problems, swarm.locust_output[-2000:])
    assert res.ok, detail
    assert swarm.failures == 0 and swarm.other_failures == 0, detail
    assert swarm.requests == res.per_proxy[0]["msg_req"], detail
    assert swarm.answers == res.per_proxy[0]["msg_ack"] + res.per_proxy[0]["msg_nak"], detail
    assert res.per_proxy[0]["msg_nak"] > 0, detail
    names = {e["name"] for e in swarm.entries if e["num_requests"]}
    assert {"lockstep REQ", "pipelined REQ", "churn REQ", "mixed REQ"} <= names, detail
    assert swarm.requests > 1000, detail


def _swarm(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "harness.bench.swarm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--master-bind", "0.0.0.0:5557", "--processes", "2"], "not 0.0.0.0"),
        (["--master-bind", "127.0.0.1:5557"], "needs --processes N"),
        (["--processes", "-1"], "counts >= 0"),
        (["--worker", "nowhere"], "HOST:PORT"),
        (["--roles", "server"], "not ROLE=HOST"),
        (["--roles", "cook=local"], "unknown role 'cook'"),
        (["--inventory", "/nonexistent/inv.toml"], "No such file"),
    ],
)
def test_spread_flags_reject_bad_input_in_one_line(args: list[str], message: str) -> None:
    done = _swarm(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.skipif(importlib.util.find_spec("fabric") is None, reason="Fabric is not installed (.[hosts])")
def test_an_unreachable_ssh_host_is_one_line_before_anything_starts() -> None:
    port = free_port()  # nothing listens there
    done = _swarm("--roles", "server=ssh://root@127.0.0.1:%d proxies=local master=local workers=local" % port)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "127.0.0.1" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr

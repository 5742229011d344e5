"""Roles across hosts: the server, two fooproxies, the locust master and its workers, the clients and
Prometheus in separate network namespaces joined by a bridge (``harness.hosts``, ``harness.fleet``).

Traffic crosses real interfaces: each proxy listens on ``:8002`` in its own
namespace and forwards to the server's bridge address. Needs root and
``ip netns``; skipped, saying why, elsewhere. Whatever happens, every
namespace and link the test made is gone afterwards (checked at teardown).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from harness import netns
from harness.bench.spread import spread_swarm
from harness.binaries import console_script
from harness.fleet import Fleet, inventory_from_dict, summed
from harness.processes import ProcessError
from harness.prometheus import Api, find_prometheus

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LISTEN = """
import socket
s = socket.create_server(("", 7000))
print("listening", flush=True)
c, _ = s.accept()
assert c.recv(5) == b"hello"
"""
CONNECT = "import socket; socket.create_connection(('%s', 7000), timeout=5).sendall(b'hello')"


@pytest.fixture(scope="module")
def netns_ok() -> None:
    reason = netns.netns_supported()
    if reason:
        pytest.skip("cannot make network namespaces here: %s" % reason)


@pytest.fixture
def no_leftovers(netns_ok) -> Iterator[str]:
    """This process's namespace/link prefix; after the test, nothing with it may remain."""
    prefix = netns.run_prefix()
    assert not netns.leftovers(prefix), "left by an earlier test: %s" % netns.leftovers(prefix)
    yield prefix
    left = netns.leftovers(prefix)
    for item in left:  # clean up anyway, so one failure does not cascade
        kind, name = item.split(" ", 1)
        netns.ip(*(("netns", "del", name) if kind == "netns" else ("link", "del", name)), check=False)
    assert not left, "the test left behind: %s" % left


def test_network_is_removed_even_when_the_body_fails(no_leftovers: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with netns.Network() as net:
            a, b = net.add("a"), net.add("b")
            assert len(net.bridge) <= 15 and all(len(n) <= 15 for n in netns.links() if n.startswith(net.prefix))
            # A real path from one namespace to the other: a listener in b, a connect from a.
            with b.run([sys.executable, "-c", LISTEN], ready_regex="listening", ready_stream="stdout") as listener:
                done = subprocess.run(a.wrap([sys.executable, "-c", CONNECT % b.address]), capture_output=True)
                assert done.returncode == 0, done.stderr
                assert listener.wait(10) == 0, listener.tail()
            assert sorted(n for n in netns.namespaces() if n.startswith(net.prefix)) == [a.netns, b.netns]
            raise RuntimeError("boom")
    assert netns.leftovers(no_leftovers) == []


def test_a_fleet_whose_proxy_cannot_start_removes_what_it_made(no_leftovers: str, tmp_path) -> None:
    inv = inventory_from_dict(
        {
            "hosts": {"srv": "netns:srv", "px": "netns:px"},
            "roles": {"server": "srv", "proxies": ["px"]},
            "proxy": {"args": ["-no-such-flag"]},
        }
    )
    with pytest.raises(ProcessError, match="fooproxy1") as err:
        with Fleet(inv, log_dir=str(tmp_path)):
            pass
    assert "no-such-flag" in str(err.value)  # the proxy's own one-line complaint is in the message
    assert netns.leftovers(no_leftovers) == []


def _http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def test_roles_in_five_namespaces_count_exactly_and_prometheus_sums_them(no_leftovers: str, tmp_path) -> None:
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[test]')")
    prometheus, reason = find_prometheus()
    if prometheus is None:
        pytest.skip(reason)
    inv = inventory_from_dict(
        {
            "hosts": {n: "netns:%s" % n for n in ("srv", "px1", "px2", "lm", "lw")},
            "roles": {
                "server": "srv",
                "proxies": ["px1", "px2"],
                "master": "lm",
                "workers": ["lw", "lw"],
                "clients": "lm",
                "prometheus": "lm",
            },
        }
    )
    clients = 6
    with Fleet(inv, log_dir=str(tmp_path)) as fleet:
        names = {role: fleet.host(role).netns for role in ("server", "master", "prometheus")}
        assert len({fleet.host("server").netns, fleet.host("proxies", 0).netns, fleet.host("proxies", 1).netns}) == 3
        assert names["master"] != fleet.host("workers").netns
        # Each proxy listens on all interfaces, port 8002, in its own namespace, and forwards to the server's
        # bridge address (not loopback).
        for proxy in fleet.proxies:
            assert proxy.cmd[proxy.cmd.index("-listen") + 1] == ":8002", proxy.cmd
            assert proxy.cmd[proxy.cmd.index("-forward") + 1] == fleet.server_address, proxy.cmd
        assert not fleet.server_address.startswith("127.")
        api = Api(fleet.prometheus_url)
        api.wait_ready(fleet.prometheus)
        api.wait_value('count(up{job="fooproxy"} == 1)', 2)

        res = spread_swarm(inv, users=12, spawn_rate=12, duration=5, clients=clients, fleet=fleet)
        detail = "%s\n%s\n%s" % (res.swarm.problems, res.problems, fleet.describe())
        assert res.ok, detail + "\n" + "\n".join(p.tail() for p in fleet.processes)
        per_proxy = res.per_proxy
        total = summed(per_proxy)
        assert all(s["msg_req"] > 0 for s in per_proxy), per_proxy  # both proxies carried load
        for s in per_proxy:  # and each one balances on its own: every request it passed on was answered
            assert s["msg_ack"] + s["msg_nak"] == s["msg_req"] and s["msg_total"] == 2 * s["msg_req"], s
            assert s["msg_invalid"] == 0 and s["connections_active"] == 0, s
        assert total["msg_req"] == res.swarm.requests + clients * 100, detail
        assert total["msg_ack"] + total["msg_nak"] == res.swarm.answers + clients * 100, detail
        assert res.swarm.failures == 0 and res.swarm.other_failures == 0, detail
        assert len(res.clients) == clients and all(r.ok for r in res.clients), [r.describe() for r in res.clients]
        # /stats over the bridge says the same as SIGUSR2.
        for stats, http in zip(per_proxy, fleet.http_addresses, strict=True):
            body = _http_json("http://%s/stats" % http)
            assert {k: body[k] for k in ("msg_req", "msg_ack", "msg_nak")} == {
                k: stats[k] for k in ("msg_req", "msg_ack", "msg_nak")
            }
        # Prometheus, in the master's namespace, scraped both proxies across the bridge.
        api.wait_value('sum(fooproxy_messages_total{type="req"})', total["msg_req"])
        assert api.scalar('sum(fooproxy_messages_total{type="ack"})') == total["msg_ack"]
        assert api.scalar('sum(fooproxy_messages_total{type="nak"})') == total["msg_nak"]
        assert api.scalar('count(fooproxy_messages_total{type="req"})') == 2
    assert netns.leftovers(no_leftovers) == []


def test_master_bind_and_worker_spread_one_swarm_over_two_namespaces(no_leftovers: str) -> None:
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[test]')")
    harness_cli = console_script("foo-harness", "harness.cli")
    with netns.Network() as net:
        here, there = net.add("m"), net.add("w")
        swarm = [*harness_cli, "swarm", "--users", "10", "--spawn-rate", "10", "--duration", "4"]
        master_at = "%s:5557" % here.address
        with here.run(
            [*swarm, "--processes", "2", "--master-bind", master_at],
            name="swarm-master",
            ready_regex="waiting for 2 workers: foo-harness swarm --worker %s" % master_at.replace(".", r"\."),
            ready_stream="stdout",
        ) as master:
            workers = [there.run([*harness_cli, "swarm", "--worker", master_at], name="w%d" % i) for i in (1, 2)]
            try:
                assert master.wait(90) == 0, master.tail(40)
                assert all(w.wait(30) == 0 for w in workers), "\n".join(w.tail() for w in workers)
            finally:
                for w in workers:
                    w.close()
            out = master.stdout_text()
            assert "swarm: OK" in out and "over 1 proxies" in out, out
            # The server and fooproxy listened on the master's bridge address, where the workers reached them.
            assert "proxies    local (local, %s)" % here.address in out, out

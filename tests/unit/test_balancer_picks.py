"""Balancer decisions without sockets: policy order, retries, panic, passive detection, stats cells."""

from __future__ import annotations

import pytest

from fooproxy.balancer import Balancer
from fooproxy.config import Address, Config
from fooproxy.stats import Stats
from fooproxy.upstream import UpstreamError

A, B, C = (Address("127.0.0.1", p) for p in (1, 2, 3))


def balancer(policy: str = "roundrobin", retries: int = 1, **kw) -> Balancer:
    return Balancer(Config(forward=(A, B, C), balance=policy, connect_retries=retries, **kw), Stats(), checks=False)


def picks(b: Balancer, n: int) -> list[str]:
    return [b._pick([]).name for _ in range(n)]


def down(b: Balancer, *names: str) -> None:
    for u in b.upstreams:
        if u.name in names:
            u.passive_since = 0.0


def test_roundrobin_one_step_per_session():
    b = balancer()
    assert picks(b, 6) == ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:1"] * 2


def test_roundrobin_skips_one_out_of_rotation():
    b = balancer()
    down(b, "127.0.0.1:2")
    assert sorted(picks(b, 6)) == ["127.0.0.1:1"] * 3 + ["127.0.0.1:3"] * 3


def test_leastconn_picks_the_least_busy_ties_in_rotation():
    b = balancer("leastconn")
    b.upstreams[0].active, b.upstreams[1].active, b.upstreams[2].active = 5, 1, 1
    assert sorted(set(picks(b, 4))) == ["127.0.0.1:2", "127.0.0.1:3"]


def test_first_is_the_order_given():
    b = balancer("first")
    assert picks(b, 3) == ["127.0.0.1:1"] * 3
    down(b, "127.0.0.1:1")
    assert picks(b, 2) == ["127.0.0.1:2"] * 2


def test_retry_goes_to_the_next_healthy_then_gives_up():
    b = balancer("first", retries=1)
    first = b._pick([])
    second = b._pick([first])
    assert (first.name, second.name) == ("127.0.0.1:1", "127.0.0.1:2")
    assert b._pick([first, second]) is None  # -connect-retries 1: two attempts in all
    assert balancer("first", retries=0)._pick([first]) is None


def test_panic_tries_the_down_ones_when_none_is_up():
    b = balancer("first", retries=2)
    down(b, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    tried = []
    for _ in range(3):
        tried.append(b._pick(tried))
    assert [u.name for u in tried] == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


def test_retry_prefers_healthy_then_the_rest():
    b = balancer("first", retries=2)
    down(b, "127.0.0.1:2")
    first = b._pick([])
    assert [first.name, b._pick([first]).name] == ["127.0.0.1:1", "127.0.0.1:3"]
    assert b._pick([first, b.upstreams[2]]).name == "127.0.0.1:2"


def test_passive_detection_counts_within_the_interval():
    b = balancer(max_fails=2, health_interval=2.0)
    u = b.upstreams[0]
    error = UpstreamError("refused")
    u.failed(error, now=10.0)
    u.failed(error, now=12.5)  # outside the 2 s window: a new window
    assert u.up
    u.failed(error, now=13.0)
    assert not u.up and u.state == "down"
    stats = b.stats.snapshot().as_dict()["upstreams"]
    assert stats["127.0.0.1:1"]["up"] is False and stats["127.0.0.1:2"]["up"] is True
    u.checked(True, began=12.9)  # a check that began before the mark does not count
    assert not u.up
    u.checked(True, began=13.1)
    assert u.up and b.stats.snapshot().as_dict()["upstreams"]["127.0.0.1:1"]["up"] is True


def test_max_fails_zero_never_takes_one_out():
    b = balancer(max_fails=0)
    u = b.upstreams[0]
    for t in range(100):
        u.failed(UpstreamError("refused"), now=float(t) / 100)
    assert u.up


@pytest.mark.parametrize("policy", ["roundrobin", "leastconn", "first"])
def test_a_single_upstream_is_always_picked(policy):
    b = Balancer(Config(forward=(A,), balance=policy), Stats(), checks=False)
    down(b, "127.0.0.1:1")  # down: still tried (panic), there is nothing else
    assert picks(b, 3) == ["127.0.0.1:1"] * 3

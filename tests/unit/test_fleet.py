"""The inventory (TOML / ``--roles``) and host specs of ``harness.fleet`` / ``harness.hosts``."""

from __future__ import annotations

import pytest

from harness.fleet import DEFAULT_PORTS, InventoryError, apply_roles_spec, inventory_from_dict, load_inventory
from harness.hosts import HostError, LocalHost, parse_host
from harness.ssh import SshHost

EXAMPLE = """
[hosts]
srv  = "netns:srv"
px1  = "netns:px1"
far  = { url = "ssh://root@10.0.0.9:2222", key = "/tmp/id", address = "192.168.1.9" }
here = "local"

[roles]
server = "srv"
proxies = ["px1", "far"]
master = "here"
workers = ["far", "far"]
prometheus = "here"

[proxy]
args = ["-workers", "2"]

[ports]
proxy = 9002
"""


def test_an_inventory_file_gives_hosts_roles_args_and_ports(tmp_path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(EXAMPLE)
    inv = load_inventory(path)
    assert inv.role_hosts("proxies") == ["px1", "far"]
    assert inv.role_hosts("workers") == ["far", "far"]
    assert inv.role_hosts("server") == ["srv"] and inv.role_hosts("clients") == []
    assert inv.proxy_args == ["-workers", "2"]
    assert inv.ports == dict(DEFAULT_PORTS, proxy=9002)
    far = parse_host("far", inv.hosts["far"])
    assert isinstance(far, SshHost)
    assert (far.user, far.host, far.port, far.address) == ("root", "10.0.0.9", 2222, "192.168.1.9")
    assert far.connect_kwargs == {"key_filename": "/tmp/id"}
    here = parse_host("here", inv.hosts["here"])
    assert isinstance(here, LocalHost) and here.address == "127.0.0.1"


def test_roles_flag_places_roles_by_url_over_the_file() -> None:
    inv = inventory_from_dict({"hosts": {"a": "local"}, "roles": {"server": "a", "proxies": ["a"]}})
    apply_roles_spec(inv, "proxies=netns:p1,netns:p2 master=a workers=ssh://u@h,ssh://u@h")
    assert inv.role_hosts("proxies") == ["netns:p1", "netns:p2"]
    assert inv.hosts["netns:p1"] == "netns:p1" and inv.hosts["ssh://u@h"] == "ssh://u@h"
    assert inv.role_hosts("server") == ["a"] and inv.role_hosts("master") == ["a"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"host": {}}, "unknown section(s) host"),
        ({"roles": {"cook": "a"}}, "unknown role 'cook'"),
        ({"roles": {"server": ["a", "b"]}}, "role server takes one host"),
        ({"roles": {"proxies": [1]}}, "needs host name(s)"),
        ({"proxy": {"args": "-workers 2"}}, "must be a list of strings"),
        ({"proxy": {"argz": []}}, "unknown key(s) in [proxy]: argz"),
        ({"ports": {"proxy": 70000}}, "[ports] proxy = 70000"),
    ],
)
def test_bad_inventories_are_refused_with_the_reason(data: dict, message: str) -> None:
    with pytest.raises(InventoryError) as err:
        inventory_from_dict(data, "inv.toml")
    assert message in str(err.value)


def test_a_file_that_is_not_toml_says_so(tmp_path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text("[hosts\n")
    with pytest.raises(InventoryError, match="not valid TOML"):
        load_inventory(path)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ftp://x", "is not local, netns:NAME or ssh://user@host"),
        ("netns:", "bad namespace name"),
        ("netns:a b", "bad namespace name"),
        ("netns:ok", "need a Network"),
        ("ssh://root@", "no host name"),
        ("ssh://root@h:x", "bad port"),
        ({"address": "1.2.3.4"}, "a table needs url"),
        ({"url": "local", "colour": "red"}, "unknown key(s) colour"),
        (5, "expected a string or a table"),
    ],
)
def test_bad_host_specs_are_refused_with_the_reason(spec, message: str) -> None:
    with pytest.raises(HostError) as err:
        parse_host("h", spec)
    assert message in str(err.value)

"""Network namespaces as hosts: ``Network`` makes them, wired to one bridge, and removes them all.

``Network`` is a context manager: one bridge in the root namespace (it has the
subnet's first address, so the harness itself reaches every namespace), one
veth pair per namespace, addresses from a private /24, and on exit it removes
everything it made (namespaces, veths, bridge), whatever happened. Every name
starts ``fh<pid><n>`` (n: which Network of this process), so two runs never
collide and ``leftovers()`` can prove that nothing stayed behind. A
``NetnsHost`` runs commands under ``ip netns exec NAME``: iproute2 execs the
command, so the PID is the command's own and signals reach it directly.
Everything goes through iproute2's ``ip``; no Python dependency.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

from harness.hosts import Host, HostError


def ip(*args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Run ``ip ARGS...`` (iproute2); ``HostError`` with its message when it fails and ``check``."""
    cmd = ["ip", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise HostError("`ip` (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise HostError("`%s` did not finish within %gs" % (" ".join(cmd), timeout)) from None
    if check and done.returncode != 0:
        raise HostError("`%s` failed: %s" % (" ".join(cmd), done.stderr.strip() or done.stdout.strip()))
    return done


class NetnsHost(Host):
    """A Linux network namespace made by ``Network``; commands run under ``ip netns exec``."""

    kind = "netns"

    def __init__(self, name: str, netns: str, address: str) -> None:
        super().__init__(name, address)
        self.netns = netns

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *[str(c) for c in cmd]]


class Network:
    """The namespaces of one run, joined by a bridge; a context manager that removes all it made.

    ``add(name)`` creates namespace ``fh<pid><n>-<name>`` with a veth to the bridge
    and returns its ``NetnsHost``. The bridge (``fh<pid><n>br``) holds the first
    address of ``subnet`` (default: a free 10.201.X.0/24), the namespaces the
    following ones. Interface names stay within Linux's 15 characters.
    """

    _made = itertools.count()  # networks made by this process: one more character in the prefix

    def __init__(self, subnet: str | None = None, prefix: str | None = None) -> None:
        self.prefix = prefix or run_prefix() + "0123456789abcdefghijklmnopqrstuvwxyz"[next(Network._made) % 36]
        if len(self.prefix) > 8:
            raise HostError("network prefix %r too long: interface names are at most 15 characters" % self.prefix)
        self.bridge = self.prefix + "br"
        self.subnet = ipaddress.ip_network(subnet) if subnet else None
        self.hosts: dict[str, NetnsHost] = {}
        self._veths: list[str] = []
        self._namespaces: list[str] = []
        self._bridge_made = False

    # -- lifecycle --
    def __enter__(self) -> Network:
        try:
            self.create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.teardown()

    def create(self) -> None:
        """Make the bridge with the subnet's first address, up."""
        if self.subnet is None:
            self.subnet = free_subnet()
        ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        ip("addr", "add", "%s/%d" % (self.gateway, self.subnet.prefixlen), "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    @property
    def gateway(self) -> str:
        """The bridge's address: how the namespaces reach the root namespace (and the harness them)."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def add(self, name: str) -> NetnsHost:
        """A new namespace ``fh<pid><n>-<name>`` wired to the bridge, with loopback up; its host."""
        if name in self.hosts:
            return self.hosts[name]
        assert self.subnet is not None, "use Network as a context manager (or call create())"
        index = len(self.hosts)
        netns = "%s-%s" % (self.prefix, name)
        outside, inside = "%sh%d" % (self.prefix, index), "%sn%d" % (self.prefix, index)
        address = str(self.subnet.network_address + 2 + index)
        ip("netns", "add", netns)
        self._namespaces.append(netns)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", netns)
        self._veths.append(outside)
        ip("link", "set", outside, "master", self.bridge, "up")
        ip("-n", netns, "addr", "add", "%s/%d" % (address, self.subnet.prefixlen), "dev", inside)
        ip("-n", netns, "link", "set", inside, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "route", "add", "default", "via", self.gateway)
        host = NetnsHost(name, netns, address)
        self.hosts[name] = host
        return host

    def teardown(self) -> None:
        """Remove every namespace (after killing what still runs in it), veth and the bridge made here."""
        errors = []
        for netns in reversed(self._namespaces):
            _kill_namespace_pids(netns)
            done = ip("netns", "del", netns, check=False)
            if done.returncode != 0 and netns in namespaces():
                errors.append("netns del %s: %s" % (netns, done.stderr.strip()))
        self._namespaces.clear()
        for veth in self._veths:  # gone with their namespace's end, normally
            if veth in links():
                ip("link", "del", veth, check=False)
        self._veths.clear()
        if self._bridge_made:
            ip("link", "del", self.bridge, check=False)
            self._bridge_made = False
        self.hosts.clear()
        if errors:
            raise HostError("; ".join(errors))

    def leftovers(self) -> list[str]:
        """Namespaces and links with this run's prefix that still exist (``[]`` after ``teardown``)."""
        return leftovers(self.prefix)


def run_prefix() -> str:
    """``fh<pid>``: the start of every namespace and link name this process makes (7 characters)."""
    return "fh%05d" % (os.getpid() % 100000)


def namespaces() -> list[str]:
    """The names of the existing network namespaces (``ip netns list``)."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def links() -> list[str]:
    """The names of the root namespace's network interfaces (veth peers without their ``@...``)."""
    out = ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def leftovers(prefix: str) -> list[str]:
    """Namespaces and root-namespace links whose names start with ``prefix``."""
    found = ["netns %s" % n for n in namespaces() if n.startswith(prefix)]
    found += ["link %s" % n for n in links() if n.startswith(prefix)]
    return found


def free_subnet(base: str = "10.201.0.0/16") -> ipaddress.IPv4Network:
    """A /24 in ``base`` that no route of this machine overlaps, starting at an offset from the PID."""
    used = []
    for line in ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast"):
            word = line.split()[1]
        try:
            used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    subnets = list(ipaddress.ip_network(base).subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for i in range(len(subnets)):
        candidate = subnets[(start + i) % len(subnets)]
        if not any(candidate.overlaps(u) for u in used if u.prefixlen > 0):
            return candidate
    raise HostError("no free /24 left in %s" % base)


def _kill_namespace_pids(netns: str) -> None:
    """SIGKILL what still runs in our namespace ``netns`` (only processes this run started live there)."""
    out = ip("netns", "pids", netns, check=False).stdout
    for word in out.split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def netns_supported() -> str:
    """``""`` when this process can make network namespaces and bridges, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    try:
        probe = run_prefix() + "p"
        done = ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return "`ip netns add` failed: %s" % done.stderr.strip()
        ip("netns", "del", probe, check=False)
        done = ip("link", "add", probe + "b", "type", "bridge", check=False)
        if done.returncode != 0:
            return "`ip link add ... type bridge` failed: %s" % done.stderr.strip()
        ip("link", "del", probe + "b", check=False)
    except HostError as exc:
        return str(exc)
    return ""

"""A fleet: the roles of a Foo test (server, fooproxies, load, Prometheus) placed on hosts.

The placement comes from an inventory (a TOML file, read with the stdlib's
``tomllib``) and/or a ``--roles`` spec; the hosts are ``local``,
``netns:NAME`` or ``ssh://user@host`` (``harness.hosts``)::

    [hosts]
    srv  = "netns:srv"
    px1  = "netns:px1"
    px2  = "netns:px2"
    load = "netns:load"
    far  = { url = "ssh://root@10.0.0.9", key = "/root/.ssh/id_ed25519" }

    [roles]
    server     = "srv"
    proxies    = ["px1", "px2"]
    master     = "load"            # the locust master
    workers    = ["far", "far"]    # one locust worker process per entry
    clients    = "load"            # where Foo client runs go
    prometheus = "load"

    [proxy]
    args = ["-workers", "2"]       # added to every fooproxy command line

    [ports]                        # on netns and ssh hosts (local hosts take free ports)
    server = 8001
    proxy = 8002

``Fleet`` is the context manager that makes the namespaces, starts the roles
in order (server, proxies, Prometheus; load on demand) and stops and removes
everything on exit, failure or not.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.binaries import Peers, console_script, find_peers, fooproxy_command
from harness.hosts import Host, HostError, LocalHost, parse_host
from harness.netns import Network
from harness.processes import Process, free_port
from harness.sigusr2 import read_stats
from harness.tasks import ClientResult, proxy_env, split_address

ROLES = ("server", "proxies", "master", "workers", "clients", "prometheus")
LIST_ROLES = ("proxies", "workers")
DEFAULT_PORTS = {"server": 8001, "proxy": 8002, "http": 8088, "master": 5557, "prometheus": 9090}
LOCUSTFILE = Path(__file__).resolve().parent / "bench" / "locustfile.py"
COUNTED = ("msg_total", "msg_req", "msg_ack", "msg_nak", "msg_invalid", "connections_total", "connections_active")


class InventoryError(ValueError):
    """The inventory or ``--roles`` spec is not usable (one line, says where)."""


@dataclass
class Inventory:
    """Hosts by name, and which host(s) each role runs on."""

    hosts: dict[str, Any] = field(default_factory=dict)  # name -> url or table (see harness.hosts.parse_host)
    roles: dict[str, Any] = field(default_factory=dict)  # role -> host name (list for proxies/workers)
    proxy_args: list[str] = field(default_factory=list)
    http_allow: str | None = None
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    fixed_ports: set[str] = field(default_factory=set)  # kinds whose port holds on local hosts too

    def role_hosts(self, role: str) -> list[str]:
        """The host names of ``role`` (``[]`` when it is not placed)."""
        value = self.roles.get(role)
        if value is None:
            return []
        return list(value) if isinstance(value, list) else [value]


def load_inventory(path: str | os.PathLike) -> Inventory:
    """Read an inventory TOML file; ``InventoryError`` with the reason when it is not valid."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise InventoryError("inventory %s: %s" % (path, exc.strerror or exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError("inventory %s: not valid TOML: %s" % (path, exc)) from None
    return inventory_from_dict(data, str(path))


def inventory_from_dict(data: Mapping[str, Any], where: str = "inventory") -> Inventory:
    """An ``Inventory`` from parsed TOML (``[hosts]``, ``[roles]``, ``[proxy]``, ``[ports]``)."""
    unknown = set(data) - {"hosts", "roles", "proxy", "ports"}
    if unknown:
        raise InventoryError("%s: unknown section(s) %s" % (where, ", ".join(sorted(unknown))))
    inv = Inventory(hosts=dict(data.get("hosts", {})))
    for role, value in dict(data.get("roles", {})).items():
        set_role(inv, role, value, where)
    proxy = dict(data.get("proxy", {}))
    args = proxy.pop("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InventoryError("%s: [proxy] args must be a list of strings" % where)
    inv.proxy_args = args
    inv.http_allow = proxy.pop("http_allow", None)
    if proxy:
        raise InventoryError("%s: unknown key(s) in [proxy]: %s" % (where, ", ".join(sorted(proxy))))
    for name, port in dict(data.get("ports", {})).items():
        if name not in DEFAULT_PORTS or not isinstance(port, int) or not 0 < port < 65536:
            raise InventoryError(
                "%s: [ports] %s = %r (one of %s, 1-65535)" % (where, name, port, ", ".join(DEFAULT_PORTS))
            )
        inv.ports[name] = port
    return inv


def set_role(inv: Inventory, role: str, value: Any, where: str = "--roles") -> None:
    """Place ``role`` on ``value`` (a host name or URL, a list of them for proxies/workers)."""
    if role not in ROLES:
        raise InventoryError("%s: unknown role %r (one of %s)" % (where, role, ", ".join(ROLES)))
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise InventoryError("%s: role %s needs host name(s), not %r" % (where, role, value))
    if len(values) > 1 and role not in LIST_ROLES:
        raise InventoryError("%s: role %s takes one host, not %d" % (where, role, len(values)))
    for v in values:
        if v not in inv.hosts:  # a URL used directly: the host is named by it
            inv.hosts[v] = v
    inv.roles[role] = values if role in LIST_ROLES else values[0]


def apply_roles_spec(inv: Inventory, spec: str) -> Inventory:
    """Merge ``--roles "server=netns:a proxies=netns:b,netns:c master=local"`` over ``inv``."""
    for item in spec.split():
        role, sep, value = item.partition("=")
        if not sep or not value:
            raise InventoryError("--roles: %r is not ROLE=HOST[,HOST...]" % item)
        set_role(inv, role, value.split(",") if role in LIST_ROLES else value)
    return inv


@functools.cache
def fooproxy_flags() -> str:
    """fooproxy's ``-h`` text (which flags this build has, e.g. ``--http-allow``)."""
    try:
        return subprocess.run([*fooproxy_command(), "-h"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


class Fleet:
    """The roles of ``inventory`` started on their hosts; a context manager that removes all it made.

    ``peers`` chooses the server and client commands (default ``find_peers()``).
    """

    def __init__(self, inventory: Inventory, peers: Peers | None = None, log_dir: str | None = None) -> None:
        self.inv = inventory
        self.peers = peers or find_peers()
        self.log_dir = log_dir
        self.network: Network | None = None
        self.hosts: dict[str, Host] = {}
        self.processes: list[Process] = []
        self.server: Process | None = None
        self.server_address = ""
        self.proxies: list[Process] = []
        self.proxy_addresses: list[str] = []
        self.http_addresses: list[str] = []
        self.prometheus: Process | None = None
        self.prometheus_url = ""
        self._ports: dict[str, set[int]] = {}
        self._dirs: list[tuple[Host, str]] = []  # made on the hosts, removed by close()

    # -- lifecycle --
    def __enter__(self) -> Fleet:
        try:
            self.make_hosts()
            self.start_server()
            self.start_proxies()
            if self.inv.role_hosts("prometheus"):
                self.start_prometheus()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process (last started first), close ssh connections, remove the namespaces."""
        try:
            for proc in reversed(self.processes):
                try:
                    proc.close()
                except Exception:  # keep tearing down the rest
                    pass
            self.processes.clear()
            for host, path in self._dirs:
                host.remove_dir(path)
            self._dirs.clear()
            for host in self.hosts.values():
                host.close()
        finally:
            if self.network is not None:
                self.network.teardown()

    def make_hosts(self) -> None:
        """The ``Host`` of every placed role (namespaces made as needed)."""
        missing = [r for r in ("server", "proxies") if not self.inv.role_hosts(r)]
        if missing:
            raise InventoryError("no host for role(s) %s" % ", ".join(missing))
        for role in ROLES:
            for name in self.inv.role_hosts(role):
                if name in self.hosts:
                    continue
                if name not in self.inv.hosts:
                    raise InventoryError("role %s: no host %r in [hosts]" % (role, name))
                spec = self.inv.hosts[name]
                url = spec.get("url") if isinstance(spec, Mapping) else spec
                if isinstance(url, str) and url.startswith("netns:") and self.network is None:
                    self.network = Network()
                    self.network.create()
                self.hosts[name] = parse_host(name, spec, self.network)
                self.hosts[name].probe()  # an unreachable host fails here, before any role starts

    def host(self, role: str, index: int = 0) -> Host:
        return self.hosts[self.inv.role_hosts(role)[index]]

    def port(self, host: Host, kind: str) -> int:
        """The port for ``kind`` on ``host``: a free one on local hosts (unless in ``fixed_ports``), else the
        inventory's (the next one up if another role of this fleet holds it there)."""
        if isinstance(host, LocalHost) and kind not in self.inv.fixed_ports:
            return free_port(host.address)
        used = self._ports.setdefault(host.name, set())
        port = self.inv.ports[kind]
        while port in used:
            port += 1
        used.add(port)
        return port

    def bind(self, host: Host, port: int) -> str:
        """The listen address for a role on ``host``: all interfaces except on local hosts (their address)."""
        return "%s:%d" % (host.address, port) if isinstance(host, LocalHost) else ":%d" % port

    def run(self, host: Host, cmd: Sequence[str], **kwargs: Any) -> Process:
        """Start ``cmd`` on ``host`` and keep it for teardown."""
        kwargs.setdefault("log_dir", self.log_dir)
        proc = host.run(cmd, **kwargs)
        self.processes.append(proc)
        return proc

    # -- roles --
    def start_server(self, args: Sequence[str] = ()) -> Process:
        host = self.host("server")
        port = self.port(host, "server")
        self.server_address = "%s:%d" % (host.address, port)
        cmd = self.peers.server_cmd(self.bind(host, port), *args)
        self.server = self.run(host, cmd, name="server", ready_port=(host.address, port))
        return self.server

    def proxy_command(self, listen: str, http: str) -> list[str]:
        """One fooproxy's command line: forward to the server, HTTP on ``http``, no recovery file, quiet."""
        cmd = [*fooproxy_command(), "-listen", listen, "-forward", self.server_address, "-http", http]
        cmd += ["-recovery-path", "off", "-log-level", "warning"]
        allow = self.inv.http_allow or (str(self.network.subnet) if self.network is not None else None)
        if allow and "--http-allow" in fooproxy_flags():
            cmd += ["-http-allow", allow]  # Prometheus scrapes from another host of the subnet
        return [*cmd, *self.inv.proxy_args]

    def start_proxies(self) -> list[Process]:
        for index, name in enumerate(self.inv.role_hosts("proxies")):
            host = self.hosts[name]
            port, http_port = self.port(host, "proxy"), self.port(host, "http")
            cmd = self.proxy_command(self.bind(host, port), self.bind(host, http_port))
            env = {"GEVENT_MONITOR_THREAD_ENABLE": proxy_env()["GEVENT_MONITOR_THREAD_ENABLE"]}
            # Ready once the port accepts: one probe connection, no message, so the counts stay exact.
            proc = self.run(host, cmd, name="fooproxy%d" % (index + 1), env=env, ready_port=(host.address, port))
            self.proxies.append(proc)
            self.proxy_addresses.append("%s:%d" % (host.address, port))
            self.http_addresses.append("%s:%d" % (host.address, http_port))
        return self.proxies

    def start_prometheus(self) -> Process:
        from harness import prometheus

        binary, reason = prometheus.find_prometheus()
        if binary is None:
            raise HostError(reason)
        host = self.host("prometheus")
        work = host.temp_dir("foo-prometheus-")
        self._dirs.append((host, work))
        config = "%s/prometheus.yml" % work
        rules = []
        if prometheus.RULES.is_file():
            host.write_file("%s/%s" % (work, prometheus.RULES.name), prometheus.RULES.read_text())
            rules.append(prometheus.RULES.name)
        host.write_file(config, prometheus.scrape_config(self.http_addresses, rules))
        port = self.port(host, "prometheus")
        listen = "%s:%d" % (host.address, port)
        self.prometheus = self.run(
            host,
            prometheus.command(binary, config, "%s/data" % work, listen),
            name="prometheus",
            ready_port=(host.address, port),
            ready_timeout=60,
        )
        self.prometheus_url = "http://" + listen
        return self.prometheus

    # -- load --
    def run_clients(self, count: int, args: Sequence[str] = (), timeout: float = 60.0) -> list[ClientResult]:
        """``count`` client runs from the clients host, spread in turn over the proxies, all at once."""
        host = self.host("clients")
        started = []
        for i in range(count):
            cmd = self.peers.client_cmd(self.proxy_addresses[i % len(self.proxy_addresses)], *args)
            started.append((time.monotonic(), cmd, host.run(cmd, name="client", log_dir=self.log_dir)))
        results = []
        for t0, cmd, proc in started:
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = -9
            out, err = proc.stdout_text(), proc.stderr_text()
            proc.close()
            results.append(ClientResult(rc, out, err, time.monotonic() - t0, cmd))
        return results

    def locust_master(
        self,
        users: int,
        spawn_rate: float,
        duration: float,
        classes: Sequence[str],
        extra: Sequence[str] = (),
        expect_workers: int | None = None,
    ) -> tuple[Process, str]:
        """Start the locust master (headless, JSON summary) on its host; the process and the address workers use.

        It waits for ``expect_workers`` workers (default: one per ``workers`` entry) before the load starts.
        """
        host = self.host("master")
        port = self.port(host, "master")
        bind = host.address if isinstance(host, LocalHost) else "0.0.0.0"
        workers = len(self.inv.role_hosts("workers")) if expect_workers is None else expect_workers
        cmd = [*console_script("locust", "locust"), "-f", str(LOCUSTFILE), "--headless", "--master"]
        cmd += ["--master-bind-host", bind, "--master-bind-port", str(port)]
        cmd += ["--expect-workers", str(workers), "--expect-workers-max-wait", "60"]
        cmd += ["-u", str(users), "-r", str(spawn_rate), "-t", "%gs" % duration]
        cmd += ["--host", ",".join(self.proxy_addresses), "--only-summary", "--json", "--stop-timeout", "10"]
        cmd += ["--loglevel", "WARNING", *extra, *classes]
        proc = self.run(host, cmd, name="locust-master", env={"PYTHONUNBUFFERED": "1"})
        return proc, "%s:%d" % (host.address, port)

    def locust_workers(self, master: str, extra: Sequence[str] = ()) -> list[Process]:
        """One locust worker process per ``workers`` entry, connecting to ``master``."""
        host_name, port = split_address(master)
        procs = []
        for index, name in enumerate(self.inv.role_hosts("workers")):
            cmd = worker_command(host_name, port, extra)
            procs.append(
                self.run(self.hosts[name], cmd, name="locust-worker%d" % (index + 1), env={"PYTHONUNBUFFERED": "1"})
            )
        return procs

    # -- stats --
    def proxy_stats(self) -> list[dict[str, Any]]:
        """Each proxy's stats (SIGUSR2), in the order of ``proxies``."""
        return [read_stats(p) for p in self.proxies]

    def settled_stats(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The proxies' stats once no session is open any more (the load has gone), or at ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.proxy_stats()
            if all(s.get("connections_active", 0) == 0 for s in stats) or time.monotonic() >= deadline:
                return stats
            time.sleep(0.05)

    def describe(self) -> str:
        """Which peers, and each role's host(s), one role a line (``x2``: two processes on that host)."""
        lines = ["fleet: %s" % self.peers.describe()]
        for role in ROLES:
            counts = Counter(n for n in self.inv.role_hosts(role) if n in self.hosts)
            if counts:
                places = [self.hosts[n].describe() + (" x%d" % c if c > 1 else "") for n, c in counts.items()]
                lines.append("  %-10s %s" % (role, ", ".join(places)))
        return "\n".join(lines)


def worker_command(master_host: str, master_port: int, extra: Sequence[str] = ()) -> list[str]:
    """A locust worker for ``foo-harness swarm``'s locustfile, connecting to the master."""
    cmd = [*console_script("locust", "locust"), "-f", str(LOCUSTFILE), "--worker"]
    cmd += ["--master-host", master_host, "--master-port", str(master_port), "--loglevel", "WARNING"]
    return [*cmd, *extra]


def summed(stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The counters of several proxies added up (the fleet's totals)."""
    return {key: sum(int(s.get(key, 0)) for s in stats) for key in COUNTED}


__all__ = [
    "Fleet",
    "Inventory",
    "InventoryError",
    "apply_roles_spec",
    "inventory_from_dict",
    "load_inventory",
    "summed",
    "worker_command",
]

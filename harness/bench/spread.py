"""``foo-harness swarm --processes N | --inventory FILE | --worker MASTER``: a swarm that spreads.

locust's own distributed mode (``--master`` / ``--worker``), not ours: one
master that counts, N worker processes that make the load, on one machine
(``--processes N``), on several (``--master-bind HOST:PORT`` here and
``foo-harness swarm --worker HOST:PORT`` there), or placed by an inventory
(``harness.fleet``) across namespaces and ssh hosts, with one or more
fooproxies.

The exact check is ``harness.bench.swarm.check`` over the master's
aggregated ``--json`` stats and the sum of every proxy's SIGUSR2 stats, read
once no session is open any more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from harness.bench.swarm import SCENARIOS, SwarmResult, check, parse_json_stats
from harness.fleet import Fleet, Inventory, summed, worker_command
from harness.tasks import REQUESTS_PER_RUN, ClientResult, split_address

WORKER_WAIT = 30.0  # seconds for the workers to exit after the master did


@dataclass
class SpreadResult:
    """A spread swarm: locust's check over all proxies, each proxy's stats, the client runs if any."""

    swarm: SwarmResult
    per_proxy: list[dict[str, Any]]
    clients: list[ClientResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.swarm.ok and not self.problems


def local_inventory(processes: int, master_bind: str | None = None) -> Inventory:
    """Every role on this machine; ``processes`` local workers, or none (they come from elsewhere) with
    ``master_bind``, whose host then is also where the server and fooproxy listen."""
    address = split_address(master_bind)[0] if master_bind else "127.0.0.1"
    inv = Inventory(hosts={"local": {"url": "local", "address": address}})
    inv.roles = {"server": "local", "proxies": ["local"], "master": "local"}
    inv.roles["workers"] = [] if master_bind else ["local"] * processes
    if master_bind:
        inv.ports["master"] = split_address(master_bind)[1]
        inv.fixed_ports.add("master")
    return inv


def spread_swarm(
    inventory: Inventory,
    users: int = 200,
    spawn_rate: float = 50,
    duration: float = 30,
    scenario: str = "all",
    window: int = 16,
    churn: int = 10,
    size: int = 16,
    python: bool = False,
    clients: int = 0,
    expect_workers: int | None = None,
    fleet: Fleet | None = None,
    on_ready: Callable[[Fleet, str], None] | None = None,
) -> SpreadResult:
    """Place the roles, run the locust master and workers through the proxies (then ``clients`` client
    runs, if any), and check the counts exactly over all proxies.

    ``on_ready(fleet, master_address)`` (optional) is called once the master and
    the local workers run (e.g. to say where remote workers connect). A ``fleet``
    already started by the caller is used as it is and left open.
    """
    from harness.bench.bench import choose_peers

    if scenario not in SCENARIOS:
        raise ValueError("unknown scenario %r (one of %s)" % (scenario, ", ".join(SCENARIOS)))
    placed = nullcontext(fleet) if fleet is not None else Fleet(inventory, peers=choose_peers(python))
    with placed as fleet:
        extra = ["--foo-window", str(window), "--foo-churn", str(churn), "--foo-size", str(size)]
        master, master_address = fleet.locust_master(
            users, spawn_rate, duration, SCENARIOS[scenario], extra, expect_workers=expect_workers
        )
        workers = fleet.locust_workers(master_address, extra)
        if on_ready is not None:
            on_ready(fleet, master_address)
        try:
            rc = master.wait(duration + 120)
        except subprocess.TimeoutExpired:
            master.stop()
            rc = -9
        problems = []
        for worker in workers:
            try:
                code = worker.wait(WORKER_WAIT)
            except subprocess.TimeoutExpired:
                code = None
            if code not in (0, 1):
                problems.append("%s exited %s\n%s" % (worker.name, code, worker.tail()))
        out, err = master.stdout_text(), master.stderr_text()
        client_results = fleet.run_clients(clients) if clients else []
        per_proxy = fleet.settled_stats()
        total = summed(per_proxy)
        try:
            entries = parse_json_stats(out)
        except ValueError as exc:
            res = SwarmResult(rc, [], total, problems=["%s (exit %d)\n%s" % (exc, rc, err[-3000:])])
        else:
            res = _check_with_clients(entries, total, rc, clients) if clients else check(entries, total, rc)
        res.locust_output = err
        if clients:
            failed = [r for r in client_results if not r.ok]
            problems += ["client failed:\n%s" % r.describe() for r in failed[:3]]
        return SpreadResult(res, per_proxy, client_results, problems)


def _check_with_clients(entries: list[dict], total: dict, rc: int, clients: int) -> SwarmResult:
    """``check`` of locust's share: the proxies' totals less the client runs' exact share.

    Each client run sends REQUESTS_PER_RUN requests and gets as many answers
    (ACK or NAK: which, only the proxies know, so the share is taken from their sum).
    """
    share = clients * REQUESTS_PER_RUN
    locust_share = dict(
        total, msg_req=total["msg_req"] - share, msg_ack=total["msg_ack"] + total["msg_nak"] - share, msg_nak=0
    )
    res = check(entries, locust_share, rc)
    res.problems = [
        p + " (proxies' counts less %d client runs x %d)" % (clients, REQUESTS_PER_RUN) if p.startswith("proxy") else p
        for p in res.problems
    ]
    res.proxy = dict(total)  # the report shows what the proxies counted, clients included
    return res


def worker_main(master: str, extra: Sequence[str] = ()) -> int:
    """``foo-harness swarm --worker HOST:PORT``: only a locust worker, in the foreground; its exit status."""
    try:
        host, port = split_address(master)
    except ValueError:
        sys.stderr.write("foo-harness swarm: --worker wants the master's HOST:PORT, not %r\n" % master)
        return 2
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sys.stderr.write("swarm: locust worker for the master at %s:%d\n" % (host, port))
    return subprocess.call(worker_command(host, port, extra), env=env, stdin=subprocess.DEVNULL)


__all__ = ["SpreadResult", "local_inventory", "spread_swarm", "worker_main"]


def spread_main(opts: dict[str, Any]) -> int:
    """The spread half of ``foo-harness swarm`` (options parsed there); prints the report, exit 0 when exact."""
    from harness.bench.swarm import report
    from harness.fleet import InventoryError, apply_roles_spec, load_inventory
    from harness.hosts import HostError
    from harness.processes import ProcessError

    prog = "foo-harness swarm"
    extra = ["--foo-window", opts["--window"], "--foo-churn", opts["--churn"], "--foo-size", opts["--size"]]
    if opts["--worker"]:
        return worker_main(opts["--worker"], extra)
    try:
        processes, clients = int(opts["--processes"]), int(opts["--clients"])
        if processes < 0 or clients < 0:
            raise ValueError
    except ValueError:
        sys.stderr.write("%s: --processes and --clients take counts >= 0\n" % prog)
        return 2
    try:
        if opts["--inventory"] or opts["--roles"]:
            inv = load_inventory(opts["--inventory"]) if opts["--inventory"] else Inventory()
            if opts["--roles"]:
                apply_roles_spec(inv, opts["--roles"])
            if processes and not inv.role_hosts("workers"):
                inv.roles["workers"] = [inv.role_hosts("master")[0]] * processes if inv.role_hosts("master") else []
            if not inv.role_hosts("master") or not inv.role_hosts("workers"):
                raise InventoryError("the inventory places no locust master and workers (roles master, workers)")
            if clients and not inv.role_hosts("clients"):
                raise InventoryError("--clients given but the inventory places no clients role")
            expect = None
        else:
            if processes < 1:
                raise InventoryError("--master-bind needs --processes N (the workers to wait for)")
            if opts["--master-bind"]:
                host, _port = split_address(opts["--master-bind"])
                if host in ("0.0.0.0", "::"):
                    raise InventoryError("--master-bind wants the address the workers reach, not %s" % host)
            inv = local_inventory(processes, opts["--master-bind"])
            expect = processes
    except (InventoryError, ValueError) as exc:
        sys.stderr.write("%s: %s\n" % (prog, exc))
        return 2
    users, rate, duration = int(opts["--users"]), float(opts["--spawn-rate"]), float(opts["--duration"])

    def ready(fleet: Fleet, master: str) -> None:
        print(fleet.describe(), flush=True)
        if opts["--master-bind"]:
            print("swarm: waiting for %d workers: foo-harness swarm --worker %s" % (processes, master), flush=True)

    print(
        "swarm: %d users (+%g/s) for %gs, scenario %s, locust distributed over %s worker(s)"
        % (users, rate, duration, opts["--scenario"], expect or len(inv.role_hosts("workers"))),
        flush=True,
    )
    log_dir = opts["--keep-logs"]
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    try:
        from harness.bench.bench import choose_peers

        with Fleet(inv, peers=choose_peers(opts["--python"]), log_dir=log_dir) as fleet:
            res = spread_swarm(
                inv,
                users,
                rate,
                duration,
                opts["--scenario"],
                int(opts["--window"]),
                int(opts["--churn"]),
                int(opts["--size"]),
                clients=clients,
                expect_workers=expect,
                fleet=fleet,
                on_ready=ready,
            )
    except (InventoryError, HostError, ProcessError) as exc:
        sys.stderr.write("%s: %s\n" % (prog, exc))
        return 1
    print(report(res.swarm))
    if len(res.per_proxy) > 1:
        for index, stats in enumerate(res.per_proxy):
            print(
                "fooproxy%d: msg_req %s, msg_ack %s, msg_nak %s"
                % (index + 1, stats["msg_req"], stats["msg_ack"], stats["msg_nak"])
            )
    if res.clients:
        print("clients: %d runs, %d OK" % (len(res.clients), sum(r.ok for r in res.clients)))
    print()
    for problem in res.swarm.problems + res.problems:
        print("PROBLEM: %s" % problem)
    swarm = res.swarm
    print(
        "swarm: %s"
        % (
            "OK: %d REQs over %d proxies = their msg_req%s, 0 failures"
            % (swarm.requests, len(res.per_proxy), " - %d client runs x 100" % clients if clients else "")
            if res.ok
            else "FAILED"
        )
    )
    return 0 if res.ok else 1

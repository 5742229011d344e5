"""``foo-harness swarm`` (``make load``): a headless locust swarm through fooproxy.

Starts a Foo server (the reference ``server-linux`` from ``$FOO_BIN_DIR`` when
present, else ``foo-server``) and fooproxy in front of it on free ports, runs
``locust -f harness/bench/locustfile.py --headless ... --only-summary --json`` as a
subprocess (never imported here: importing locust patches the process), then
asks the proxy for its stats with SIGUSR2 (polling until its last session has
ended) and prints both side by side. ``--keep-logs DIR`` keeps all the output.

Exact check: the REQ events locust counted equal the proxy's ``msg_req``, the
answers (REQ events that did not fail) equal ``msg_ack + msg_nak``, and there
were no failures. Exit status 0 when all holds, else 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.binaries import console_script
from harness.sigusr2 import read_stats_when_idle
from harness.tasks import start_proxy, start_server

USAGE = """\
foo-harness swarm: a headless locust swarm through fooproxy, stats side by side.

Usage:
  foo-harness swarm [options]

Options:
  -h --help          Show this help and exit.
  --users N          Locust users [default: 200].
  --spawn-rate R     Users started per second [default: 50].
  --duration S       Seconds of load (locust -t) [default: 30].
  --scenario NAME    lockstep, pipelined, churn, mixed or all [default: all].
  --window W         Requests in flight for pipelined and mixed bursts [default: 16].
  --churn K          Requests per connection for churn [default: 10].
  --size N           Data bytes per request [default: 16].
  --python           Use foo-server even when $FOO_BIN_DIR has the reference server.
  --keep-logs DIR    Keep every output under DIR: locust's (locust.out, locust.err), the
                     server's and fooproxy's (<name>-<id>.out and .err).
"""

SCENARIOS = {
    "lockstep": ["LockstepUser"],
    "pipelined": ["PipelinedUser"],
    "churn": ["ChurnUser"],
    "mixed": ["MixedUser"],
    "all": ["LockstepUser", "PipelinedUser", "ChurnUser", "MixedUser"],
}
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass
class SwarmResult:
    """What one swarm measured, and what is wrong with it (``problems``, empty when exact)."""

    locust_rc: int
    entries: list[dict[str, Any]]
    proxy: dict[str, Any]
    requests: int = 0  # REQ events
    failures: int = 0  # failed REQ events
    other_failures: int = 0  # failed CONNECT events
    problems: list[str] = field(default_factory=list)
    locust_output: str = ""

    @property
    def answers(self) -> int:
        return self.requests - self.failures

    @property
    def ok(self) -> bool:
        return not self.problems


def locust_command(
    host: str, users: int, spawn_rate: float, duration: float, classes: Sequence[str], extra: Sequence[str] = ()
) -> list[str]:
    """The locust command line for a headless run against ``host`` (``host:port``)."""
    cmd = [*console_script("locust", "locust"), "-f", str(LOCUSTFILE), "--headless"]
    cmd += ["-u", str(users), "-r", str(spawn_rate), "-t", "%gs" % duration, "--host", host]
    cmd += ["--only-summary", "--json", "--stop-timeout", "10", "--loglevel", "WARNING", *extra, *classes]
    return cmd


def run_locust(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run locust to completion (output to files, never an unread pipe); ``(rc, stdout, stderr)``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        out.seek(0)
        err.seek(0)
        return rc, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")


def parse_json_stats(stdout: str) -> list[dict[str, Any]]:
    """Locust's ``--json`` output: the JSON list it prints at the end of stdout."""
    start = stdout.find("[")
    if start < 0:
        raise ValueError("no JSON stats in locust's output")
    return json.loads(stdout[start:])


def check(entries: list[dict[str, Any]], proxy: dict[str, Any], locust_rc: int) -> SwarmResult:
    """Compare locust's REQ events with the proxy's counts; fill in the problems."""
    res = SwarmResult(locust_rc, entries, proxy)
    for e in entries:
        if e["name"].endswith(" REQ"):
            res.requests += e["num_requests"]
            res.failures += e["num_failures"]
        else:
            res.other_failures += e["num_failures"]
    if res.requests == 0:
        res.problems.append("locust fired no REQ events")
    if res.failures or res.other_failures:
        res.problems.append("%d failed requests, %d failed connects" % (res.failures, res.other_failures))
    if proxy.get("msg_req") != res.requests:
        res.problems.append("proxy msg_req %s != %d REQ events" % (proxy.get("msg_req"), res.requests))
    answers = proxy.get("msg_ack", 0) + proxy.get("msg_nak", 0)
    if answers != res.answers:
        res.problems.append("proxy msg_ack+msg_nak %d != %d answers" % (answers, res.answers))
    if proxy.get("msg_invalid"):
        res.problems.append("proxy msg_invalid %s" % proxy["msg_invalid"])
    if locust_rc not in (0, 1):  # 1: locust's own "there were failures" status
        res.problems.append("locust exited %d" % locust_rc)
    return res


def swarm(
    users: int = 200,
    spawn_rate: float = 50,
    duration: float = 30,
    scenario: str = "all",
    window: int = 16,
    churn: int = 10,
    size: int = 16,
    python: bool = False,
    keep_logs: str | os.PathLike | None = None,
) -> SwarmResult:
    """Server + fooproxy + a locust swarm through it + SIGUSR2: the checked result.

    ``keep_logs``: a directory that keeps locust's stdout and stderr
    (``locust.out``, ``locust.err``) and the server's and proxy's output files.
    """
    from harness.bench.bench import choose_peers, proxy_options, server_args

    if scenario not in SCENARIOS:
        raise ValueError("unknown scenario %r (one of %s)" % (scenario, ", ".join(SCENARIOS)))
    peers = choose_peers(python)
    extra = ["--foo-window", str(window), "--foo-churn", str(churn), "--foo-size", str(size)]
    log_dir = None
    if keep_logs is not None:
        log_dir = Path(keep_logs)
        log_dir.mkdir(parents=True, exist_ok=True)
    with (
        start_server(peers=peers, args=server_args(peers), log_dir=log_dir) as server,
        start_proxy(server.address, log_dir=log_dir, **proxy_options()) as proxy,
    ):
        cmd = locust_command(proxy.address, users, spawn_rate, duration, SCENARIOS[scenario], extra)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        rc, out, err = run_locust(cmd, timeout=duration + 90, env=env)
        stats = read_stats_when_idle(proxy)
    if log_dir is not None:
        (log_dir / "locust.out").write_text(out)
        (log_dir / "locust.err").write_text(err)
    try:
        entries = parse_json_stats(out)
    except ValueError as exc:
        res = SwarmResult(rc, [], stats, problems=["%s (exit %d)\n%s" % (exc, rc, err[-3000:])])
        res.locust_output = err
        return res
    res = check(entries, stats, rc)
    res.locust_output = err
    return res


def report(res: SwarmResult) -> str:
    """Locust's per-name table and the proxy's counts, side by side."""
    left = [
        "%-17s %9s %6s %7s %7s %7s %7s" % ("locust name", "requests", "fails", "med ms", "p99 ms", "max ms", "req/s")
    ]
    for e in sorted(res.entries, key=lambda e: e["name"]):
        n = e["num_requests"]
        times = e.get("response_times", {})
        elapsed = max(e.get("last_request_timestamp", 0) - e.get("start_time", 0), 1e-9)
        left.append(
            "%-17s %9d %6d %7.0f %7.0f %7.0f %7.0f"
            % (
                e["name"],
                n,
                e["num_failures"],
                _quantile(times, 0.5),
                _quantile(times, 0.99),
                e["max_response_time"],
                n / elapsed,
            )
        )
    left.append("%-16s %9d %6d" % ("REQ total", res.requests, res.failures))
    left.append("%-16s %9d" % ("answers", res.answers))
    p = res.proxy
    right = ["%-18s %s" % ("fooproxy (SIGUSR2)", "")]
    for name in ("msg_total", "msg_req", "msg_ack", "msg_nak", "msg_invalid", "connections_total"):
        right.append("%-18s %s" % (name, p.get(name)))
    right.append("%-18s %s" % ("msg_ack+msg_nak", p.get("msg_ack", 0) + p.get("msg_nak", 0)))
    width = max(len(s) for s in left) + 4
    rows = max(len(left), len(right))
    left += [""] * (rows - len(left))
    right += [""] * (rows - len(right))
    return "\n".join(a.ljust(width) + b for a, b in zip(left, right, strict=True))


def _quantile(times: dict, q: float) -> float:
    """A quantile of locust's ``response_times`` histogram (``{rounded_ms: count}``)."""
    if not times:
        return 0.0
    items = sorted((float(k), v) for k, v in times.items())
    rank = q * sum(v for _, v in items)
    seen = 0
    for value, count in items:
        seen += count
        if seen >= rank:
            return value
    return items[-1][0]


def main(argv: list[str] | None = None) -> int:
    """Run the swarm, print the side-by-side report, exit 0 when the counts are exact."""
    from harness.peers.flags import parse_cli

    opts = parse_cli(USAGE, ["swarm", *(sys.argv[1:] if argv is None else argv)], "foo-harness swarm")
    scenario = opts["--scenario"]
    if scenario not in SCENARIOS:
        sys.stderr.write("foo-harness swarm: unknown scenario %r (one of %s)\n" % (scenario, ", ".join(SCENARIOS)))
        return 2
    users, rate, duration = int(opts["--users"]), float(opts["--spawn-rate"]), float(opts["--duration"])
    print(
        "swarm: %d users (+%g/s) for %gs, scenario %s, through fooproxy" % (users, rate, duration, scenario),
        flush=True,
    )
    res = swarm(
        users,
        rate,
        duration,
        scenario,
        int(opts["--window"]),
        int(opts["--churn"]),
        int(opts["--size"]),
        opts["--python"],
        opts["--keep-logs"],
    )
    if opts["--keep-logs"]:
        print("swarm: output kept in %s" % opts["--keep-logs"])
    aggregated = [line for line in res.locust_output.splitlines() if "Aggregated" in line]
    if aggregated:
        print("locust:" + aggregated[0])
    print(report(res))
    print()
    for problem in res.problems:
        print("PROBLEM: %s" % problem)
    print(
        "swarm: %s"
        % (
            "OK: %d REQs = proxy msg_req, %d answers = msg_ack+msg_nak, 0 failures" % (res.requests, res.answers)
            if res.ok
            else "FAILED"
        )
    )
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
